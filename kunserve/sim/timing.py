"""How long a step takes: a forward-pass cost model, and the pipeline around it.

Two cost models, one interface (``batch_seconds`` for any batch, ``decode_seconds`` for a
batch of one-token chunks, vectorised over steps so fast-forwarding can price a whole stretch
with a few numpy operations):

- ``FittedCost``: the fitted ``kunserve.policy.cost_model.CostModel`` of a profile JSON
  (``python -m kunserve.profile``). Its decode form is *probed* from ``CostModel.batch_cost``
  itself (three calls on the model without its weight-read floor, which is then added back
  in closed form), not re-derived from the formula, and checked once on random decode batches
  below and above the floor's knee: the simulator prices steps with the very object the
  lookahead batcher uses.
- ``RooflineCost``: datasheet FLOPs / bandwidth of the instance's GPUs with achieved fractions
  (``hardware.GPU``); linear layers and attention are each ``max(compute, memory)``, tensor
  parallelism adds two ring all-reduces per layer over NVLink.

``PipelineTiming`` turns a cost model into a unit's step time: one stage per member holding a
share of the layers, micro-batches flowing through the stages (a flow shop: micro-batch ``m``
enters stage ``s`` when it left stage ``s - 1`` and stage ``s`` finished micro-batch
``m - 1``), activations hopping between members over the link, plus the host's per-step
overhead. The idle stage time inside a step is the pipeline bubble.

With ``request_sets`` (the runtime's overlapped groups) the flow shop does not restart at every
step: ``StageClocks.launch`` pushes one step's micro-batches through stages whose free times
carry over from the steps launched before, and returns when stage 0 is done and when the
result is back at the leader; the ``Unit`` decides which step to launch and which
result to collect, as ``LLMEngine._overlapped_step`` does.
"""

from __future__ import annotations

import math
import random
from typing import NamedTuple, Protocol, Sequence

import attrs
import numpy as np

from kunserve.policy.cost_model import ChunkWork, CostModel, Profile
from kunserve.sim.hardware import GPU, Link
from kunserve.sim.model import ModelShape


class Work(NamedTuple):
    """A chunk as the cost models read it (``ChunkWork`` without the request id and the
    validation, for the hot path of units that do not micro-batch)."""

    prefix: int
    num_tokens: int

    @property
    def end(self) -> int:
        """``ChunkWork.end``: the longest-context term of ``CostModel.shape`` reads it."""
        return self.prefix + self.num_tokens


class StepCost(Protocol):
    """Seconds of one forward pass over the whole model (one instance)."""

    def batch_seconds(self, chunks: Sequence[ChunkWork]) -> float: ...

    def decode_seconds(self, num_seqs, prefix_sum): ...  # elementwise over numpy arrays


@attrs.frozen
class FittedCost:
    """A fitted ``CostModel``; ``scale`` multiplies every time (e.g. CPU contention measured in a
    calibration run).

    Invariant (checked at construction): for one-token chunks the model is
    ``decode(R, P) = c1 + v (R - 1) + s P + floor max(0, 1 - R / knee_tokens)`` in the number of
    chunks ``R`` and their total prefix ``P``. ``c1``, ``v`` and ``s`` are read from
    ``batch_cost`` of the model with ``floor = 0``, where it is affine; the floor (the only
    term of the model that bends in ``R`` for one-token chunks) is added back in closed form. The
    longest-context term ``h`` never applies: it needs a chunk of more than one token.
    """

    cost_model: CostModel
    scale: float = 1.0
    _c1: float = attrs.field(init=False, repr=False)
    _v: float = attrs.field(init=False, repr=False)
    _s: float = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"scale must be a finite number > 0, got {self.scale}")
        # without the floor every term is affine in (R, P) for one-token chunks, so three
        # probes determine it; probing the floored model would fit the floor's slope below the
        # knee and extrapolate it past the knee, where the floor is 0 (under-pricing big batches)
        cost = attrs.evolve(self.cost_model, floor=0.0).batch_cost
        one = cost([ChunkWork("a", 0, 1)])
        two = cost([ChunkWork("a", 0, 1), ChunkWork("b", 0, 1)])
        slope = cost([ChunkWork("a", 1, 1)]) - one
        object.__setattr__(self, "_c1", one)
        object.__setattr__(self, "_v", two - one)
        object.__setattr__(self, "_s", slope)
        self._check_decode_form()

    def _check_decode_form(self) -> None:
        """Random decode batches on both sides of the floor's knee, against ``batch_cost``."""
        rng = random.Random(0)
        for size in (37, self.cost_model.knee_tokens + 37):
            probe = [ChunkWork(str(i), rng.randrange(0, 4096), 1) for i in range(size)]
            expected = self.cost_model.batch_cost(probe)
            got = float(self._raw_decode(len(probe), sum(c.prefix for c in probe)))
            if abs(got - expected) > 1e-9 * max(1.0, abs(expected)):
                raise ValueError(f"the cost model's one-token form is not c1 + v (R - 1) + s P + floor: "
                                 f"{got} != {expected} at {size} chunks; fast-forwarding cannot price "
                                 f"decode stretches")

    @classmethod
    def from_profile(cls, path: str, scale: float = 1.0) -> tuple["FittedCost", int, str]:
        """(cost, MIN tokens, device) of a profile JSON."""
        profile = Profile.from_json(path)
        return cls(profile.cost_model, scale), profile.min_tokens, profile.device

    def _raw_decode(self, num_seqs, prefix_sum):
        """Unscaled seconds of one-token steps; ``num_seqs``, ``prefix_sum``: [steps] arrays or
        scalars, result alike."""
        m = self.cost_model
        # one-token chunks: the batch's tokens T are its R chunks, so the floor bends in R only
        floor = m.floor * np.maximum(0.0, 1.0 - num_seqs / m.knee_tokens) if m.floor else 0.0
        return self._c1 + self._v * (num_seqs - 1) + self._s * prefix_sum + floor

    def decode_seconds(self, num_seqs, prefix_sum):
        return self.scale * self._raw_decode(num_seqs, prefix_sum)

    def batch_seconds(self, chunks: Sequence[ChunkWork]) -> float:
        return self.scale * self.cost_model.batch_cost(chunks)


@attrs.frozen
class RooflineCost:
    """Datasheet roofline of one instance (``tp`` GPUs with tensor parallelism).

    Per step: linear layers ``max(2 W N / (tp F mfu), W_bytes / (tp B mbu))`` with ``W`` the
    layer weights (+ the lm_head for each chunk's sampled row), attention ``max(4 H d L Σ c(p +
    (c+1)/2) / (tp F mfu), KV read + write / (tp B mbu))``, and with ``tp > 1`` two ring
    all-reduces of the hidden states per layer over NVLink (latency + 2 (tp-1)/tp bytes / bw).
    """

    shape: ModelShape
    gpu: GPU
    tp: int = 1
    allreduce_latency_s: float = 8e-6  # NCCL ring latency floor per call on NVLink

    def __attrs_post_init__(self) -> None:
        if self.tp < 1:
            raise ValueError(f"tp must be >= 1, got {self.tp}")

    def _parts(self, tokens, rows, attn_units, kv_tokens):
        """Seconds for ``tokens`` new tokens, ``rows`` sampled rows, ``attn_units`` = Σ c (p +
        (c+1)/2) and ``kv_tokens`` = tokens whose KV is read or written (elementwise)."""
        s, g, tp = self.shape, self.gpu, self.tp
        flops_rate = tp * g.peak_flops * g.mfu
        byte_rate = tp * g.hbm_bandwidth * g.mbu
        vocab_h = s.config.vocab_size * s.hidden_size
        linear = np.maximum(
            (s.params_per_token_flops() * tokens + 2.0 * vocab_h * rows) / flops_rate,
            (s.num_layers * s.layer_params + vocab_h) * s.dtype_bytes / byte_rate)
        heads_dim = s.config.num_heads * s.config.head_dim
        attention = np.maximum(4.0 * heads_dim * s.num_layers * attn_units / flops_rate,
                               s.kv_bytes_per_token * kv_tokens / byte_rate)
        comm = 0.0
        if tp > 1:
            per_call = tokens * s.hidden_size * s.dtype_bytes * 2 * (tp - 1) / tp / g.nvlink_bandwidth
            comm = 2 * s.num_layers * (self.allreduce_latency_s + per_call)
        return linear + attention + comm

    def decode_seconds(self, num_seqs, prefix_sum):
        # one-token chunks: attention units Σ (p + 1); KV read p + 1 and written 1 per chunk
        return self._parts(num_seqs, num_seqs, prefix_sum + num_seqs, prefix_sum + 2 * num_seqs)

    def batch_seconds(self, chunks: Sequence[ChunkWork]) -> float:
        tokens = sum(c.num_tokens for c in chunks)
        attn = sum(c.num_tokens * (c.prefix + (c.num_tokens + 1) / 2) for c in chunks)
        kv = sum(c.prefix + c.num_tokens for c in chunks) + tokens
        return float(self._parts(tokens, len(chunks), attn, kv))


def synthetic_profile(cost: StepCost, max_context: int = 8192, max_batch_tokens: int = 8192,
                      seed: int = 0) -> tuple[CostModel, int]:
    """A ``CostModel`` fitted to ``cost`` over the profiler's own batch grid, and MIN tokens read
    off its throughput sweep, exactly as ``python -m kunserve.profile`` derives them from
    measurements (with the floor and longest-context terms, as the profiler's default fit): what
    the lookahead batcher needs when the clock is a roofline. On the Qwen-2.5-14B / H100 roofline
    its mean relative error over the grid is 1.4% (the additive form's: 12.6%)."""
    from kunserve.policy.cost_model import BatchSample
    from kunserve.policy.profile_grid import GridSpec, make_grid, min_tokens_from_sweep

    spec = GridSpec(max_context, max_batch_tokens, 256, 64 * max_context, 16)
    samples = [BatchSample([ChunkWork(str(i), p, c) for i, (p, c) in enumerate(chunks)],
                           cost.batch_seconds([ChunkWork(str(i), p, c) for i, (p, c) in enumerate(chunks)]), kind)
               for kind, chunks in make_grid(spec, 320, seed)]
    return CostModel.fit(samples, floor=True, context=True), min_tokens_from_sweep(samples, 0.9)


@attrs.frozen
class StepTime:
    """A step's wall time and the stage-seconds its members computed (``busy``) and idled
    (``bubble``: members x compute makespan - busy)."""

    seconds: float
    busy: float
    bubble: float


@attrs.frozen
class PipelineTiming:
    """Step time of a unit whose members hold ``fractions`` of the layers (one member: (1.0,)).

    ``hop``: the link between consecutive members (activations of ``act_bytes_per_token``
    bytes per token, over ``lanes`` parallel links); ``overhead_s`` + ``overhead_per_seq_s`` x
    scheduled requests: the leader's host work per step.

    ``overlap=False`` is the runtime as built (``runtime/pipeline.py``): a step's micro-batches
    flow through the stages, but the next step starts only when the last one is back, so fill
    and drain are bubbles. ``overlap=True`` models a pipelined engine that keeps consecutive
    steps in flight (vLLM's virtual engines): the next step's micro-batches fill those bubbles,
    so a step costs its bottleneck stage's busy time, or one micro-batch's trip through every
    stage if that is longer; decode steps are split into one micro-batch per stage (by request
    count, prefix shares proportional) so every stage has work. ``request_sets`` (with
    ``overlap``) replaces that steady state for groups by the runtime's own stepping: the ``Unit``
    launches one request set's step per iteration into ``StageClocks`` and collects the oldest.
    """

    cost: StepCost
    fractions: tuple[float, ...] = (1.0,)
    hop: Link | None = None
    act_bytes_per_token: int = 0
    lanes: int = 1
    overhead_s: float = 0.0
    overhead_per_seq_s: float = 0.0
    overlap: bool = False
    # with overlap: step the group by request sets, iteration by iteration (``launch``; the Unit
    # drives it) instead of the analytic steady state of ``step_seconds`` / ``decode_seconds``
    request_sets: bool = False

    def __attrs_post_init__(self) -> None:
        if not self.fractions or abs(sum(self.fractions) - 1.0) > 1e-9:
            raise ValueError(f"stage fractions must sum to 1, got {self.fractions}")
        if len(self.fractions) > 1 and self.hop is None:
            raise ValueError("a pipeline of several members needs a link between them")
        if self.request_sets and not self.overlap:
            raise ValueError("request sets are how an overlapped pipeline steps: set overlap=True")

    @property
    def steps_by_sets(self) -> bool:
        """True for a group of >= 2 members stepped as the runtime's request sets (a single
        instance has nothing to overlap and keeps the plain step)."""
        return self.request_sets and self.stages > 1

    @property
    def stages(self) -> int:
        return len(self.fractions)

    def hop_seconds(self, tokens):
        """Activation transfer of ``tokens`` tokens to the next member (elementwise)."""
        return self.hop.latency_s + tokens * self.act_bytes_per_token / (self.hop.bandwidth * self.lanes)

    def host_seconds(self, num_seqs):
        """The leader's host work for a step of ``num_seqs`` scheduled requests (elementwise)."""
        return self.overhead_s + self.overhead_per_seq_s * num_seqs

    def _decode_parts(self, num_seqs, prefix_sum):
        """(step seconds without host work, busy member-seconds) of one-token steps (elementwise)."""
        g = self.stages
        if g == 1:
            busy = self.cost.decode_seconds(num_seqs, prefix_sum)
            return busy, busy
        if not self.overlap:
            busy = self.cost.decode_seconds(num_seqs, prefix_sum)
            return busy + (g - 1) * self.hop_seconds(num_seqs), busy
        num_seqs = np.asarray(num_seqs)
        total, longest = 0.0, 0.0
        for m in range(g):  # micro-batch m holds every g-th request
            size = (num_seqs + (g - 1 - m)) // g
            part = np.where(size > 0, self.cost.decode_seconds(np.maximum(size, 1), prefix_sum * size / num_seqs), 0.0)
            total = total + part
            longest = np.maximum(longest, np.where(size > 0, part + (g - 1) * self.hop_seconds(size), 0.0))
        return np.maximum(max(self.fractions) * total, longest), total

    def decode_seconds(self, num_seqs, prefix_sum):
        """A step of one-token chunks (elementwise over steps); the stages' shares of one
        forward add up to the whole forward."""
        return self._decode_parts(num_seqs, prefix_sum)[0] + self.host_seconds(num_seqs)

    def decode_busy(self, num_seqs, prefix_sum):
        """Member-seconds of compute in such a step (for the bubble statistics)."""
        return self._decode_parts(num_seqs, prefix_sum)[1]

    def decode_span(self, num_seqs, prefix_sum):
        """Step seconds without the host work (what the stages are held for)."""
        return self._decode_parts(num_seqs, prefix_sum)[0]

    def step_seconds(self, micro_batches: Sequence[Sequence[ChunkWork]], num_seqs: int) -> StepTime:
        """Flow-shop makespan of ``micro_batches`` (in pipeline order) plus the host overhead;
        with ``overlap`` the bottleneck stage or the longest single trip instead."""
        g = self.stages
        finish = [0.0] * g  # finish[s]: when stage s finished the previous micro-batch
        busy, longest = 0.0, 0.0
        for mb in micro_batches:
            whole = self.cost.batch_seconds(mb)
            hop = self.hop_seconds(sum(c.num_tokens for c in mb)) if g > 1 else 0.0
            ready = 0.0  # when this micro-batch's activations reach stage s
            for s, share in enumerate(self.fractions):
                start = max(finish[s], ready)
                finish[s] = start + share * whole
                ready = finish[s] + hop
            busy += whole
            longest = max(longest, whole + (g - 1) * hop)
        span = max(max(self.fractions) * busy, longest) if self.overlap and g > 1 else finish[-1]
        return StepTime(span + self.host_seconds(num_seqs), busy, g * span - busy if g > 1 else 0.0)


@attrs.frozen
class LaunchedStep:
    """A step of an overlapped group, launched into stage 0 and in flight until collected."""

    output: object  # the step's SchedulerOutput: applied (scheduler.update) when collected
    stage0_done: float  # when the leader finished its own layers of every micro-batch
    result_at: float  # the last stage's finish of the last micro-batch + the hop back
    busy: float  # member-seconds computed: the whole forward of each micro-batch


class StageClocks:
    """When each stage of an overlapped group is next free (absolute simulated seconds): what a
    flow shop carries from one step to the next when steps are not drained in between.
    Invariant: ``free[s]`` only grows; stage ``s`` runs micro-batches strictly in launch order."""

    def __init__(self, stages: int):
        self.free = [0.0] * stages

    def launch(self, timing: PipelineTiming, parts, start: float, output=None) -> LaunchedStep:
        """Push one step's micro-batches, ``parts`` = [(whole-forward seconds, tokens)] in order,
        through the stages from ``start`` (when the leader's host work is done). Stage 0 is the
        leader: it computes its share of each micro-batch in turn and sends it on; stage ``s``
        starts a micro-batch when it is free and the activations arrived. An empty step (no
        micro-batches) computes nothing; its result comes back after the last stage's earlier
        work, so results arrive in launch order."""
        free, busy = self.free, 0.0
        stage0_done = start
        for whole, tokens in parts:
            hop = timing.hop_seconds(tokens)
            ready = start
            for s, share in enumerate(timing.fractions):
                free[s] = max(free[s], ready) + share * whole
                ready = free[s] + hop
            stage0_done = free[0]
            busy += whole
        last = free[-1] if parts else max(start, free[-1])
        return LaunchedStep(output, stage0_done, last + timing.hop.latency_s, busy)
