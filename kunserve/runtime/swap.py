"""Host swap space for preempted requests' KV: the mechanism of ``--policy swap`` (InferCept-style).

The scheduler decides (with ``kunserve.policy.preemption.SwapPreemption``) which victim is
swapped and when a swapped request comes back; it records each decision as a ``SwapOp`` in its
``SchedulerOutput`` and keeps the host-block bookkeeping in a ``HostBlockPool`` (plain numbers).
``Swapper.apply`` then moves the bytes between the device KV storage and ``HostSwapSpace``
before the step's forward runs.

Both tensors are block-major, ``[blocks, layers, 2, block_size, kv_heads, head_dim]``, so one
block is one contiguous run of bytes on either side and a run of consecutive ids is one copy.

CPU: plain synchronous copies (the "host" is the same memory; this path exists to test the
bookkeeping token-exactly). CUDA: copies run on a side stream into pinned host memory; the
forward waits (stream-side, no host sync) for this step's swap-ins and only for those swap-outs
whose source blocks it may write. See docs/policy-swap.md.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence

import attrs
import torch

log = logging.getLogger(__name__)


@attrs.frozen
class SwapOp:
    """Copy one request's KV: ``device_blocks[i]`` <-> ``host_blocks[i]`` (direction by the list
    of ``SchedulerOutput`` it is in)."""

    request_id: str
    device_blocks: tuple[int, ...]
    host_blocks: tuple[int, ...]

    def __attrs_post_init__(self):
        assert len(self.device_blocks) == len(self.host_blocks), "one host block per device block"


class HostBlockPool:
    """Which host swap blocks are free (bookkeeping only; the scheduler allocates from it).

    Invariant: every id in ``[0, num_blocks)`` is either free or held by exactly one swapped
    request. Released ids are handed out again first, then never-used ids from a counter, so a
    pool of millions of small blocks costs no bookkeeping memory until it is used.
    """

    def __init__(self, num_blocks: int):
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.num_blocks = num_blocks
        self._next = 0  # ids >= _next were never handed out
        self._released: list[int] = []

    @property
    def num_free_blocks(self) -> int:
        return self.num_blocks - self._next + len(self._released)

    def allocate(self, count: int) -> list[int]:
        if count > self.num_free_blocks:
            raise RuntimeError(f"need {count} host swap blocks, only {self.num_free_blocks} are free")
        reuse = [self._released.pop() for _ in range(min(count, len(self._released)))]
        fresh = list(range(self._next, self._next + count - len(reuse)))
        self._next += len(fresh)
        return reuse + fresh

    def free(self, blocks: Sequence[int]) -> None:
        assert all(0 <= b < self._next for b in blocks), "freeing a host block never handed out"
        self._released.extend(blocks)
        assert len(self._released) <= self._next, "host block freed twice"


def _runs(device_blocks: Sequence[int], host_blocks: Sequence[int]) -> Iterator[tuple[int, int, int]]:
    """(device start, host start, length) of maximal runs consecutive on both sides."""
    i = 0
    while i < len(device_blocks):
        n = 1
        while (i + n < len(device_blocks) and device_blocks[i + n] == device_blocks[i] + n
               and host_blocks[i + n] == host_blocks[i] + n):
            n += 1
        yield device_blocks[i], host_blocks[i], n
        i += n


class HostSwapSpace:
    """``num_blocks`` host blocks shaped like the device KV's blocks.

    ``storage``: ``[num_blocks, layers, 2, block_size, kv_heads, head_dim]`` on the CPU, pinned
    when ``pin_memory`` (needed for asynchronous device-to-host copies). Allocated once, whole,
    like vLLM's swap space: on the CPU the OS commits pages only when a block is first written.
    """

    def __init__(self, num_blocks: int, block_shape: Sequence[int], dtype: torch.dtype, pin_memory: bool = False):
        self.storage = torch.empty((num_blocks, *block_shape), dtype=dtype, pin_memory=pin_memory)
        self.pool = HostBlockPool(num_blocks)

    @property
    def block_bytes(self) -> int:
        return self.storage[0].numel() * self.storage.element_size()

    def copy_out(self, device_storage: torch.Tensor, op: SwapOp, non_blocking: bool = False) -> int:
        """Device blocks -> host blocks; returns the bytes copied."""
        for dev, host, n in _runs(op.device_blocks, op.host_blocks):
            self.storage[host:host + n].copy_(device_storage[dev:dev + n], non_blocking=non_blocking)
        return len(op.device_blocks) * self.block_bytes

    def copy_in(self, device_storage: torch.Tensor, op: SwapOp, non_blocking: bool = False) -> int:
        """Host blocks -> device blocks; returns the bytes copied."""
        for dev, host, n in _runs(op.device_blocks, op.host_blocks):
            device_storage[dev:dev + n].copy_(self.storage[host:host + n], non_blocking=non_blocking)
        return len(op.device_blocks) * self.block_bytes


class Swapper:
    """Runs a step's swap ops on the device KV storage and counts the bytes moved.

    Ordering invariants (why the copies are correct without a host sync on CUDA):
    - the scheduler frees a victim's device blocks in ``schedule()``, so they may be handed to
      another request *in the same step*: a swap-out must therefore have read them before this
      step's forward writes them (the reason swap-outs cannot be deferred by the per-step
      budget). The forward waits for exactly the in-flight swap-outs whose blocks belong to a
      request it runs.
    - a swapped-in request runs in the step that swaps it in, so the forward waits for the swap-ins.
    - every copy runs on one side stream, so a host block freed by a swap-in and reused by a
      later swap-out, or a device block freed by a swap-out and later the target of a swap-in,
      is touched in issue order.
    - the side stream first waits for everything already queued on the compute stream (the
      previous forward wrote the blocks being swapped out and may read blocks being reused).
    """

    def __init__(self, space: HostSwapSpace, device: torch.device):
        self.space = space
        self.device = torch.device(device)
        self.swapped_out_bytes = 0
        self.swapped_in_bytes = 0
        self.stream = None
        # device block -> event recorded after the swap-out reading it; pruned when done or waited on
        self._pending_out: dict[int, torch.cuda.Event] = {}
        if self.device.type == "cuda":
            self.stream = torch.cuda.Stream(self.device)

    def apply(self, plan, device_storage: torch.Tensor, block_table: Callable[[str], list[int]]) -> None:
        """Swap ``plan.swapped_out`` then ``plan.swapped_in`` (a ``SchedulerOutput``)."""
        # No admission in a step that preempted (vLLM v1 rule, kept under swap): so a host block
        # freed by a swap-in is never refilled by a swap-out of the same step.
        assert not (plan.swapped_out and plan.swapped_in), "a step both swapped out and in"
        if self.stream is None:
            for op in plan.swapped_out:
                self.swapped_out_bytes += self.space.copy_out(device_storage, op)
            for op in plan.swapped_in:
                self.swapped_in_bytes += self.space.copy_in(device_storage, op)
            return
        self._apply_cuda(plan, device_storage, block_table)

    def _apply_cuda(self, plan, device_storage: torch.Tensor, block_table: Callable[[str], list[int]]) -> None:
        compute = torch.cuda.current_stream(self.device)
        if plan.swapped_out or plan.swapped_in:
            self.stream.wait_stream(compute)
            with torch.cuda.stream(self.stream):
                for op in plan.swapped_out:
                    self.swapped_out_bytes += self.space.copy_out(device_storage, op, non_blocking=True)
                    done = self.stream.record_event()
                    self._pending_out.update(dict.fromkeys(op.device_blocks, done))
                for op in plan.swapped_in:
                    self.swapped_in_bytes += self.space.copy_in(device_storage, op, non_blocking=True)
                if plan.swapped_in:
                    compute.wait_event(self.stream.record_event())
        if not self._pending_out:
            return
        # The forward writes only into blocks of the requests it runs.
        used = {b for chunk in plan.chunks for b in block_table(chunk.request.request_id)}
        waits = {id(e): e for b, e in self._pending_out.items() if b in used}
        for event in waits.values():
            compute.wait_event(event)
        # Waited-on blocks are ordered for every later compute-stream use; finished ones are free.
        self._pending_out = {b: e for b, e in self._pending_out.items() if b not in used and not e.query()}

    def synchronize(self) -> None:
        """Wait for every queued copy (tests, shutdown)."""
        if self.stream is not None:
            self.stream.synchronize()
