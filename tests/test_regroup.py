"""Merging in stages with a coordinated KV exchange, on a real 4-rank torchrun cluster (gloo).

1+1 -> 2 twice, then 2+2 -> 4 (groups merging again), then the split back to singles: the
exchange runs in one-page rounds, so exchanged requests wait while late arrivals run; every
request's greedy tokens must equal the single-instance engine's.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kunserve import LLM, SamplingParams

PROMPTS = [[1 + (5 * i + 11 * j) % 300 for j in range(n)] for i, n in enumerate([3, 9, 14, 6, 21, 11, 5, 17])]
MAX_TOKENS = 24
SCRIPT = Path(__file__).with_name("regroup_cluster.py")


def run_cluster(model_dir: Path, tmp_path: Path, chunk_bytes: int, reversed_pairs: bool = False,
                overlap: bool = True) -> tuple[dict, str]:
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "REGROUP_PROMPTS": json.dumps(PROMPTS),
           "REGROUP_MAX_TOKENS": str(MAX_TOKENS), "REGROUP_REVERSED": "1" if reversed_pairs else "0",
           "REGROUP_OVERLAP": "1" if overlap else "0"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4",
                           str(SCRIPT), str(model_dir), str(out), str(chunk_bytes)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text()), proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def reference(llama_dir):
    llm = LLM(str(llama_dir), num_kv_blocks=96, max_model_len=64)
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
                           use_tqdm=False)
    return {str(i): o.outputs[0].token_ids for i, o in enumerate(outputs)}


def test_pairs_merge_then_merge_again_then_split_token_exact(llama_dir, reference, tmp_path):
    result, log = run_cluster(llama_dir, tmp_path, chunk_bytes=1)  # one page per link per round
    assert result["tokens"] == reference  # every request, token for token
    merges = re.findall(r"drop: groups (\[.*?\]) merge into pipeline (\([\d, ]+\))", log)
    assert merges[:2] == [("[(0,), (1,)]", "(0, 1)"), ("[(2,), (3,)]", "(2, 3)")]
    assert merges[2] == ("[(0, 1), (2, 3)]", "(0, 2, 1, 3)")  # 2 + 2 -> 4, stages inside what each held
    metrics = result["metrics"]
    assert metrics["drops_total"] == 3 and metrics["restores_total"] == 1
    # the exchange really ran in rounds, while queued requests were admitted around it
    rounds = [int(n) for n in re.findall(r"KV exchange done after (\d+) rounds", log)]
    assert len(rounds) == 3 and min(rounds) > 1
    assert metrics["exchanged_requests_total"] > 0 and metrics["exchange_overlapped_requests_total"] > 0
    assert metrics["kv_bytes_exchanged_total"] > 0 and metrics["exchange_stall_seconds_max"] > 0
    # the restore's pull phase: each member took its 3 dropped layers (+ embed/head) back in rounds
    pulled = [int(n) for n in re.findall(r"pulled its dropped weights back in (\d+) rounds while serving", log)]
    assert len(pulled) == 4 and min(pulled) >= 3
    assert log.count("left group (0, 2, 1, 3)") == 4  # every member serves alone again
    assert metrics["restore_bytes_total"] > 0


def test_rank0_as_a_non_leading_stage_through_exchange_pull_and_split_token_exact(llama_dir, reference, tmp_path):
    """Rank 0 drives the cluster and is also a later stage of a pair, then of the 4-group: its
    deferred stage step runs at the start of the next cluster step, so the exchange and pull
    rounds it pairs with its leader's (run when the leader collects the step) cannot deadlock."""
    result, log = run_cluster(llama_dir, tmp_path, chunk_bytes=1, reversed_pairs=True)
    assert result["tokens"] == reference
    merges = re.findall(r"drop: groups (\[.*?\]) merge into pipeline (\([\d, ]+\))", log)
    assert merges[:2] == [("[(0,), (1,)]", "(1, 0)"), ("[(2,), (3,)]", "(3, 2)")]
    assert merges[2][1] == "(1, 3, 0, 2)"  # rank 0 the third of four stages
    assert len(re.findall(r"KV exchange done after (\d+) rounds", log)) == 3
    assert log.count("rank 0 pulled its dropped weights back") == 1 and log.count("left group (1, 3, 0, 2)") == 4


def test_lockstep_groups_exchange_pull_and_split_token_exact(llama_dir, reference, tmp_path):
    """``--pipeline-overlap off`` groups: the leader runs each step's round right after the step,
    members too (round lag 0); same merges, rounds and outputs."""
    result, log = run_cluster(llama_dir, tmp_path, chunk_bytes=1, overlap=False)
    assert result["tokens"] == reference
    assert len(re.findall(r"KV exchange done after (\d+) rounds", log)) == 3
    assert log.count("left group (0, 2, 1, 3)") == 4
