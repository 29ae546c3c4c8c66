"""Hardware the simulator charges time for: GPUs, network links, the VMM remap cost.

Every number is a datasheet figure or a measurement of this repository (BENCHMARKS.md), named
where it is defined. All objects are attrs-frozen and validated once at construction.
"""

from __future__ import annotations

import math

import attrs

GiB = 1 << 30


def _positive(_inst, attribute, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{attribute.name} must be a finite number > 0, got {value!r}")


def _non_negative(_inst, attribute, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{attribute.name} must be a finite number >= 0, got {value!r}")


def _fraction(_inst, attribute, value) -> None:
    if not 0 < value <= 1:
        raise ValueError(f"{attribute.name} must be in (0, 1], got {value!r}")


@attrs.frozen
class GPU:
    """One accelerator: memory, dense bf16 peak, HBM bandwidth (datasheet), and the achieved
    fractions of them that the roofline step model uses.

    ``mfu`` / ``mbu`` were read off this repository's H100 measurements (BENCHMARKS.md, issue 4):
    Llama-3-8B decode steps ran at 1.19-1.24x the (weights + KV) / 3.03 TB/s floor, i.e. about
    76% of the 3.35 TB/s datasheet bandwidth, and the 131k-token prefill of the throughput run
    reached about 65% of the bf16 peak. ``host_overhead_s`` is the step's host side (schedule,
    input copy, sampling): 0.35 ms at batch 1 to 1.1 ms at batch 256 in the same measurement,
    hence a fixed part plus ``host_overhead_per_seq_s`` per scheduled request.
    """

    name: str
    hbm_bytes: int = attrs.field(validator=_positive)
    peak_flops: float = attrs.field(validator=_positive)  # dense bf16, FLOP/s
    hbm_bandwidth: float = attrs.field(validator=_positive)  # bytes/s
    nvlink_bandwidth: float = attrs.field(validator=_positive)  # bytes/s per direction, for TP all-reduce
    mfu: float = attrs.field(default=0.65, validator=_fraction)
    mbu: float = attrs.field(default=0.76, validator=_fraction)
    host_overhead_s: float = attrs.field(default=0.35e-3, validator=_non_negative)
    host_overhead_per_seq_s: float = attrs.field(default=3e-6, validator=_non_negative)


# Datasheet figures (SXM parts). H800 = H100 with NVLink cut to 400 GB/s; A800 = A100 with NVLink
# cut to 400 GB/s (the paper's two testbeds).
GPUS: dict[str, GPU] = {
    "h100-80gb": GPU("h100-80gb", 80 * GiB, 989e12, 3.35e12, 450e9),
    "h800-80gb": GPU("h800-80gb", 80 * GiB, 989e12, 3.35e12, 200e9),
    "h200-141gb": GPU("h200-141gb", 141 * 10**9, 989e12, 4.8e12, 450e9),
    "a100-80gb": GPU("a100-80gb", 80 * GiB, 312e12, 2.04e12, 300e9),
    "a800-80gb": GPU("a800-80gb", 80 * GiB, 312e12, 2.04e12, 200e9),
}


@attrs.frozen
class Link:
    """A point-to-point link class: bandwidth per direction (full duplex) and one-way latency.
    Between instances every transfer (activations, KV exchange, weight restore, migration)
    goes over one link of this class per GPU of the instance (one NIC per GPU)."""

    name: str
    bandwidth: float = attrs.field(validator=_positive)  # bytes/s per direction
    latency_s: float = attrs.field(validator=_non_negative)

    def seconds(self, nbytes: float, lanes: int = 1) -> float:
        """Time to move ``nbytes`` over ``lanes`` parallel links (0 for nothing)."""
        return 0.0 if nbytes <= 0 else self.latency_s + nbytes / (self.bandwidth * lanes)


LINKS: dict[str, Link] = {
    "nvlink": Link("nvlink", 450e9, 2e-6),  # H100 NVLink 4, 900 GB/s bidirectional
    "rdma-200": Link("rdma-200", 25e9, 5e-6),  # 200 Gbps InfiniBand / RoCE (the paper's A800 testbed)
    "rdma-400": Link("rdma-400", 50e9, 5e-6),  # 400 Gbps (the paper's H800 testbed)
    "pcie-gen4": Link("pcie-gen4", 25e9, 10e-6),  # x16, effective; the host swap path
    "pcie-gen5": Link("pcie-gen5", 50e9, 10e-6),
    # gloo over loopback between CPU ranks of this VM: a control round trip is ~0.1 ms and
    # copies run at memory speed; only used to model the validation runs.
    "loopback": Link("loopback", 2e9, 50e-6),
}


@attrs.frozen
class VMMCost:
    """Remapping weight chunks into the KV range (drop) or back (restore): a cost per chunk.

    Default from BENCHMARKS.md (issue 3, H100, cuda-bindings): 16 GiB in 32 chunks of 512 MiB
    dropped in 2.784 ms (median), i.e. 87 us per chunk; the cost is per driver call, not per byte.
    """

    chunk_bytes: int = attrs.field(default=512 << 20, validator=_positive)
    seconds_per_chunk: float = attrs.field(default=2.784e-3 / 32, validator=_non_negative)

    def seconds(self, nbytes: int) -> float:
        return math.ceil(nbytes / self.chunk_bytes) * self.seconds_per_chunk if nbytes > 0 else 0.0


def lookup(table: dict, name: str, what: str):
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {what} {name!r}; choose from {sorted(table)}") from None
