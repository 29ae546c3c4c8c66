"""Profile forward passes on this device and fit the batch cost models (issue 7).

    python -m kunserve.profile [--model builtin|llama3-8b|DIR] [--out profile.json]
                               [--max-context N] [--device auto]

Builds kunserve's own model and paged KV cache (no engine, no scheduler), times real forward
passes (the engine's eager path: Triton attention on CUDA, the reference attention elsewhere)
over a randomised grid of batches, fits ``CostModel`` (with its weight-read floor and
longest-context terms; also the additive model without them and the paper's form, ``g = 0``)
and ``TokenLinearModel`` on a training split, scores them on the held-out rest, derives MIN
tokens, and writes

    {cost_model, cost_model_additive, cost_model_paper, token_linear, min_tokens, device, model,
     errors: {...}, samples: n, whole_grid: {...}, by_target: {...}, ...}

which ``kunserve.policy.cost_model.Profile.from_json`` reads back. ``--samples-out`` saves every
measured batch; ``--refit`` fits saved batches again without measuring.

Timing: every batch is warmed up once, then timed once per pass over ``--repeats`` passes, each
pass in a fresh random order (host speed drifts over seconds; a batch's repeats should not all
land in one phase); per batch the median (or ``--statistic min``). Two targets on CUDA: ``wall``
(until ``torch.cuda.synchronize``) and ``gpu`` (CUDA events behind a GPU sleep that hides the
host's launches); the top-level models fit ``gpu`` where measured (``--target``).

Fit domain: every batch (``--fit-min-tokens N`` restricts the top-level models to batches of
>= N tokens); ``whole_grid`` is always the fit on every batch.

The grid of batches (``kunserve.policy.profile_grid.make_grid``: a throughput sweep, fresh
prefills, decodes over long contexts, mixed and chunked batches), every batch within
``--max-context`` per request and ``--max-batch-tokens`` per batch.
Held-out split: ``--train-fraction`` of each kind trains, the rest scores.

MIN tokens: the smallest sweep size whose throughput (tokens/s) reaches ``--min-fraction``
(default 90%) of the best sweep throughput, i.e. the smallest micro-batch that still keeps
the device nearly saturated; below it the lookahead batcher stops splitting.

What is timed: the model's forward plus the logits of every chunk's last row, over inputs
already built (the host-side input preparation is not included: a pipeline builds it once per
micro-batch while every stage runs the forward). The KV contents of a batch's prefix are
whatever the cache holds; attention costs the same for any values.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import random
import statistics
import tempfile
import time
from pathlib import Path

import attrs
import torch

from kunserve.policy.cost_model import BatchSample
from kunserve.policy.profile_fit import fit_report
from kunserve.policy.profile_grid import GridSpec, make_grid
from kunserve.runtime.forward_harness import ForwardHarness

log = logging.getLogger("kunserve.profile")

_GPU_RESERVE_BYTES = 8 << 30  # left free for activations (an 8K-token Llama-8B batch needs < 2 GiB)


# -- CLI --------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kunserve.profile", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin",
                   help="'builtin' (the tiny generated Llama), a built-in shape such as 'llama3-8b' "
                        "(dummy weights), or a checkpoint directory")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--out", default="profile.json")
    p.add_argument("--samples-out", default=None, help="also write every measured batch here")
    p.add_argument("--refit", default=None, metavar="SAMPLES",
                   help="measure nothing: fit and score the batches saved by --samples-out")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-context", type=int, default=None,
                   help="tokens per request (default 8192 on CUDA, 1024 elsewhere; capped by the model)")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="new tokens per batch (default 8192 on CUDA, 1024 elsewhere)")
    p.add_argument("--max-seqs", type=int, default=256)
    p.add_argument("--num-batches", type=int, default=None,
                   help="random batches besides the sweep (default 320 on CUDA, 120 elsewhere)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--statistic", default="median", choices=["median", "min"],
                   help="per batch; 'min' resists other processes sharing the CPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--target", default="auto", choices=["auto", "wall", "gpu"],
                   help="which timing the top-level models fit (auto: gpu where measured, else wall)")
    p.add_argument("--train-fraction", type=float, default=0.7)
    p.add_argument("--min-fraction", type=float, default=0.9)
    p.add_argument("--fit-min-tokens", type=int, default=None,
                   help="fit the top-level models on batches of at least this many tokens (default: all)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-gib", type=float, default=None,
                   help="KV cache ceiling (default: CUDA free memory less 8 GiB; 1 GiB elsewhere)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="stop measuring after this many seconds and fit what was measured")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("max_seqs", "num_batches", "repeats", "block_size", "fit_min_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            p.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if not 0 < args.train_fraction < 1 or not 0 < args.min_fraction <= 1:
        p.error("--train-fraction must be in (0, 1) and --min-fraction in (0, 1]")
    return args


def resolve_model(args: argparse.Namespace, max_context: int, scratch: Path) -> tuple[Path, str, str]:
    """(directory, load format, display name) for ``--model``; generated ones go in ``scratch``."""
    from kunserve.bench._model_configs import MODEL_CONFIGS, write_model_config

    if args.model == "builtin":
        from kunserve.models.tiny import make_tiny_checkpoint

        # Positions up to max_context: the tiny default (512) would cap the profiled contexts.
        path = make_tiny_checkpoint(scratch / "tiny", with_tokenizer=False,
                                    max_position_embeddings=max(512, max_context))
        return path, "auto", "builtin-tiny-llama"
    if args.model in MODEL_CONFIGS:
        return write_model_config(args.model, scratch / args.model), "dummy", args.model
    return Path(args.model), args.load_format, args.model


def _kv_token_budget(args, device: torch.device, kv_bytes_per_token: int) -> int:
    if args.kv_gib is not None:
        budget = int(args.kv_gib * (1 << 30))
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free - _GPU_RESERVE_BYTES
    else:
        budget = 1 << 30
    return budget // kv_bytes_per_token


TARGETS = {"wall": "seconds", "gpu": "gpu_seconds"}  # what a model is fitted to -> sample field


def samples_for(target: str, saved: list[dict]) -> list[BatchSample]:
    """The saved batches as ``BatchSample`` s timed by ``target`` (those that have that time)."""
    field = TARGETS[target]
    return [BatchSample.from_dict({**d, "seconds": d[field]}) for d in saved if d.get(field) is not None]


def run(args: argparse.Namespace) -> dict:
    """Measure (or, with ``--refit``, load) batches, fit and score per target, write ``--out``.

    Targets: ``wall`` is the eager step's wall clock; ``gpu`` (CUDA only) is device time with
    the launch overhead hidden. The top-level models are the ``--target`` one's (default: gpu
    where measured, since the eager path's host floor is not a property of the batch).
    """
    if args.refit:
        saved = json.loads(Path(args.refit).read_text())
        batches, meta = saved["samples"], saved["meta"]
    else:
        batches, meta = measure_device(args)
        if args.samples_out:
            Path(args.samples_out).write_text(json.dumps({"meta": meta, "samples": batches}) + "\n")
    reports = {t: fit_report(samples_for(t, batches), args.train_fraction, args.min_fraction, args.seed,
                             args.fit_min_tokens)
               for t in TARGETS if len(samples_for(t, batches)) >= 12}
    target = args.target if args.target != "auto" else ("gpu" if "gpu" in reports else "wall")
    if target not in reports:
        raise SystemExit(f"no {target!r} timings to fit (measured: {sorted(reports)})")
    result = {
        **reports[target], "target": target, **meta, "by_target": reports,
        "min_tokens_rule": f"smallest sweep batch reaching {args.min_fraction:.0%} of the best sweep throughput",
        "split": {"train_fraction": args.train_fraction, "seed": args.seed, "stratified_by": "kind"},
    }
    if args.refit:
        result["refit_from"] = Path(args.refit).name
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def measure_device(args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Build the harness, time the grid; (batches as dicts, what was measured where)."""
    from kunserve.models import ModelConfig
    from kunserve.runtime.engine import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    max_context = args.max_context or (8192 if cuda else 1024)
    build_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kunserve-profile-") as scratch:  # only until loaded
        model_dir, load_format, name = resolve_model(args, max_context, Path(scratch))
        config = ModelConfig.from_dir(model_dir)
        dtype = resolve_dtype(args.dtype, config.dtype, device)
        harness = ForwardHarness(model_dir, load_format, dtype, device, args.block_size, seed=args.seed)
    if max_context > config.max_position_embeddings:
        log.warning("max context %d exceeds the model's %d positions; using %d", max_context,
                    config.max_position_embeddings, config.max_position_embeddings)
        max_context = config.max_position_embeddings
    kv_per_token = config.num_layers * 2 * config.num_kv_heads * config.head_dim * dtype.itemsize
    # The KV budget is read after the weights are on the device: it is what is left beside them.
    spec = GridSpec(max_context, args.max_batch_tokens or (8192 if cuda else 1024), args.max_seqs,
                    _kv_token_budget(args, device, kv_per_token), args.block_size)
    grid = make_grid(spec, args.num_batches or (320 if cuda else 120), args.seed)
    num_blocks = max(spec.kv_blocks(chunks) for _, chunks in grid)
    harness.allocate_kv(num_blocks)
    build_s = time.perf_counter() - build_start
    log.info("%s on %s (%s): %d batches, KV cache %d blocks (%.2f GiB)", name, device, dtype, len(grid),
             num_blocks, num_blocks * args.block_size * kv_per_token / 2**30)
    measure_start = time.perf_counter()
    measured = measure(harness, grid, args.repeats, args.warmup, args.time_limit, args.seed)
    batches = [m.to_dict(args.statistic) for m in measured]
    meta = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu", "model": name,
        "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "grid": {"max_context": spec.max_context, "max_batch_tokens": spec.max_batch_tokens,
                 "max_seqs": spec.max_seqs, "kv_blocks": num_blocks, "planned": len(grid),
                 "measured": len(batches), "repeats": args.repeats, "warmup": args.warmup, "seed": args.seed},
        "timing": f"per batch, the {args.statistic} over {args.repeats} passes (each pass in a fresh random "
                  f"order) of forward + logits, eager, inputs prepared outside the timed region; wall = "
                  f"until synchronized, gpu = CUDA events after a GPU sleep that hides the host's launches",
        "threads": torch.get_num_threads(),
        # (max - min) / median of a batch's wall times: the noise floor any model's error sits on
        "wall_spread_median": statistics.median(b["spread"] for b in batches) if batches else None,
        "gpu_missing": sum(1 for b in batches if cuda and b["gpu_seconds"] is None),
        "build_s": build_s, "measure_s": time.perf_counter() - measure_start,
    }
    return batches, meta


@attrs.frozen
class Measured:
    """One batch's timings over the passes: wall clock (the eager step as the engine runs it)
    and, on CUDA, device time with the launch overhead hidden."""

    kind: str
    chunks: tuple[tuple[int, int], ...]
    wall: tuple[float, ...]
    device: tuple[float, ...] = ()

    def to_dict(self, statistic: str) -> dict:
        pick = statistics.median if statistic == "median" else min
        return {"kind": self.kind, "chunks": [list(c) for c in self.chunks], "seconds": pick(self.wall),
                "gpu_seconds": pick(self.device) if self.device else None,
                "spread": (max(self.wall) - min(self.wall)) / statistics.median(self.wall)}


def measure(harness: ForwardHarness, grid, repeats: int, warmup: int, time_limit: float | None,
            seed: int = 0) -> list[Measured]:
    """Warm every batch up once (compiling what it needs), then time each batch once per pass,
    ``repeats`` passes, each in a fresh random order: the host's speed drifts over seconds
    (seen on the lent H100: 12 to 27 ms for the same small batch in different phases), and
    spreading a batch's repeats over the whole run keeps one slow phase from biasing it."""
    start = time.perf_counter()
    # On CUDA a timed pass costs ~2.5 warm-ups (the wall run, the GPU sleep, the device run).
    passes_cost = 1 + repeats * (2.5 if harness.cuda else 1.0)
    prepared = []
    for i, (kind, chunks) in enumerate(grid):
        if time_limit is not None and (time.perf_counter() - start) * passes_cost > time_limit:
            log.warning("time limit: measuring %d of %d batches", i, len(grid))
            break
        run = harness.prepare(chunks)
        for _ in range(warmup):
            run()
        harness.sync()
        prepared.append((kind, chunks, run))
    if harness.cuda:
        harness.calibrate_sleep()
    walls = [[] for _ in prepared]
    devices = [[] for _ in prepared]
    rng = random.Random(seed + 2)
    for r in range(repeats):
        order = list(range(len(prepared)))
        rng.shuffle(order)
        for i in order:
            run = prepared[i][2]
            wall, enqueued = harness.wall_seconds(run)
            walls[i].append(wall)
            if harness.cuda and (device := harness.device_seconds(run, enqueued)) is not None:
                devices[i].append(device)
        log.info("pass %d / %d done (%.0f s)", r + 1, repeats, time.perf_counter() - start)
    return [Measured(kind, tuple(chunks), tuple(w), tuple(d))
            for (kind, chunks, _), w, d in zip(prepared, walls, devices)]


def print_summary(result: dict) -> None:
    print(f"profile: {result['model']} on {result['device']} ({result['dtype']}), target {result['target']}, "
          f"{result['samples']} batches ({result['held_out_samples']} held out), MIN tokens {result['min_tokens']}")
    margin = max(1, result["min_tokens"] // 4)
    parts = [(result, "every batch" if result["fit_min_tokens"] <= 1 else "batches >= {} tokens")]
    if result["fit_min_tokens"] > 1:
        parts.append((result["whole_grid"], "every batch"))
    for part, domain in parts:
        e, lower = part["errors"], part["fit_min_tokens"]
        print(f"  fitted on {domain.format(lower)}: {part['train_samples']} training batches")
        rows = [("held out, all", e["held_out"])]
        rows += [(f"held out, >= {n} tokens", e[f"held_out_at_least_{n}_tokens"])
                 for n in sorted({lower, margin} - {1})]
        rows.append(("held out, >= MIN tokens", e["held_out_at_least_min_tokens"]))
        rows += [(f"  all held out: {k}", v) for k, v in e["held_out_by_kind"].items()]
        print(f"    {'mean relative error':<28}  cost model    additive  paper form  token-linear     n")
        for label, v in rows:
            if v["n"]:
                print(f"    {label:<28}  {v['cost_model']:>10.1%}  {v['cost_model_additive']:>10.1%}  "
                      f"{v['cost_model_paper']:>10.1%}  {v['token_linear']:>12.1%}  {v['n']:>4}")
        m = part["cost_model"]
        print(f"    cost model: a={m['a']:.3e} b={m['b']:.3e} f={m['f']:.3e} d={m['d']:.3e} "
              f"lambda={m['lambda']:.3e} g={m['g']:.3e} floor={m['floor']:.3e} knee_tokens={m['knee_tokens']} "
              f"h={m['h']:.3e}")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    result = run(args)
    print_summary(result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
