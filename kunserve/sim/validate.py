"""Validating the simulator against real runs (``python -m kunserve.bench compare``): multi-rank
CPU clusters of the tiny model, or one GPU serving a Llama-3-8B-shaped model (``--grid gpu``).

    python -m kunserve.bench compare --policies vllm kunserve --ranks 2 ... --out real-w1   # calibration
    python -m kunserve.bench compare --policies vllm kunserve --ranks 2 ... --out real-w2   # validation
    python -m kunserve.profile --model builtin --threads 1 --out tiny-cpu.json
    python -m kunserve.sim.validate --profile tiny-cpu.json --calibrate real-w1 --validate real-w2

The simulated cluster is the real one's: the built-in tiny model, its ``--num-kv-blocks``,
block size, token budget, 2 ranks stepping in lockstep (``ClusterDriver``), the host VMM's 4 KiB
granularity (so drops free what the real drop frees). The workload is rebuilt from the real
run's own arguments (same generator, same seed), so both see the same requests.

What the profile does not contain is the engine's host work around each forward (scheduling,
input tensors, sampling, pickled step messages between the ranks, rank 0's HTTP streaming),
nor how much the two ranks, the server and the load client slow each other down on two shared
cores. Four numbers stand for them (``Calibration``); they are fitted by grid search on the
*calibration* run only, then used unchanged to predict the *validation* run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import attrs

from kunserve.bench._metrics import percentile
from kunserve.bench.workload import build_workload
from kunserve.sim.config import SimConfig

TINY_DIR = Path.home() / ".cache/kunserve/tiny-llama"
QUANTILES = (50, 90, 99)
METRICS = ("ttft", "tpot")


@attrs.frozen
class Calibration:
    time_scale: float = 1.0  # forward time = profile x this (contention on the shared cores)
    step_overhead_s: float = 0.0  # host work per step
    overhead_per_seq_s: float = 0.0  # host work per scheduled request (sampling, detokenize, stream)
    client_latency_s: float = 0.0  # HTTP delivery of each token to the client
    lockstep_overhead_s: float = 0.0  # rank 0's round trip per cluster step
    hop_latency_s: float = 50e-6  # a pipeline hop between ranks (pickled step + hidden states over gloo)
    regroup_overhead_s: float = 0.0  # a merge / split step (re-slice, re-view, manifests)


def load_real(path: str | Path) -> tuple[argparse.Namespace, dict]:
    """(the run's arguments, {policy: {"ttft": [...], "tpot": [...]}}) of a compare.json."""
    data = json.loads((Path(path) / "compare.json").read_text())
    args = argparse.Namespace(**data["args"])
    out = {}
    for policy, requests in data["requests"].items():
        ok = [r for r in requests if r["ok"]]
        out[policy] = {"ttft": [r["ttft"] for r in ok], "tpot": [r["tpot"] for r in ok if r["tpot"] is not None]}
    return args, out


def runtime_overlaps(args: argparse.Namespace) -> bool:
    """Whether the real run's pipeline groups overlapped their steps (``--pipeline-overlap``,
    on by default since 2026-11-24; runs recorded before that were lockstep)."""
    extra = list(getattr(args, "serve_arg", []) or [])
    return not any(a == "--pipeline-overlap=off" or (a == "--pipeline-overlap" and extra[i + 1:i + 2] == ["off"])
                   for i, a in enumerate(extra))


def sim_config(args: argparse.Namespace, policy: str, profile: str, cal: Calibration,
               model: str | Path = TINY_DIR, gpus: tuple[str, str] | None = None) -> SimConfig:
    """The twin of a real run. ``gpus`` = (GPU class, link class) for a run with one instance per
    GPU (``--predict``): CUDA's 2 MiB weight granularity and the runtime's KV-exchange rounds
    (``--exchange-chunk-bytes``, default 32 MB) over that link; None: ranks on this host."""
    extra = {}
    if gpus is not None:
        from kunserve.runtime.regroup import DEFAULT_EXCHANGE_CHUNK_BYTES
        from kunserve.sim.hardware import LINKS

        extra = dict(gpu=gpus[0], link=gpus[1], weight_granularity=2 << 20,
                     exchange_chunk_s=DEFAULT_EXCHANGE_CHUNK_BYTES / LINKS[gpus[1]].bandwidth)
    return SimConfig(**{**_twin_fields(args, policy, profile, cal, model), **extra})


def _twin_fields(args: argparse.Namespace, policy: str, profile: str, cal: Calibration, model) -> dict:
    return dict(
        policy=policy, instances=args.ranks, model=str(model), gpu="h100-80gb", link="loopback", profile=profile,
        time_scale=cal.time_scale, step_overhead_s=cal.step_overhead_s, overhead_per_seq_s=cal.overhead_per_seq_s,
        client_latency_s=cal.client_latency_s, lockstep_overhead_s=cal.lockstep_overhead_s,
        link_latency_s=cal.hop_latency_s, regroup_overhead_s=cal.regroup_overhead_s,
        block_size=args.block_size, max_num_seqs=256,
        max_num_batched_tokens=args.max_num_batched_tokens, num_kv_blocks=args.num_kv_blocks,
        weight_granularity=4096, micro_batching="none", pipeline_overlap=runtime_overlaps(args),
        pipeline_model="sets",  # overlapped groups step by request sets, as the real leader does
        pipeline_scales_limits=False, min_hold_s=args.restore_hold_s,
        exchange_overlap=False, monitor_interval_s=0.01, fast_forward=False, lockstep=True,
        vmm_seconds_per_chunk=0.0)


def simulate_like(args: argparse.Namespace, policy: str, profile: str, cal: Calibration,
                  model: str | Path = TINY_DIR, gpus: tuple[str, str] | None = None) -> dict:
    """{"ttft": [...], "tpot": [...]} of the simulated twin of a real run."""
    from kunserve.sim import simulate

    trace = build_workload(args, None)
    run = simulate(sim_config(args, policy, profile, cal, model, gpus), trace)
    records = [log.record(cal.client_latency_s) for log in run.logs.values()]
    done = [r for r in records if r.ok]
    return {"ttft": [r.ttft for r in done], "tpot": [t for t in (r.tpot for r in done) if t is not None]}


def percentiles(values: dict) -> dict:
    return {f"{m}_p{q}": percentile(values[m], q) for m in METRICS for q in QUANTILES}


def errors(real: dict, sim: dict) -> dict:
    """Relative error of each percentile: (sim - real) / real."""
    r, s = percentiles(real), percentiles(sim)
    return {k: (s[k] - r[k]) / r[k] if r[k] else math.nan for k in r}


def _search(runs: list, profile: str, base: Calibration, grid: dict, policies,
            model: str | Path = TINY_DIR) -> tuple[Calibration, float]:
    """``runs``: (arguments, real percentiles) of each calibration run; the mean is over all."""
    best, best_err = base, math.inf
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        cal = attrs.evolve(base, **dict(zip(keys, values)))
        errs = [abs(e) for args, real in runs for policy in policies if policy in real
                for e in errors(real[policy], simulate_like(args, policy, profile, cal, model)).values()]
        err = sum(errs) / len(errs)
        if err < best_err:
            best, best_err = cal, err
    return best, best_err


def calibrate(runs: list, profile: str, model: str | Path = TINY_DIR, grid: str = "cpu") -> tuple[Calibration, float]:
    """Grid search for the smallest mean |relative error| of the percentiles: first the
    single-instance terms on the vllm runs, then the pipeline terms on every policy's runs."""
    cal, err = _search(runs, profile, Calibration(), INSTANCE_GRIDS[grid], ["vllm"], model)
    policies = sorted({p for _, real in runs for p in real})
    if "kunserve" in policies:
        cal, err = _search(runs, profile, cal, PIPELINE_GRID, policies, model)
    return cal, err


VLLM_GRID = {
    "time_scale": (1.5, 2.0, 2.5, 3.0, 4.0),
    "step_overhead_s": (0.5e-3, 1e-3, 2e-3, 3e-3),
    "overhead_per_seq_s": (0.0, 1e-4, 2e-4, 4e-4, 8e-4),
    "client_latency_s": (0.0, 2e-3, 5e-3, 8e-3),
}
# One GPU: the profile's `gpu` times are the kernels alone; the host adds its per-step work
# (scheduling, input tensors, eager kernel launches, sampling, streaming), and nothing shares the
# device, so the forward's scale stays near 1.
GPU_GRID = {
    "time_scale": (0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.2),
    "step_overhead_s": (2e-3, 4e-3, 6e-3, 8e-3, 10e-3),
    "overhead_per_seq_s": (0.0, 2e-5, 5e-5, 1e-4),
    "client_latency_s": (0.0, 1e-3, 3e-3),
}
INSTANCE_GRIDS = {"cpu": VLLM_GRID, "gpu": GPU_GRID}
PIPELINE_GRID = {
    "hop_latency_s": (1e-3, 2e-3, 4e-3, 6e-3, 8e-3),
    "regroup_overhead_s": (0.0, 0.02, 0.05, 0.1),
}


def table(name: str, real: dict, sims: dict) -> str:
    lines = [f"{name}: real (ms) / simulated (ms) / error"]
    for policy in real:
        r, s, e = percentiles(real[policy]), percentiles(sims[policy]), errors(real[policy], sims[policy])
        cells = [f"{k} {r[k] * 1e3:.1f}/{s[k] * 1e3:.1f}/{e[k]:+.0%}" for k in r]
        lines.append(f"  {policy:>9}: " + "  ".join(cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kunserve.sim.validate", description=__doc__.splitlines()[0])
    p.add_argument("--profile", default=None, help="the served model's profile on the serving device "
                   "(python -m kunserve.profile)")
    p.add_argument("--model", default=str(TINY_DIR), help="the served model: a directory or a built-in shape "
                   "(llama3-8b, ...); default the built-in tiny model")
    p.add_argument("--grid", default="cpu", choices=sorted(INSTANCE_GRIDS),
                   help="calibration grid: cpu (two ranks on shared cores) or gpu (one instance per GPU)")
    p.add_argument("--calibrate", nargs="+", default=[], help="compare output dirs of the calibration runs")
    p.add_argument("--validate", nargs="*", default=[], help="compare output dirs to predict")
    p.add_argument("--predict", nargs="+", default=[], metavar="DIR",
                   help="uncalibrated prediction of runs with one instance per GPU (--gpu, --link): no "
                        "host overheads, roofline clock unless --profile is a file")
    p.add_argument("--gpu", default="h100-80gb", help="GPU class of --predict runs (kunserve.sim.hardware.GPUS)")
    p.add_argument("--link", default="nvlink", help="link class of --predict runs (kunserve.sim.hardware.LINKS)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.predict:
        return _predict(args)
    if not args.calibrate or not args.profile:
        p.error("give --profile FILE --calibrate DIR... (then --validate DIR...), or --predict DIR...")
    cal, err = calibrate([load_real(d) for d in args.calibrate], args.profile, args.model, args.grid)
    print(f"SIMULATION vs real runs. calibration on {args.calibrate}: {cal} (mean |error| {err:.1%})")
    report = {"calibration": attrs.asdict(cal), "calibration_error": err, "calibrated_on": args.calibrate,
              "validated_on": args.validate, "runs": {}}
    for name in [*args.calibrate, *args.validate]:
        run_args, real = load_real(name)
        sims = {policy: simulate_like(run_args, policy, args.profile, cal, args.model) for policy in real}
        print(table(name, real, sims))
        report["runs"][name] = {policy: {"real": percentiles(real[policy]), "sim": percentiles(sims[policy]),
                                         "error": errors(real[policy], sims[policy])} for policy in real}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


def _predict(args) -> int:
    profile = None if args.profile in (None, "roofline") else args.profile
    report = {}
    for name in args.predict:
        run_args, real = load_real(name)
        sims = {policy: simulate_like(run_args, policy, profile, Calibration(), args.model, (args.gpu, args.link))
                for policy in real}
        print(f"SIMULATION (uncalibrated: {args.gpu}, {args.link}, {profile or 'roofline'}) vs real run")
        print(table(name, real, sims))
        report[name] = {policy: {"real": percentiles(real[policy]), "sim": percentiles(sims[policy]),
                                 "error": errors(real[policy], sims[policy])} for policy in real}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
