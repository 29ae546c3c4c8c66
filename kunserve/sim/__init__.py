"""A discrete-event cluster simulator that drives kunserve's real policy objects.

    from kunserve.sim import SimConfig, simulate
    run = simulate(SimConfig(policy="kunserve", instances=8), trace)

See docs/simulator.md. Everything it reports is *simulation*: step times come from a fitted
cost model or a GPU roofline, not from hardware.
"""

from kunserve.sim.cluster import ClusterSim, SimRun
from kunserve.sim.config import POLICIES, SimConfig


def simulate(config: SimConfig, trace) -> SimRun:
    """Run ``trace`` (a ``kunserve.bench.traces.Trace``) on the cluster ``config`` describes."""
    return ClusterSim(config, trace).run()


__all__ = ["POLICIES", "ClusterSim", "SimConfig", "SimRun", "simulate"]
