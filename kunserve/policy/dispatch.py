"""Request dispatch across instances: Llumnix-style load balancing on KV freeness."""

from __future__ import annotations

from kunserve.policy.snapshot import ClusterSnapshot, InstanceSnapshot


def freeness(instance: InstanceSnapshot, pending_blocks: int = 0) -> float:
    """Free KV blocks per running request, after subtracting queued (and just-sent) demand.

    Llumnix's virtual-usage idea: queued requests count as if they already held their blocks,
    so a burst sent in one moment spreads instead of piling onto the instance that looked emptiest.
    """
    free = instance.num_free_blocks - instance.queued_blocks - pending_blocks
    return free / (instance.num_running + 1)


class LoadBalancingDispatcher:
    """Picks the instance with the highest freeness; ties go to the lowest instance id.

    ``pending`` counts blocks dispatched since the instance's last snapshot, so decisions made
    between two snapshots see each other.
    """

    def __init__(self):
        self.pending: dict[int, int] = {}

    def choose(self, snapshot: ClusterSnapshot, request_blocks: int) -> int:
        best = max(
            snapshot.instances,
            key=lambda i: (freeness(i, self.pending.get(i.instance_id, 0)), -i.instance_id),
        )
        self.pending[best.instance_id] = self.pending.get(best.instance_id, 0) + request_blocks
        return best.instance_id

    def observe(self, instance_id: int) -> None:
        """A fresh snapshot of ``instance_id`` arrived: it now counts what was pending."""
        self.pending.pop(instance_id, None)
