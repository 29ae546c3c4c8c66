"""Request arrivals for the benchmarks: Azure LLM inference traces and synthetic bursty traffic.

A ``Trace`` is arrival offsets (seconds from the window start) with prompt and output lengths.
It comes from a CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``, see kunserve/data/traces/README.md) or
from a synthetic generator (gamma inter-arrivals; BurstGPT-like on/off bursts), can be cut to a
time window, upscaled while keeping its temporal pattern, scaled to a target mean KV demand, and
turned into ``WorkItem``s for the HTTP load client.
"""

from __future__ import annotations

import csv
import math
import random
from datetime import datetime
from pathlib import Path

import attrs


COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
# The Azure traces ship inside the package (kunserve/data/traces), so they resolve from an
# installed kunserve too, whatever the working directory.
TRACE_DIR = Path(__file__).resolve().parents[1] / "data" / "traces"


@attrs.frozen
class WorkItem:
    delay_s: float  # send time relative to the start
    prompt: list[int]
    max_tokens: int


class TraceFormatError(ValueError):
    """A malformed trace file; the message names the file, line and column."""


@attrs.frozen
class Trace:
    arrivals: tuple[float, ...]  # seconds from the window start, sorted
    prompt_lens: tuple[int, ...]
    output_lens: tuple[int, ...]
    duration_s: float  # the window length (>= last arrival), so rates stay right for sparse tails

    def __len__(self) -> int:
        return len(self.arrivals)

    @property
    def mean_rate(self) -> float:
        return len(self) / self.duration_s if self.duration_s > 0 else math.inf


def _from_rows(rows: list[tuple[float, int, int]], duration_s: float | None = None) -> Trace:
    rows = sorted(rows, key=lambda r: r[0])
    arrivals = tuple(r[0] for r in rows)
    span = duration_s if duration_s is not None else (arrivals[-1] if arrivals else 0.0)
    return Trace(arrivals, tuple(r[1] for r in rows), tuple(r[2] for r in rows), span)


# --- CSV ------------------------------------------------------------------------------------------

def resolve_trace_path(path: str | Path) -> Path:
    """``path`` as given, else a trace of that file name shipped in kunserve/data/traces."""
    for candidate in (Path(path), TRACE_DIR / Path(path).name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"trace file {str(path)!r} not found (looked in the working directory and {TRACE_DIR}); the Azure traces "
        f"ship in kunserve/data/traces/ (source: github.com/Azure/AzurePublicDataset)")


def _parse_timestamp(text: str) -> datetime:
    # 7 fractional digits (100 ns ticks); strptime's %f takes at most 6, so drop the last one
    date, _, frac = text.partition(".")
    if frac and not frac.isdigit():
        raise ValueError(f"bad fractional seconds {frac!r}")
    return datetime.strptime(f"{date}.{(frac or '0')[:6]}", "%Y-%m-%d %H:%M:%S.%f")


def _parse_count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("negative token count")
    return value


def load_trace(path: str | Path) -> Trace:
    """Read an Azure-format trace; arrivals are relative to the first row's timestamp."""
    path = resolve_trace_path(path)
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:3]] != list(COLUMNS):
            raise TraceFormatError(f"{path}:1: expected header {','.join(COLUMNS)}, got {header}")
        parsed = [_parse_row(path, reader.line_num, row) for row in reader if row]
    if not parsed:
        raise TraceFormatError(f"{path}: no rows after the header")
    t0 = min(p[0] for p in parsed)
    return _from_rows([((ts - t0).total_seconds(), ctx, gen) for ts, ctx, gen in parsed])


def _parse_row(path: Path, line: int, row: list[str]) -> tuple[datetime, int, int]:
    if len(row) < len(COLUMNS):
        raise TraceFormatError(f"{path}:{line}: expected {len(COLUMNS)} columns, got {len(row)}: {row}")
    parsers = (_parse_timestamp, _parse_count, _parse_count)
    values = []
    for col, (name, parse, text) in enumerate(zip(COLUMNS, parsers, row), start=1):
        try:
            values.append(parse(text.strip()))
        except ValueError as e:
            raise TraceFormatError(f"{path}:{line}: column {col} ({name}): cannot parse {text!r}: {e}") from None
    return tuple(values)


# --- shaping --------------------------------------------------------------------------------------

def window(trace: Trace, start_s: float = 0.0, duration_s: float | None = None) -> Trace:
    """Requests arriving in [start_s, start_s + duration_s), re-based to start at 0."""
    end = math.inf if duration_s is None else start_s + duration_s
    rows = [(a - start_s, p, o) for a, p, o in zip(trace.arrivals, trace.prompt_lens, trace.output_lens)
            if start_s <= a < end]
    span = duration_s if duration_s is not None else max(trace.duration_s - start_s, 0.0)
    return _from_rows(rows, span)


def clip_lengths(trace: Trace, max_model_len: int, token_scale: float = 1.0) -> Trace:
    """Scale lengths (to fit long-context traces onto a small model), then clip so that
    prompt + output <= max_model_len, keeping at least one prompt and one output token."""
    prompts, outputs = [], []
    for p, o in zip(trace.prompt_lens, trace.output_lens):
        p = min(max(1, round(p * token_scale)), max_model_len - 1)
        prompts.append(p)
        outputs.append(min(max(1, round(o * token_scale)), max_model_len - p))
    return attrs.evolve(trace, prompt_lens=tuple(prompts), output_lens=tuple(outputs))


def mean_demand_tokens(trace: Trace, decode_tps: float) -> float:
    """Time-averaged KV demand (tokens) over the trace window.

    A request is live from its arrival for ``output / decode_tps`` seconds while its tokens grow
    linearly from ``prompt`` to ``prompt + output``; its token-seconds are
    ``d * (prompt + output / 2)``. Queueing is ignored on purpose: this is the offered load.
    """
    if trace.duration_s <= 0:
        raise ValueError("trace window has zero duration")
    total = sum((o / decode_tps) * (p + o / 2) for p, o in zip(trace.prompt_lens, trace.output_lens))
    return total / trace.duration_s


def upscale(trace: Trace, factor: float, mode: str = "compress", seed: int = 0) -> Trace:
    """Multiply the load by ``factor`` keeping the temporal pattern.

    ``compress`` divides arrival times (the same curve, ``factor`` times faster); ``replicate``
    keeps the clock and sends ``factor`` copies of each request on average (floor(factor) copies
    plus one more with probability frac(factor)), so per-window rates scale by ``factor``.
    """
    if factor <= 0:
        raise ValueError(f"upscale factor must be > 0, got {factor}")
    rows = list(zip(trace.arrivals, trace.prompt_lens, trace.output_lens))
    if mode == "compress":
        return _from_rows([(a / factor, p, o) for a, p, o in rows], trace.duration_s / factor)
    if mode != "replicate":
        raise ValueError(f"upscale mode must be 'compress' or 'replicate', got {mode!r}")
    rng = random.Random(seed)
    whole, frac = int(factor), factor - int(factor)
    out = [row for row in rows for _ in range(whole + (rng.random() < frac))]
    return _from_rows(out, trace.duration_s)


def scale_to_demand(trace: Trace, capacity_tokens: float, target_fraction: float, decode_tps: float,
                    mode: str = "compress", seed: int = 0) -> tuple[Trace, float]:
    """Upscale (or downscale) so the mean demand is ``target_fraction`` of ``capacity_tokens``.

    Mean demand is linear in the factor for both modes (compress shortens the window, replicate
    multiplies the requests), so one division finds it. Returns the trace and the factor.
    """
    current = mean_demand_tokens(trace, decode_tps)
    if current <= 0:
        raise ValueError("trace has no demand to scale")
    factor = target_fraction * capacity_tokens / current
    return upscale(trace, factor, mode, seed), factor


# --- synthetic arrivals ---------------------------------------------------------------------------

def gamma_arrivals(num: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """``num`` arrival times with gamma inter-arrivals of mean 1/rate (vLLM's convention:
    shape = burstiness, scale = 1 / (rate * burstiness); 1 is Poisson, < 1 is burstier)."""
    if rate == math.inf:
        return [0.0] * num
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(num):
        out.append(t)
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
    return out


def onoff_arrivals(num: int, base_rate: float, burst_rate: float, off_s: float, on_s: float,
                   burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """BurstGPT-like on/off traffic: ``off_s`` seconds at ``base_rate``, then ``on_s`` seconds at
    ``burst_rate``, repeated, until ``num`` arrivals. Inside a phase inter-arrivals are gamma."""
    rng, t, out = random.Random(seed), 0.0, []
    phase_end, bursting = off_s, False
    while len(out) < num:
        rate = burst_rate if bursting else base_rate
        gap = rng.gammavariate(burstiness, 1.0 / (rate * burstiness)) if rate > 0 else math.inf
        if t + gap >= phase_end:
            # memoryless enough for a benchmark: restart the draw in the next phase
            t, bursting = phase_end, not bursting
            phase_end = t + (on_s if bursting else off_s)
            continue
        t += gap
        out.append(t)
    return out


def synthetic_trace(arrivals: list[float], input_len: int, output_len: int, len_jitter: float = 0.0,
                    seed: int = 0) -> Trace:
    """Lengths uniform in ``len * [1 - len_jitter, 1 + len_jitter]`` (at least 1)."""
    rng = random.Random(seed + 1)

    def draw(n: int) -> int:
        return max(1, round(n * rng.uniform(1 - len_jitter, 1 + len_jitter)))

    rows = [(a, draw(input_len), draw(output_len)) for a in arrivals]
    span = arrivals[-1] if arrivals else 0.0
    return _from_rows(rows, span)


def to_work_items(trace: Trace, vocab_size: int, seed: int = 0) -> list[WorkItem]:
    """Random prompt token ids (ids below 10 are left to special tokens)."""
    rng = random.Random(seed)
    return [WorkItem(a, [rng.randrange(10, vocab_size) for _ in range(p)], o)
            for a, p, o in zip(trace.arrivals, trace.prompt_lens, trace.output_lens)]


def rate_per_window(arrivals, window_s: float, duration_s: float) -> list[float]:
    """Requests per second in consecutive windows of ``window_s`` over [0, duration_s]."""
    bins = [0] * max(1, math.ceil(duration_s / window_s))
    for a in arrivals:
        bins[min(int(a // window_s), len(bins) - 1)] += 1
    return [b / window_s for b in bins]
