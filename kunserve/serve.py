"""OpenAI-compatible server: ``torchrun --nproc-per-node N -m kunserve.serve --model PATH``.

Every rank runs one instance. Rank 0 also runs the global manager (``ClusterDriver``: dispatch
and memory monitor) and the HTTP server; ranks >= 1 serve rank 0's step commands. Without
torchrun the same command serves one instance. Control messages travel on a gloo group
(also on GPUs, where the default group is NCCL for tensors).

Shutdown: torchrun forwards SIGINT/SIGTERM to every rank. Rank 0 stops accepting requests,
ends in-flight ones (finished or aborted with an error), then tells the workers to exit;
workers ignore the signal so they cannot leave rank 0 waiting on a dead peer.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist

from kunserve.config import EngineConfig
from kunserve.models import ModelConfig, resolve_model_dir
from kunserve.policy.batching import make_batcher
from kunserve.policy.cost_model import Profile
from kunserve.policy.drop import balanced_cuts
from kunserve.policy.migration import MigrationPlanner, MigrationRules
from kunserve.policy.overload import OverloadRules
from kunserve.runtime.cluster import ClusterDriver
from kunserve.runtime.rank import RankState, run_rank
from kunserve.runtime.drop_controller import DropController, weight_layout_of
from kunserve.runtime.engine import LLMEngine, resolve_device
from kunserve.runtime.migration import MigrationCoordinator
from kunserve.runtime.pipeline import GroupLayout, PipelineRunner, StageWorker
from kunserve.runtime.regroup import DEFAULT_EXCHANGE_CHUNK_BYTES
from kunserve.runtime.transport import activation_group, init_cluster_groups

log = logging.getLogger("kunserve.serve")

# Idle servers send nothing for hours; a control receive must not time out meanwhile.
_CONTROL_TIMEOUT = datetime.timedelta(days=365)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kunserve.serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="local checkpoint directory or cached HF repo id")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="model name in the API (default: --model)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--load-format", default="auto", choices=["auto", "safetensors", "dummy"])
    p.add_argument("--memory", default="auto", choices=["auto", "vmm", "torch"])
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--num-kv-blocks", type=int, default=None)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--policy", default="vllm", choices=["vllm", "vllm-pp", "swap", "llumnix", "kunserve"],
                   help="overload handling: vllm = recompute preemption; vllm-pp = static 2-stage pipelines "
                        "(docs/policy-vllm-pp.md); swap = preempted KV to host memory "
                        "and back (InferCept-style); llumnix = live migration of running requests between "
                        "instances (docs/policy-llumnix.md); kunserve = drop weight replicas")
    p.add_argument("--swap-space-bytes", type=int, default=4 << 30,
                   help="swap: host swap space per instance; a victim that does not fit is recomputed")
    p.add_argument("--swap-bytes-per-step", type=int, default=512 << 20,
                   help="swap: KV bytes swapped in per step at most (beyond: the next step; one always may)")
    p.add_argument("--restore-fraction", type=float, default=0.5,
                   help="kunserve: restore a group when its KV use is below this share of its no-drop capacity")
    p.add_argument("--restore-hold-s", type=float, default=5.0,
                   help="kunserve: a group lives at least this long before it may be restored")
    p.add_argument("--exchange-chunk-bytes", type=_positive_int, default=DEFAULT_EXCHANGE_CHUNK_BYTES,
                   help="kunserve: KV bytes one link carries per exchange round after a merge (about the "
                        "link bandwidth x one pipeline stage's compute time)")
    p.add_argument("--pipeline-size", type=int, default=None,
                   help="ranks per instance: each instance is a static pipeline of this many stages "
                        "(default 2 under --policy vllm-pp, else 1)")
    p.add_argument("--micro-batching", default="none", choices=["none", "token-budget", "lookahead"],
                   help="how a pipeline group splits a step into micro-batches: none = one per step; "
                        "token-budget = Sarathi-style, --micro-batch-tokens each; lookahead = equal-cost halves "
                        "under the fitted cost model of --cost-profile (docs/design-lookahead.md)")
    p.add_argument("--micro-batch-tokens", type=_positive_int, default=None,
                   help="token-budget: tokens per micro-batch (default: --max-num-batched-tokens / 2)")
    p.add_argument("--cost-profile", default=None,
                   help="lookahead: profile JSON written by `python -m kunserve.profile` on this device")
    p.add_argument("--pipeline-overlap", default="on", choices=["on", "off"],
                   help="on: a pipeline keeps one step per stage in flight, stepping its requests in "
                        "that many sets (vLLM's virtual engines); off: lockstep, every step drains the pipeline")
    p.add_argument("--pipeline-step-log", type=Path, default=None, metavar="PATH",
                   help="append one JSON line per pipeline step (leader, wall and per-rank compute seconds, "
                        "tokens, micro-batch sizes) to PATH: where a group's bubble sits")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    if args.micro_batching == "lookahead" and args.cost_profile is None:
        p.error("--micro-batching lookahead needs --cost-profile (run `python -m kunserve.profile --out "
                "profile.json` on the serving device first)")
    if args.pipeline_size is None:
        args.pipeline_size = 2 if args.policy == "vllm-pp" else 1
    return args


def check_policy(args: argparse.Namespace, world_size: int) -> None:
    """Policies that fix the instance shape: vllm-pp needs pipelines that tile the ranks,
    llumnix migrates between whole-model instances."""
    if args.policy == "vllm-pp":
        if args.pipeline_size < 2:
            raise SystemExit(f"--policy vllm-pp runs pipelines of >= 2 stages, got --pipeline-size "
                             f"{args.pipeline_size}")
        if world_size % args.pipeline_size:
            raise SystemExit(f"--policy vllm-pp runs {args.pipeline_size}-stage pipelines, so the number of ranks "
                             f"({world_size}) must be a multiple of {args.pipeline_size}"
                             + (" (an even number)" if args.pipeline_size == 2 else ""))
    if args.policy == "llumnix" and args.pipeline_size != 1:
        raise SystemExit(f"--policy llumnix migrates requests between whole-model instances: use "
                         f"--pipeline-size 1 (got {args.pipeline_size})")


def micro_batcher(args: argparse.Namespace):
    """The pipeline groups' micro-batch policy (None: one micro-batch per step)."""
    if args.micro_batching == "none":
        return None
    if args.micro_batching == "token-budget":
        return make_batcher("token-budget", max_tokens=args.micro_batch_tokens or max(1, args.max_num_batched_tokens // 2))
    profile = Profile.from_json(args.cost_profile)
    return make_batcher("lookahead", cost_model=profile.cost_model, min_tokens=profile.min_tokens)


def engine_config(args: argparse.Namespace, device: torch.device, layer_range=None) -> EngineConfig:
    return EngineConfig(
        layer_range=layer_range,
        model=args.model, dtype=args.dtype, device=str(device), load_format=args.load_format,
        memory=args.memory, block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory_bytes=args.kv_cache_memory_bytes, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        seed=args.seed, preemption_mode="swap" if args.policy == "swap" else "recompute",
        swap_space_bytes=args.swap_space_bytes, swap_bytes_per_step=args.swap_bytes_per_step,
    )


def init_cluster(world_size: int, device: torch.device):
    """Join torchrun's process group; returns the gloo control group (None when alone)."""
    if world_size == 1:
        return None
    if device.type == "cuda":
        # device_id initialises the NCCL communicator eagerly: a lazily created one would need
        # every rank in the first collective, which a KV-exchange round (batch_isend_irecv
        # among one group's members) cannot guarantee.
        dist.init_process_group("nccl", timeout=_CONTROL_TIMEOUT, device_id=device)
    else:
        dist.init_process_group("gloo", timeout=_CONTROL_TIMEOUT)
    return init_cluster_groups(_CONTROL_TIMEOUT)


def rank_device(name: str) -> torch.device:
    device = resolve_device(name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return device


def stage_layers(args: argparse.Namespace, rank: int) -> tuple[int, int] | None:
    """This rank's layer slice in its static pipeline (None: the whole model)."""
    if args.pipeline_size == 1:
        return None
    num_layers = ModelConfig.from_dir(resolve_model_dir(args.model)).num_layers
    if args.pipeline_size > num_layers:
        raise ValueError(f"--pipeline-size {args.pipeline_size} exceeds the model's {num_layers} layers")
    return balanced_cuts(num_layers, args.pipeline_size)[rank % args.pipeline_size]


def build_rank(engine: LLMEngine, rank: int, world_size: int, group, args: argparse.Namespace):
    """Wire a pipelined engine into its group; returns the stage worker of a non-leader."""
    size = args.pipeline_size
    # One pool size for every member (the smallest), so the leader's admission holds on all.
    pool = torch.tensor([engine.block_manager.num_blocks])
    dist.all_reduce(pool, op=dist.ReduceOp.MIN, group=group)
    engine.memory.limit_blocks(int(pool))
    layout = GroupLayout(tuple(range(rank - rank % size, rank - rank % size + size)), group, activation_group())
    if rank == layout.leader:
        engine.runner = PipelineRunner(engine.model, engine.kv_cache, engine.block_manager, engine.scheduler,
                                       engine.device, rank, layout, engine.config.seed, batcher=micro_batcher(args),
                                       overlap=args.pipeline_overlap == "on")
        return None
    return StageWorker(engine.model, engine.kv_cache, engine.block_manager, engine.device, rank, layout,
                       overlap=args.pipeline_overlap == "on")


def serve_rank0(engine: LLMEngine, world_size: int, group, args: argparse.Namespace) -> None:
    from kunserve.serving.api_server import run_server
    from kunserve.serving.async_engine import AsyncEngine

    drop = None
    if args.policy == "kunserve":
        if args.pipeline_size != 1 or engine.memory.unified is None:
            raise SystemExit("--policy kunserve needs --pipeline-size 1 and the VMM allocator (--memory vmm)")
        drop = DropController(weight_layout_of(engine.memory, engine.model_config.num_layers),
                              engine.memory.block_bytes, engine.memory.unified.kv_mapped_bytes,
                              OverloadRules(args.restore_fraction, args.restore_hold_s),
                              exchange_chunk_bytes=args.exchange_chunk_bytes, micro_batcher=micro_batcher(args),
                              pipeline_overlap=args.pipeline_overlap == "on")
    driver = ClusterDriver(engine, world_size, group, args.pipeline_size, drop, step_log=args.pipeline_step_log)
    if args.policy == "llumnix":
        driver.migration = MigrationCoordinator(MigrationPlanner(MigrationRules()))
    client = AsyncEngine(driver)
    # uvicorn handles SIGINT/SIGTERM, then re-raises the signal with the handler it found at
    # start; a no-op handler here keeps that re-raise from killing rank 0 before the workers
    # have been released.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: log.info("signal %d: shutting down", signum))
    log.info("serving %s on http://%s:%d with %d instance(s)", args.model, args.host, args.port, world_size)
    try:
        run_server(client, args.host, args.port, args.served_model_name or args.model)
    finally:
        driver.shutdown()  # the engine thread has exited: release the workers


def main(argv=None) -> None:
    args = parse_args(argv)
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    logging.basicConfig(level=args.log_level.upper(),
                        format=f"%(asctime)s rank{rank} %(name)s %(levelname)s: %(message)s")
    check_policy(args, world_size)
    if args.policy == "swap" and args.pipeline_size != 1:
        raise SystemExit("--policy swap swaps whole-model instances only: use --pipeline-size 1 "
                         f"(got {args.pipeline_size})")
    if world_size % args.pipeline_size:
        raise SystemExit(f"--pipeline-size {args.pipeline_size} must divide the number of ranks ({world_size})")
    if rank == 0 and args.pipeline_step_log is not None:  # fail now, not at the first pipeline step
        try:
            args.pipeline_step_log.open("a").close()
        except OSError as e:
            raise SystemExit(f"--pipeline-step-log {args.pipeline_step_log}: cannot append to it ({e.strerror}); "
                             f"give a file in an existing, writable folder") from None
    device = rank_device(args.device)
    group = init_cluster(world_size, device)
    engine = LLMEngine(engine_config(args, device, stage_layers(args, rank)))
    stage = build_rank(engine, rank, world_size, group, args) if args.pipeline_size > 1 else None
    if rank == 0:
        serve_rank0(engine, world_size, group, args)
        return _finish(world_size, rank)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # rank 0 decides when the cluster stops
    run_rank(RankState(engine, rank, rank // args.pipeline_size, stage, always_step=args.pipeline_size > 1), group)
    _finish(world_size, rank)


def _finish(world_size: int, rank: int) -> None:
    if world_size > 1:
        dist.destroy_process_group()
    log.info("rank %d exited cleanly", rank)


if __name__ == "__main__":
    main()
