"""A step's inputs for the CUDA path: a few vectorised host ops, one pinned buffer, one copy.

``HostStep.build`` turns the scheduled chunks into int32 numpy arrays with one Python pass over
the chunks (no per-token Python work for decode); ``upload`` packs every array into one pinned
buffer and copies it to the device in a single non-blocking transfer, then hands out views of
the device copy as the step's tensors and ``TritonAttentionMetadata``.
"""

from __future__ import annotations

import functools
import weakref
from itertools import chain
from typing import Sequence

import attrs
import numpy as np
import torch

from kunserve.runtime.block_manager import BlockManager
from kunserve.runtime.scheduler import ScheduledChunk


@attrs.frozen
class HostStep:
    """One step's inputs as host arrays (T rows = every scheduled token, B sequences)."""

    ids: np.ndarray  # [T] int32 token ids
    positions: np.ndarray  # [T] int32
    slots: np.ndarray  # [T] int32: block * block_size + offset where each row's K/V goes
    query_start: np.ndarray  # [B + 1] int32
    context_lens: np.ndarray  # [B] int32, including this step's tokens
    tables: np.ndarray  # [B, W] int32 block tables, zero-padded (0 is a valid block id)
    logits_rows: np.ndarray  # [n] int32 rows of T whose hidden state predicts a token
    sampling_ids: tuple[str, ...]  # the n requests, in logits_rows order

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]

    @property
    def is_decode(self) -> bool:
        """Every sequence has exactly one query row."""
        return self.ids.shape[0] == self.num_seqs

    @classmethod
    def build(cls, chunks: Sequence[ScheduledChunk], block_manager: BlockManager,
              table_cache: "BlockTableCache | None" = None) -> "HostStep":
        requests = [c.request for c in chunks]
        ids = list(chain.from_iterable(r.token_ids[c.start:c.start + c.num_tokens] for r, c in zip(requests, chunks)))
        return cls.from_pieces([r.request_id for r in requests], [c.start for c in chunks],
                               [c.num_tokens for c in chunks], [c.completes for c in chunks], ids,
                               block_manager, table_cache)

    @classmethod
    def from_pieces(cls, request_ids: Sequence[str], starts: Sequence[int], num_tokens: Sequence[int],
                    completes: Sequence[bool], ids: Sequence[int] | None, block_manager: BlockManager,
                    table_cache: "BlockTableCache | None" = None) -> "HostStep":
        """The step of B pieces: ``num_tokens[i]`` tokens of ``request_ids[i]`` from position
        ``starts[i]`` on (their blocks already allocated), ``ids`` their T token ids in order, or
        None (zeros: a pipeline stage's input is hidden states, or ids stage 0 passes itself)."""
        b, bs = len(request_ids), block_manager.block_size
        starts = np.fromiter(starts, np.int64, b)
        qlens = np.fromiter(num_tokens, np.int64, b)
        lists = [block_manager.block_table(r) for r in request_ids]
        tables = table_cache.gather(list(request_ids), lists) if table_cache else None
        tables = _padded_tables(lists) if tables is None else tables
        query_start = np.zeros(b + 1, np.int64)
        np.cumsum(qlens, out=query_start[1:])
        seq_of_row = np.repeat(np.arange(b), qlens)  # [T]
        positions = np.arange(query_start[-1]) - query_start[seq_of_row] + starts[seq_of_row]
        slots = tables[seq_of_row, positions // bs].astype(np.int64) * bs + positions % bs
        completes = np.fromiter(completes, bool, b)
        sampling_ids = tuple(r for r, done in zip(request_ids, completes.tolist()) if done)
        i32 = lambda a: np.asarray(a, dtype=np.int32)  # noqa: E731
        ids = np.zeros(int(query_start[-1]), np.int32) if ids is None else i32(ids)
        return cls(ids, i32(positions), i32(slots), i32(query_start), i32(starts + qlens),
                   tables, i32(query_start[1:][completes] - 1), sampling_ids)


def _padded_tables(tables: list[list[int]]) -> np.ndarray:
    """[B, W] int32, row i = tables[i] followed by zeros; one numpy scatter, no per-row copy."""
    lens = np.fromiter(map(len, tables), np.int64, len(tables))
    width = max(1, int(lens.max()))
    flat = np.fromiter(chain.from_iterable(tables), np.int32, int(lens.sum()))
    out = np.zeros((len(tables), width), np.int32)
    out[np.arange(width)[None, :] < lens[:, None]] = flat
    return out


class BlockTableCache:
    """Block tables kept as rows of one int32 array and updated by their new entries only.

    Converting every table from Python lists each step costs ~1 ms at batch 256 (context
    1024), while a decode step adds at most one block per sequence. Relies on how
    ``BlockManager`` changes tables: a request's list only grows by appending; ``free`` drops
    the list (a later allocation makes a new one, so rows are keyed by list identity); only
    ``vacate_from`` rewrites lists in place, and the KV storage is always remapped right after
    it, which ``reset_if_remapped`` notices.
    """

    def __init__(self, rows: int, width: int):
        self.array = np.zeros((rows, width), np.int32)
        self.entries: dict[str, tuple[list, int, int]] = {}  # request id -> (list, cached length, row)
        self.free_rows = list(range(rows))
        self._storage = None  # weak reference: a strong one would keep unmapped KV memory alive

    def reset_if_remapped(self, storage: torch.Tensor) -> None:
        if self._storage is None or self._storage() is not storage:
            self.entries.clear()
            self.free_rows = list(range(self.array.shape[0]))
            self._storage = weakref.ref(storage)

    def gather(self, request_ids: list[str], tables: list[list[int]]) -> np.ndarray | None:
        """[B, W] int32 padded tables of this step (None if one is wider than the cache)."""
        width = max(map(len, tables))
        if width > self.array.shape[1] or len(tables) > self.array.shape[0]:
            return None
        if len(self.entries) + len(tables) > self.array.shape[0]:
            self._evict_all_but(set(request_ids))
        rows = [self._row(rid, table) for rid, table in zip(request_ids, tables)]
        return self.array[rows, :width]  # [B, W] copy; columns past a table's end are zero

    def _row(self, rid: str, table: list[int]) -> int:
        entry = self.entries.get(rid)
        if entry is not None and entry[0] is table and len(table) >= entry[1]:
            _, known, row = entry
            if len(table) > known:
                self.array[row, known:len(table)] = table[known:]
        else:
            if entry is not None:
                self.free_rows.append(entry[2])
            row = self.free_rows.pop()
            self.array[row] = 0
            self.array[row, :len(table)] = table
        self.entries[rid] = (table, len(table), row)
        return row

    def _evict_all_but(self, live: set[str]) -> None:
        for rid in [r for r in self.entries if r not in live]:
            self.free_rows.append(self.entries.pop(rid)[2])


def prefill_tiles(query_start: np.ndarray, query_tile: int) -> tuple[np.ndarray, np.ndarray]:
    """(sequence, first query) of every prefill tile of ``query_tile`` queries, [tiles] each."""
    qlens = np.diff(query_start)
    per_seq = -(-qlens // query_tile)  # [B]
    tile_seq = np.repeat(np.arange(qlens.shape[0]), per_seq)
    first_tile = np.cumsum(per_seq) - per_seq  # [B] index of each sequence's first tile
    tile_first = (np.arange(tile_seq.shape[0]) - first_tile[tile_seq]) * query_tile
    return tile_seq.astype(np.int32), tile_first.astype(np.int32)


@attrs.frozen
class DeviceStep:
    """The device tensors of one eager step."""

    ids: torch.Tensor  # [T] int32
    positions: torch.Tensor  # [T] int32
    logits_rows: torch.Tensor  # [n] int32
    meta: TritonAttentionMetadata


# Triton specialises kernels on pointer alignment and on integers divisible by 16: every part of
# the packed buffer starts at a multiple of 16 elements and the block-table width is a multiple
# of 16, so each step reuses the same compiled kernels (unaligned parts cost a ~1 s recompile).
_ALIGN = 16


def _pad(a: np.ndarray) -> np.ndarray:
    return np.pad(a, (0, -a.shape[0] % _ALIGN))


def upload(step: HostStep, device: torch.device, block_size: int, query_tile: int,
           num_splits: int) -> DeviceStep:
    """Pack every array into one pinned buffer, copy it once, and view it on the device."""
    from kunserve.runtime.triton_attention import TritonAttentionMetadata  # needs Triton (CUDA only)

    tables = np.pad(step.tables, ((0, 0), (0, -step.tables.shape[1] % _ALIGN)))  # [B, W padded]
    parts = {"ids": step.ids, "positions": step.positions, "slots": step.slots,
             "logits_rows": step.logits_rows, "context_lens": step.context_lens,
             "tables": tables.reshape(-1)}
    if not step.is_decode:
        parts["query_start"] = step.query_start
        parts["tile_seq"], parts["tile_first"] = prefill_tiles(step.query_start, query_tile)
    sizes = [a.shape[0] for a in parts.values()]
    padded = [_pad(a) for a in parts.values()]
    # The caching host allocator keeps this buffer until the copy has finished, so reuse is safe.
    host = torch.empty(sum(a.shape[0] for a in padded), dtype=torch.int32, pin_memory=True)
    np.concatenate(padded, out=host.numpy())
    flat = host.to(device, non_blocking=True)
    starts = np.cumsum([0] + [a.shape[0] for a in padded[:-1]]).tolist()
    dev = {name: flat[at:at + n] for name, at, n in zip(parts, starts, sizes)}
    meta = TritonAttentionMetadata(
        slots=dev["slots"], block_tables=dev["tables"].view(step.num_seqs, -1),
        context_lens=dev["context_lens"], block_size=block_size,
        query_start=dev.get("query_start"), tile_seq=dev.get("tile_seq"),
        tile_first=dev.get("tile_first"), query_tile=query_tile, num_splits=num_splits,
    )
    return DeviceStep(dev["ids"], dev["positions"], dev["logits_rows"], meta)


def stage_step(pieces, block_manager: BlockManager, device: torch.device, num_heads: int,
               num_kv_heads: int) -> DeviceStep:
    """The device inputs of one pipeline micro-batch on CUDA (Triton attention, as the single
    instance's eager path): ``pieces`` have ``request_id``, ``start``, ``num_tokens`` and
    ``completes`` (``pipeline_step.StageChunk``), their blocks already allocated on this member.
    Its ``ids`` are zeros: a stage's input is hidden states, or token ids stage 0 passes itself."""
    step = HostStep.from_pieces([c.request_id for c in pieces], [c.start for c in pieces],
                                [c.num_tokens for c in pieces], [c.completes for c in pieces], None, block_manager)
    return upload_eager(step, device, block_manager.block_size, num_heads, num_kv_heads)


def upload_eager(step: HostStep, device: torch.device, block_size: int, num_heads: int,
                 num_kv_heads: int) -> DeviceStep:
    """``upload`` with the Triton kernels' tiling for this step's shape (an eager forward: a
    pipeline stage's micro-batch, or a profiled batch)."""
    from kunserve.runtime.triton_attention import decode_splits, query_tile_for  # CUDA only

    splits = decode_splits(step.num_seqs, num_kv_heads, int(step.context_lens.max()), _num_sms(device))
    return upload(step, device, block_size, query_tile_for(num_heads, num_kv_heads), splits)


@functools.cache
def _num_sms(device: torch.device) -> int:
    """Multiprocessors of ``device`` (asked once, not per micro-batch)."""
    return torch.cuda.get_device_properties(device).multi_processor_count
