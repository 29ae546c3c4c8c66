"""The simulator's configuration, validated once, and what it derives: memory per instance,
the step cost model, the micro-batcher.

Memory per instance (``tp`` GPUs): ``tp x (HBM x gpu_memory_utilization - activation reserve)``
minus the weights is the KV cache, in blocks of ``block_size`` tokens (``num_kv_blocks``
overrides it, as ``kunserve.serve --num-kv-blocks`` does). A pipeline member holding a slice of
the layers has that much minus its slice's weights, in blocks of its slice's layers.
"""

from __future__ import annotations

import functools
import math

import attrs

from kunserve.policy.batching import make_batcher
from kunserve.policy.cost_model import CostModel
from kunserve.sim.hardware import GPUS, LINKS, GiB, VMMCost, lookup
from kunserve.sim.model import ModelShape, resolve
from kunserve.sim.timing import FittedCost, PipelineTiming, RooflineCost, synthetic_profile

POLICIES = ("vllm", "vllm-pp", "swap", "llumnix", "kunserve")
MICRO_BATCHING = ("auto", "none", "token-budget", "lookahead")
# how an overlapped pipeline (pipeline_overlap=True) is timed: "sets" steps request sets as the
# runtime does (LLMEngine._overlapped_step: exact, per micro-batch, across steps); "analytic" prices
# each step of the whole group at its steady state (faster: decode stretches fast-forward)
PIPELINE_MODELS = ("sets", "analytic")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@attrs.frozen(kw_only=True)
class SimConfig:
    """Everything one simulation needs besides the workload. Bad values raise ``ValueError``
    naming the field (checked in ``__attrs_post_init__``, once)."""

    policy: str = "kunserve"
    instances: int = 8
    model: str = "qwen2.5-14b"  # a name in kunserve/bench/_model_configs.py or a directory with config.json
    gpu: str = "h100-80gb"
    tp: int = 1  # GPUs per instance (tensor parallel)
    link: str = "rdma-200"  # between instances (one per GPU)
    link_latency_s: float | None = None  # overrides the link class's latency (calibration)
    swap_link: str = "pcie-gen5"
    profile: str | None = None  # fitted cost model JSON (python -m kunserve.profile); None: roofline
    time_scale: float = 1.0  # multiplies fitted step times (CPU contention, from a calibration run)
    step_overhead_s: float | None = None  # host time per step; None: the GPU's
    overhead_per_seq_s: float | None = None
    # engine
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    gpu_memory_utilization: float = 0.9
    activation_reserve_bytes: int = 2 * GiB  # per GPU, for activations / CUDA graphs
    num_kv_blocks: int | None = None  # per instance (or pipeline member); None: from memory
    weight_granularity: int = 2 << 20  # VMM allocation granularity (CUDA: 2 MiB, host memfd: 4 KiB)
    # pipelines
    pipeline_size: int = 2  # vllm-pp stages
    micro_batching: str = "auto"  # auto: lookahead for kunserve groups, token-budget for vllm-pp
    micro_batch_tokens: int | None = None  # token-budget size (default max_num_batched_tokens / 2)
    pipeline_overlap: bool = True  # consecutive steps overlap in a pipeline (timing.PipelineTiming)
    pipeline_model: str = "sets"  # PIPELINE_MODELS: how overlapped pipelines are timed
    # a pipeline of g members has g x max_num_seqs and one max_num_batched_tokens per request set
    # (one budget per virtual engine, as vLLM's pipeline parallelism): with "sets" each step is one
    # set's, with "analytic" a step is all g sets' (g x the tokens); False: one instance's budgets
    pipeline_scales_limits: bool = True
    # swap (InferCept-style)
    swap_space_bytes: int = 4 * GiB
    swap_bytes_per_step: int = 512 << 20
    # kunserve
    restore_fraction: float = 0.5
    min_hold_s: float = 5.0
    max_group_size: int | None = None
    exchange_chunk_s: float = 0.1  # exchange chunk = link bandwidth x this (about one stage time of a burst step)
    exchange_overlap: bool = True  # coordinated exchange: rounds overlap compute (activations first)
    vmm_seconds_per_chunk: float = VMMCost().seconds_per_chunk
    regroup_overhead_s: float = 0.0  # control work of a merge / split besides the remap and transfers
    # simulation
    monitor_interval_s: float = 0.05  # snapshots refresh + policies run at least this often
    sample_interval_s: float = 1.0  # timeline samples for the plots
    fast_forward: bool = True
    lockstep: bool = False  # all units step together (the CPU runtime's ClusterDriver); exact only
    lockstep_overhead_s: float = 0.0  # per cluster step (control round trip)
    client_latency_s: float = 0.0  # added to every token time (HTTP delivery to the client)
    keep_token_times: bool = True
    seed: int = 0

    def __attrs_post_init__(self) -> None:
        _check(self.policy in POLICIES, f"policy must be one of {POLICIES}, got {self.policy!r}")
        _check(self.micro_batching in MICRO_BATCHING,
               f"micro_batching must be one of {MICRO_BATCHING}, got {self.micro_batching!r}")
        _check(self.pipeline_model in PIPELINE_MODELS,
               f"pipeline_model must be one of {PIPELINE_MODELS}, got {self.pipeline_model!r}")
        for name in ("instances", "tp", "block_size", "max_num_seqs", "max_num_batched_tokens", "pipeline_size",
                     "swap_space_bytes", "swap_bytes_per_step", "weight_granularity"):
            _check(isinstance(getattr(self, name), int) and getattr(self, name) >= 1,
                   f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        for name in ("monitor_interval_s", "sample_interval_s", "time_scale", "exchange_chunk_s"):
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and math.isfinite(value) and value > 0,
                   f"{name} must be a finite number > 0, got {value!r}")
        for name in ("min_hold_s", "lockstep_overhead_s", "client_latency_s", "vmm_seconds_per_chunk",
                     "regroup_overhead_s"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)!r}")
        _check(0 < self.gpu_memory_utilization <= 1,
               f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        _check(self.num_kv_blocks is None or self.num_kv_blocks >= 1,
               f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        _check(self.micro_batch_tokens is None or self.micro_batch_tokens >= 1,
               f"micro_batch_tokens must be >= 1, got {self.micro_batch_tokens}")
        _check(self.policy != "vllm-pp" or self.instances % self.pipeline_size == 0,
               f"vllm-pp runs {self.pipeline_size}-stage pipelines: instances ({self.instances}) must be a multiple")
        _check(not (self.lockstep and self.fast_forward),
               "lockstep mode steps every unit together and is exact only: set fast_forward=False")
        lookup(GPUS, self.gpu, "gpu")
        lookup(LINKS, self.link, "link")
        lookup(LINKS, self.swap_link, "swap link")
        if self.profile is None and self.time_scale != 1.0:
            raise ValueError("time_scale scales a fitted profile; the roofline has its own efficiencies")

    # -- derived -------------------------------------------------------------------------------
    @functools.cached_property
    def shape(self) -> ModelShape:
        return resolve(self.model)

    @property
    def gpu_spec(self):
        return GPUS[self.gpu]

    @property
    def link_spec(self):
        link = LINKS[self.link]
        return link if self.link_latency_s is None else attrs.evolve(link, latency_s=self.link_latency_s)

    @property
    def vmm(self) -> VMMCost:
        return VMMCost(seconds_per_chunk=self.vmm_seconds_per_chunk)

    @property
    def full_block_bytes(self) -> int:
        return self.shape.block_bytes(self.block_size)

    def _usable_bytes(self) -> int:
        g = self.gpu_spec
        return self.tp * (int(g.hbm_bytes * self.gpu_memory_utilization) - self.activation_reserve_bytes)

    def kv_bytes_for(self, weight_bytes: int) -> int:
        kv = self._usable_bytes() - weight_bytes
        if kv <= 0:
            raise ValueError(f"{self.shape.name} ({weight_bytes / 1e9:.1f} GB of weights) does not fit {self.tp} x "
                             f"{self.gpu} at gpu_memory_utilization {self.gpu_memory_utilization}")
        return kv

    @functools.cached_property
    def instance_blocks(self) -> int:
        """KV blocks of one whole-model instance."""
        if self.num_kv_blocks is not None:
            return self.num_kv_blocks
        return self.kv_bytes_for(self.shape.weight_bytes) // self.full_block_bytes

    @property
    def kv_mapped_bytes(self) -> int:
        """An instance's KV mapping as the unified allocator holds it (rounded up to granularity)."""
        g = self.weight_granularity
        return -(-self.instance_blocks * self.full_block_bytes // g) * g

    def member_blocks(self, layers: tuple[int, int]) -> int:
        """Blocks of a static pipeline member holding ``layers`` (vllm-pp)."""
        if self.num_kv_blocks is not None:
            return self.num_kv_blocks
        weights = self.shape.weight_layout().slice_bytes(layers)
        return self.kv_bytes_for(weights) // self.shape.block_bytes(self.block_size, layers[1] - layers[0])

    @functools.cached_property
    def cost(self):
        if self.profile is not None:
            cost, _, _ = FittedCost.from_profile(self.profile, self.time_scale)
            return cost
        return RooflineCost(self.shape, self.gpu_spec, self.tp)

    @functools.cached_property
    def batch_model(self) -> tuple[CostModel, int]:
        """(cost model, MIN tokens) for lookahead batching: the profile's, or fitted to the
        roofline over the profiler's grid."""
        if self.profile is not None:
            from kunserve.policy.cost_model import Profile

            profile = Profile.from_json(self.profile)
            return profile.cost_model, profile.min_tokens
        return synthetic_profile(self.cost)

    def overheads(self) -> tuple[float, float]:
        g = self.gpu_spec
        fixed = g.host_overhead_s if self.step_overhead_s is None else self.step_overhead_s
        per_seq = g.host_overhead_per_seq_s if self.overhead_per_seq_s is None else self.overhead_per_seq_s
        return fixed, per_seq

    def timing(self, slices: tuple[tuple[int, int], ...]) -> PipelineTiming:
        fixed, per_seq = self.overheads()
        fractions = tuple(self.shape.slice_fraction(s) for s in slices)
        hop = self.link_spec if len(slices) > 1 else None
        return PipelineTiming(self.cost, fractions, hop, self.shape.hidden_size * self.shape.dtype_bytes, self.tp,
                              fixed, per_seq, self.pipeline_overlap, self.request_sets)

    @property
    def request_sets(self) -> bool:
        """Pipelined units step by request sets (the runtime's overlapped engine)."""
        return self.pipeline_overlap and self.pipeline_model == "sets"

    def micro_batcher(self, for_policy: str):
        """The pipeline groups' micro-batch policy (None: one micro-batch per step)."""
        mode = self.micro_batching
        if mode == "auto":
            mode = "lookahead" if for_policy == "kunserve" else "token-budget"
        if mode == "none":
            return None
        if mode == "token-budget":
            tokens = self.micro_batch_tokens or max(1, self.max_num_batched_tokens // 2)
            return make_batcher("token-budget", max_tokens=tokens)
        cost_model, min_tokens = self.batch_model
        return make_batcher("lookahead", cost_model=cost_model, min_tokens=min_tokens)

    def limits(self, members: int) -> tuple[int, int]:
        """(max_num_seqs, max_num_batched_tokens) of a unit of ``members`` instances. Scaled, a
        group holds one instance's sequences per set; its step token budget is one set's when a
        step is one set's (``request_sets``), else all sets' (the analytic group-wide step)."""
        scale = members if self.pipeline_scales_limits else 1
        step_scale = 1 if members > 1 and self.request_sets else scale
        return self.max_num_seqs * scale, self.max_num_batched_tokens * step_scale

    def exchange_chunk_bytes(self) -> int:
        return max(1, int(self.link_spec.bandwidth * self.tp * self.exchange_chunk_s))
