"""Paged KV-cache bookkeeping on the CPU: which physical block holds which request's tokens."""

from __future__ import annotations

from collections import deque


class BlockManager:
    """Owns the free-block queue, per-block reference counts and per-request block tables.

    Invariants: a block is in the free queue iff its ref count is 0; a request's block table
    holds ``ceil(tokens / block_size)`` blocks for the tokens allocated so far. Free blocks are
    handed out from the front of the queue (lowest ids first on a fresh pool) and freed blocks
    return to the back, so ids are deterministic and testable.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.block_size = block_size
        self.reset(num_blocks)

    def reset(self, num_blocks: int) -> None:
        """An empty pool of ``num_blocks`` blocks (a re-laid-out KV cache starts from this)."""
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks
        self._tables: dict[str, list[int]] = {}
        # Blocks admission must leave free: a pipeline leader admits only what every member can hold.
        self.reserved = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def owners(self) -> list[str]:
        return list(self._tables)

    def block_table(self, request_id: str) -> list[int]:
        return self._tables.get(request_id, [])

    def blocks_needed(self, request_id: str, num_tokens: int) -> int:
        """Extra blocks ``request_id`` needs so that ``num_tokens`` tokens fit."""
        have = len(self._tables.get(request_id, ()))
        return max(0, -(-num_tokens // self.block_size) - have)

    def can_allocate(self, request_id: str, num_tokens: int) -> bool:
        return self.blocks_needed(request_id, num_tokens) <= len(self._free) - self.reserved

    def take_free(self, count: int) -> list[int]:
        """Remove ``count`` free blocks from the pool (lowest ids of a fresh pool first)."""
        if count > len(self._free):
            raise RuntimeError(f"need {count} free blocks, only {len(self._free)} are free")
        return [self._free.popleft() for _ in range(count)]

    def adopt(self, owner: str, blocks: list[int]) -> None:
        """Give ``owner`` exactly these (free) blocks, e.g. KV that stayed in place across a
        re-layout."""
        assert owner not in self._tables and all(self._ref_counts[b] == 0 for b in blocks)
        taken = set(blocks)
        if any(b in taken for b in self._free):
            self._free = deque(b for b in self._free if b not in taken)
        for b in blocks:
            self._ref_counts[b] = 1
        self._tables[owner] = list(blocks)

    def allocate(self, request_id: str, num_tokens: int) -> list[int]:
        """Grow the request's table to hold ``num_tokens``; returns the new block ids."""
        need = self.blocks_needed(request_id, num_tokens)
        if need > len(self._free):
            raise RuntimeError(
                f"request {request_id} needs {need} blocks but only {len(self._free)} are free"
            )
        new = [self._free.popleft() for _ in range(need)]
        for block in new:
            self._ref_counts[block] = 1
        self._tables.setdefault(request_id, []).extend(new)
        return new

    def share(self, src_request_id: str, dst_request_id: str) -> None:
        """Let ``dst`` use ``src``'s blocks too (e.g. a common prefix): ref counts go up."""
        if dst_request_id in self._tables:
            raise ValueError(f"request {dst_request_id} already has blocks")
        table = list(self._tables.get(src_request_id, ()))
        for block in table:
            self._ref_counts[block] += 1
        self._tables[dst_request_id] = table

    def free(self, request_id: str) -> None:
        """Release the request's blocks; blocks no other request references become free."""
        for block in self._tables.pop(request_id, ()):
            self._ref_counts[block] -= 1
            assert self._ref_counts[block] >= 0, f"block {block} freed twice"
            if self._ref_counts[block] == 0:
                self._free.append(block)

    def free_first(self, owner: str, count: int) -> list[int]:
        """Release the first ``count`` blocks of ``owner`` (a KV exchange sends a table chunk by
        chunk); returns them. The table disappears with its last block."""
        table = self._tables[owner]
        assert 0 < count <= len(table), f"{owner} holds {len(table)} blocks, cannot free {count}"
        gone, table[:] = table[:count], table[count:]
        if not table:
            del self._tables[owner]
        for block in gone:
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free.append(block)
        return gone

    # -- capacity changes (the unified allocator grows or shrinks the KV cache at its tail) --------
    def add_blocks(self, count: int) -> None:
        """New block ids ``[num_blocks, num_blocks + count)`` join the pool as free blocks."""
        assert count >= 0
        self._free.extend(range(self.num_blocks, self.num_blocks + count))
        self._ref_counts.extend([0] * count)
        self.num_blocks += count

    def can_vacate_from(self, cut: int) -> bool:
        """True if every used block >= ``cut`` can move to a free block below it."""
        used_above = sum(1 for b in range(cut, self.num_blocks) if self._ref_counts[b])
        free_below = sum(1 for b in self._free if b < cut)
        return used_above <= free_below

    def vacate_from(self, cut: int) -> list[tuple[int, int]]:
        """Move every used block >= ``cut`` to a free block below it, updating block tables.

        Returns ``(old, new)`` pairs; the caller copies the KV data. Requires
        ``can_vacate_from(cut)``.
        """
        assert self.can_vacate_from(cut)
        targets = deque(b for b in self._free if b < cut)
        moves = {b: targets.popleft() for b in range(cut, self.num_blocks) if self._ref_counts[b]}
        if not moves:
            return []
        taken = set(moves.values())
        self._free = deque(b for b in self._free if b not in taken)
        for table in self._tables.values():
            table[:] = [moves.get(b, b) for b in table]
        for old, new in moves.items():
            self._ref_counts[new], self._ref_counts[old] = self._ref_counts[old], 0
            self._free.append(old)
        return list(moves.items())

    def truncate(self, cut: int) -> None:
        """Drop block ids >= ``cut`` from the pool; they must all be free."""
        assert all(self._ref_counts[b] == 0 for b in range(cut, self.num_blocks)), "vacate first"
        self._free = deque(b for b in self._free if b < cut)
        del self._ref_counts[cut:]
        self.num_blocks = cut
