"""``--policy llumnix`` in the simulator: the real ``MigrationPlanner``'s orders, executed.

The planner (``kunserve/policy/migration.py``) runs at every monitor tick on the cluster
snapshot; its candidates are built lazily, only for the sources it asks about. A migration runs
as the runtime's mechanism does (``runtime/migration.py``), in two stages:

1. copy: the destination allocates blocks for the request's KV as planned (or refuses: the
   migration is aborted); the blocks cross the link while the request keeps decoding at the
   source;
2. stop-and-copy: at the source's next boundary after the copy, the request leaves the source
   (if it is still decoding there; else the migration is cancelled), the blocks completed since
   stage 1 plus the partial last one cross the link, and at the destination's next boundary it
   joins the running list (the newest there). A destination that has no room by then recomputes
   the request (``Scheduler.preempt``; counted, not expected with the planner's headroom).
"""

from __future__ import annotations

from collections.abc import Mapping

from kunserve.policy.migration import MigrationCandidate, MigrationOrder, MigrationPlanner


class _LazyCandidates(Mapping):
    """``{instance id: candidates}`` computed on first access (the planner reads sources only)."""

    def __init__(self, units: dict, now: float):
        self._units, self._now, self._cache = units, now, {}
        self.requests: dict[str, object] = {}

    def __getitem__(self, uid: int) -> list[MigrationCandidate]:
        if uid not in self._cache:
            found = self._units[uid].candidates_at(self._now)  # KeyError for unknown ids, as Mapping wants
            self.requests.update((r.request_id, r) for r, _, _ in found)
            self._cache[uid] = [MigrationCandidate(r.request_id, blocks, left) for r, blocks, left in found]
        return self._cache[uid]

    def __iter__(self):
        return iter(self._units)

    def __len__(self) -> int:
        return len(self._units)


class Migrations:
    """Invariants (the planner's bounds): an instance is in at most one migration (``busy``), a
    request migrates at most once (``moved``), ``inflight`` counts running migrations."""

    def __init__(self, planner: MigrationPlanner, config):
        self.planner, self.config = planner, config
        self.busy: set[int] = set()
        self.moved: set[str] = set()
        self.inflight = 0
        self.started = self.completed = self.aborted = self.recomputed = 0
        self.bytes = 0

    def on_monitor(self, sim, now: float) -> None:
        candidates = _LazyCandidates(sim.units, now)
        orders = self.planner.plan(sim.cluster_snapshot(), candidates, frozenset(self.busy), frozenset(self.moved),
                                   self.inflight)
        for order in orders:
            self._start(sim, order, candidates.requests[order.request_id], now)

    def _seconds(self, blocks: int) -> float:
        cfg = self.config
        nbytes = blocks * cfg.full_block_bytes
        self.bytes += nbytes
        return cfg.link_spec.seconds(nbytes, cfg.tp)

    def _start(self, sim, order: MigrationOrder, request, now: float) -> None:
        self.busy |= {order.src, order.dst}
        self.moved.add(order.request_id)
        self.inflight += 1
        self.started += 1
        state = {"refused": False}
        bs = self.config.block_size

        def reserve(unit, t):
            if unit.bm.can_allocate(order.request_id, order.num_blocks * bs):
                unit.bm.allocate(order.request_id, order.num_blocks * bs)
            else:
                state["refused"] = True

        sim.deliver(order.dst, reserve, now)
        sim.timer(now + self._seconds(order.num_blocks), lambda t: sim.deliver(order.src, final, t))

        def final(unit, t):
            s = unit.scheduler
            if state["refused"] or request not in s.running or request.num_uncomputed_tokens != 1:
                sim.deliver(order.dst, lambda u, _t: u.bm.free(order.request_id), t)
                self._end(order, aborted=True)
                return
            s.running.remove(request)
            unit.bm.free(order.request_id)
            rest = max(0, -(-request.num_computed_tokens // bs) - order.num_blocks) + 1
            sim.timer(t + self._seconds(rest), lambda t2: sim.deliver(order.dst, adopt, t2))

        def adopt(unit, t):
            s = unit.scheduler
            if len(s.running) < s.max_num_seqs and unit.bm.can_allocate(order.request_id, request.num_computed_tokens):
                unit.bm.allocate(order.request_id, request.num_computed_tokens)
                s.running.append(request)
            else:
                unit.bm.free(order.request_id)
                s.preempt(request)
                self.recomputed += 1
            self._end(order, aborted=False)

    def _end(self, order: MigrationOrder, aborted: bool) -> None:
        self.busy -= {order.src, order.dst}
        self.inflight -= 1
        if aborted:
            self.aborted += 1
        else:
            self.completed += 1

    def metrics(self) -> dict:
        return {"migrations_started": self.started, "migrations_completed": self.completed,
                "migrations_aborted": self.aborted, "migrations_recomputed": self.recomputed,
                "migration_bytes": self.bytes}
