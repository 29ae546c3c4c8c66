"""Coordinated KV exchange after a merge: one round of chunks after each pipeline step.

A merge re-views each member's KV in place (see ``regroup``); the pages holding the peers'
layers of the running requests must then move. Instead of moving them all at once while the
group stands still, the leader's ``ExchangeSchedule`` (``policy/exchange.py``) cuts them into
rounds; every member runs round ``k`` right after its part of pipeline step ``k``, so:

- activations first: a step's hidden states are sent before the round's KV is posted, and every
  round completes before the next step starts, so an activation never queues behind KV;
- chunks of about one stage's compute time (``chunk_pages``), so a round is short;
- the exchanged requests wait (``Scheduler.stalled``) while queued ones run: the leader admits
  new work only into the schedule's ``admission_budget``, memory that stays free on every member
  until the exchange ends; a request resumes after the round that delivers its last pages.

Transfers go on the default process group (NCCL on GPUs) with ``batch_isend_irecv``, which posts
all of a round's sends and receives together so no ordering of peers can deadlock.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

import attrs
import torch
import torch.distributed as dist

from kunserve.policy.exchange import ExchangeSchedule, PageTransfer


log = logging.getLogger(__name__)


@attrs.frozen
class ExchangeProgress:
    """One rank's share of a running exchange in one cluster step (reported to rank 0)."""

    bytes_sent: int = 0
    request_stalls: tuple[float, ...] = ()  # leader: seconds each request resumed now had waited
    overlapped_requests: int = 0  # leader: queued requests first scheduled while KV was in transit


def outbound_owner(dst: int, request_id: str) -> str:
    """Block-manager table of the pages (peer layers) of ``request_id`` waiting to go to ``dst``."""
    return f"outbound:{dst}:{request_id}"


class KVExchange:
    """This member's part of an exchange.

    Invariants: the first pages of ``outbound_owner(dst, r)`` are the next ones to send to
    ``dst``; a received request's table grows in arrival order, which is token order because
    each link carries a request's pages in order. ``round`` counts completed rounds.
    """

    def __init__(self, rank: int, schedule: ExchangeSchedule, kv_cache, block_manager):
        self.rank, self.schedule = rank, schedule
        self.kv_cache, self.block_manager = kv_cache, block_manager
        self.round = 0
        self.bytes_sent = 0  # since the owner last took it (``take_bytes_sent``)

    @property
    def done(self) -> bool:
        return self.round >= self.schedule.num_rounds

    def take_progress(self) -> ExchangeProgress:
        progress = ExchangeProgress(self.bytes_sent)
        self.bytes_sent = 0
        return progress

    def run_round(self) -> list[str]:
        """Send and receive this member's chunks of the next round; returns the requests whose
        KV is complete on every member after it."""
        pieces = self.schedule.rounds[self.round]
        sends, recvs = defaultdict(list), defaultdict(list)
        for p in pieces:
            if p.src == self.rank:
                sends[p.dst].append(p)
            elif p.dst == self.rank:
                recvs[p.src].append(p)
        ops = [dist.P2POp(dist.isend, self._stage_out(dst, sends[dst]), dst) for dst in sorted(sends)]
        buffers = {src: self._buffer(recvs[src]) for src in sorted(recvs)}
        ops += [dist.P2POp(dist.irecv, buffers[src], src) for src in sorted(recvs)]
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        for src in sorted(recvs):
            self._store(recvs[src], buffers[src])
        self.bytes_sent += sum(op.tensor.numel() * op.tensor.element_size() for op in ops if op.op is dist.isend)
        ready = self.schedule.ready_in_round(self.round)
        self.round += 1
        return ready

    def _stage_out(self, dst: int, pieces: list[PageTransfer]) -> torch.Tensor:
        """Copy the pieces' pages out of the pool (so they can be freed, and reused by this
        round's receives, before the send completes): [pages, layers, 2, bs, kv_heads, hd]."""
        storage, pages = self.kv_cache.storage, []
        for p in pieces:
            pages += self.block_manager.free_first(outbound_owner(dst, p.request_id), p.num_pages)
        return storage.index_select(0, torch.tensor(pages, device=storage.device))  # a copy

    def _buffer(self, pieces: list[PageTransfer]) -> torch.Tensor:
        storage = self.kv_cache.storage
        count = sum(p.num_pages for p in pieces)
        return torch.empty((count, *storage.shape[1:]), dtype=storage.dtype, device=storage.device)

    def _store(self, pieces: list[PageTransfer], buffer: torch.Tensor) -> None:
        """Allocate pages for what arrived (after this round's sends freed theirs) and write it."""
        bm, pages = self.block_manager, []
        for p in pieces:
            have = len(bm.block_table(p.request_id))
            pages += bm.allocate(p.request_id, (have + p.num_pages) * bm.block_size)
        self.kv_cache.storage.index_copy_(0, torch.tensor(pages, device=buffer.device), buffer)


class LeaderExchange(KVExchange):
    """The leader's part: it also resumes requests as their KV completes and keeps admission
    inside the schedule's budget (``BlockManager.reserved``).

    Budget invariant: with ``G`` the pages the leader holds for exchanged requests in the
    current state, ``reserved = pool - admission_budget - G`` leaves exactly the budget for
    newly admitted work (and the growth of resumed requests), and the budget never shrinks, so
    admitted work is never preempted because of the exchange. In the final state every member
    holds the same pages ``S`` and the budget is ``min(pool) - S``, so ``reserved`` becomes
    ``pool - min(pool)``: the group's usual bound.
    """

    def __init__(self, rank: int, schedule: ExchangeSchedule, kv_cache, block_manager, scheduler,
                 stalled_since: float | None = None):
        super().__init__(rank, schedule, kv_cache, block_manager)
        self.scheduler = scheduler
        self.stalled_since = time.monotonic() if stalled_since is None else stalled_since
        self.stalls: list[float] = []  # seconds each exchanged request waited (until taken)
        self._pool = block_manager.num_blocks
        self._exchanged = set(scheduler.stalled)
        self._overlapped: set[str] = set()  # other requests scheduled during the exchange
        self._overlapped_reported = 0

    def take_progress(self) -> ExchangeProgress:
        progress = ExchangeProgress(self.bytes_sent, tuple(self.stalls),
                                    len(self._overlapped) - self._overlapped_reported)
        self.bytes_sent, self._overlapped_reported = 0, len(self._overlapped)
        self.stalls.clear()
        return progress

    def note_scheduled(self, request_ids) -> None:
        """Requests of a step run during the exchange: the queued ones among them are the point
        of coordinating it (they use the freed memory while the exchanged ones wait)."""
        self._overlapped |= set(request_ids) - self._exchanged

    def start(self) -> list[str]:
        """Resume requests that need no transfer; set the first admission budget."""
        ready = [r for r in list(self.scheduler.stalled) if r not in self.schedule.ready_after]
        self._apply_budget()
        return self._resume(ready)

    def run_round(self) -> list[str]:
        ready = super().run_round()
        self._apply_budget()
        resumed = self._resume(ready)
        if self.done:
            log.info("KV exchange done after %d rounds: %d requests resumed after %.3f s, %d queued requests "
                     "ran meanwhile", self.round, len(self._exchanged), time.monotonic() - self.stalled_since,
                     len(self._overlapped))
        return resumed

    def _apply_budget(self) -> None:
        state = self.round
        reserved = self._pool - self.schedule.admission_budget[state] - self.schedule.held[state].get(self.rank, 0)
        assert reserved >= 0, "the budget is a minimum over states including the leader's own"
        self.block_manager.reserved = reserved

    def _resume(self, ready: list[str]) -> list[str]:
        """Resume ``ready`` (aborted ones' blocks are freed here: the exchange no longer writes
        into them); returns them: the members hold blocks for each until the leader releases it."""
        now = time.monotonic()
        for request_id in ready:
            if self.scheduler.resume(request_id) is None:
                self.block_manager.free(request_id)
            self.stalls.append(now - self.stalled_since)
        return ready
