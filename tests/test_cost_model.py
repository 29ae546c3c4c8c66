"""Cost models (issue 7): fitting recovers known coefficients, JSON round trips and bad files,
and a small real run of ``python -m kunserve.profile`` on the built-in tiny model."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import attrs
import pytest

from kunserve.policy.cost_fit import nnls
from kunserve.policy.cost_model import (
    BatchSample, ChunkWork, CostModel, Profile, TokenLinearModel, mean_relative_error,
)

TRUE = CostModel(a=2e-9, b=1.5e-9, f=3e-5, d=4e-4, lam=3e-4, g=5e-8)
# With a weight-read floor of 6 ms reached at 256 tokens (f = u + 6.6e-6, u = 6 ms / 256) and a
# longest-context term: H100-like magnitudes. 256 is on the fit's quarter-octave knee ladder.
FLOORED = CostModel(a=2.5e-9, b=1.3e-9, f=6e-3 / 256 + 6.6e-6, d=3.6e-3, lam=3.5e-3, g=4e-8,
                    floor=6e-3, knee_tokens=256, h=1.3e-6)


def random_batch(rng: random.Random) -> list[ChunkWork]:
    chunks = []
    for i in range(rng.randint(1, 12)):
        decode = rng.random() < 0.5
        c = 1 if decode else rng.randint(1, 2048)
        chunks.append(ChunkWork(str(i), rng.randint(0, 6000) if decode or rng.random() < 0.5 else 0, c))
    return chunks


def synthetic(model, n: int, seed: int, noise: float = 0.0) -> list[BatchSample]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        chunks = random_batch(rng)
        out.append(BatchSample(chunks, model.batch_cost(chunks) * (1 + rng.uniform(-noise, noise))))
    return out


# -- the model's arithmetic -------------------------------------------------------------------
def test_chunk_and_batch_cost_follow_the_formula():
    m = CostModel(a=1.0, b=10.0, f=100.0, d=1000.0, lam=400.0, g=0.5)
    chunk = ChunkWork("r", prefix=3, num_tokens=2)
    assert m.chunk_cost(chunk) == 1 * 2 * 3 + 10 * 4 + 100 * 2 + 1000 + 0.5 * 3
    other = ChunkWork("s", prefix=0, num_tokens=1)
    assert m.batch_cost([chunk, other]) == m.chunk_cost(chunk) + m.chunk_cost(other) - 400
    assert m.batch_cost([]) == 0.0
    assert m.batch_cost([other]) == m.chunk_cost(other)  # one chunk shares nothing


def test_floor_and_context_terms_follow_the_formula():
    m = CostModel(a=1.0, b=10.0, f=100.0, d=1000.0, lam=400.0, g=0.5, floor=4000.0, knee_tokens=50, h=300.0)
    additive = CostModel(a=1.0, b=10.0, f=100.0, d=1000.0, lam=400.0, g=0.5)
    decode, prompt = ChunkWork("d", prefix=30, num_tokens=1), ChunkWork("p", prefix=3, num_tokens=2)
    # Below the knee the floor adds floor·(1 − T/knee); a decode-only batch has no context term.
    assert m.batch_cost([decode]) == additive.batch_cost([decode]) + 4000.0 * (1 - 1 / 50)
    # A multi-token chunk runs the prefill kernel: attention is max(work, h·longest context).
    work = additive.chunk_attention(decode) + additive.chunk_attention(prompt)
    assert work == 1 * 30 + 10 + 0.5 * 30 + 1 * 2 * 3 + 10 * 4 + 0.5 * 3
    expect = additive.batch_cost([decode, prompt]) + 4000.0 * (1 - 3 / 50) + (300.0 * 31 - work)
    assert m.batch_cost([decode, prompt]) == pytest.approx(expect)
    assert m.batch_cost([]) == 0.0


def test_floor_binds_only_below_the_knee():
    no_floor = attrs.evolve(FLOORED, floor=0.0)
    for tokens in (1, 16, 128, 255, 256, 257, 1024, 8192):
        chunks = [ChunkWork("p", 0, tokens)]
        extra = FLOORED.batch_cost(chunks) - no_floor.batch_cost(chunks)
        if tokens < 256:
            assert extra == pytest.approx(6e-3 * (1 - tokens / 256))
        else:
            assert extra == 0.0
    # Below the knee a forward costs about the floor whatever its shape (the roofline knee).
    small = [FLOORED.batch_cost([ChunkWork("p", 0, t)]) for t in (16, 64, 128)]
    assert max(small) < 1.15 * min(small)


def test_context_term_binds_only_where_few_tiles_walk_a_long_context():
    no_context = attrs.evolve(FLOORED, h=0.0)
    # A short chunk over an 8K prefix: the prefill kernel lasts as long as its longest program.
    short = [ChunkWork("c", 8000, 20)]
    assert FLOORED.batch_cost(short) == pytest.approx(no_context.batch_cost(short) + 1.3e-6 * 8020
                                                      - FLOORED.chunk_attention(short[0]))
    # Decode-only batches run the decode kernel: no context term ...
    decodes = [ChunkWork(str(i), 8000, 1) for i in range(8)]
    assert FLOORED.batch_cost(decodes) == no_context.batch_cost(decodes)
    # ... and a big chunk's attention work outweighs it.
    big = [ChunkWork("c", 6000, 2048)]
    assert FLOORED.batch_cost(big) == no_context.batch_cost(big)


def test_decode_only_cost_is_affine_in_chunks_and_prefix_below_the_knee():
    # The simulator prices one-token steps as c1 + v (R − 1) + s P (kunserve.sim.timing); the
    # floor keeps that form up to knee_tokens sequences, the context term never touches it.
    cost = lambda ps: FLOORED.batch_cost([ChunkWork(str(i), p, 1) for i, p in enumerate(ps)])  # noqa: E731
    c1, v, s = cost([0]), cost([0, 0]) - cost([0]), cost([1]) - cost([0])
    rng = random.Random(0)
    for r in (1, 3, 37, 200, 256):
        ps = [rng.randrange(0, 8000) for _ in range(r)]
        assert cost(ps) == pytest.approx(c1 + v * (r - 1) + s * sum(ps), rel=1e-9)
    ps = [rng.randrange(0, 8000) for _ in range(300)]  # above the knee the floor is gone
    assert cost(ps) > c1 + v * 299 + s * sum(ps)


def test_token_linear_counts_tokens_only():
    m = TokenLinearModel(alpha=2.0, beta=5.0)
    assert m.batch_cost([ChunkWork("a", 100, 3), ChunkWork("b", 0, 4)]) == 2.0 * 7 + 5.0
    assert m.batch_cost([]) == 0.0


@pytest.mark.parametrize("kwargs", [
    dict(a=-1.0, b=0, f=0, d=0, lam=0), dict(a=0, b=float("nan"), f=0, d=0, lam=0),
    dict(a=0, b=0, f=0, d=1.0, lam=2.0),  # lam > d: adding a chunk would make a batch cheaper
    dict(a=0, b=0, f=1.0, d=0, lam=0, floor=11.0, knee_tokens=10),  # the floor would outrun f
    dict(a=0, b=0, f=1.0, d=0, lam=0, floor=1.0, knee_tokens=0), dict(a=0, b=0, f=0, d=0, lam=0, h=-1.0),
])
def test_invalid_coefficients_are_rejected(kwargs):
    with pytest.raises(ValueError):
        CostModel(**kwargs)


@pytest.mark.parametrize("args", [("r", -1, 1), ("r", 0, 0), ("r", 0, 1.5)])
def test_invalid_chunks_are_rejected(args):
    with pytest.raises(ValueError):
        ChunkWork(*args)


# -- fitting ----------------------------------------------------------------------------------
def test_fit_recovers_known_coefficients():
    fitted = CostModel.fit(synthetic(TRUE, 200, seed=1))
    for name in ("a", "b", "f", "d", "lam", "g"):
        assert getattr(fitted, name) == pytest.approx(getattr(TRUE, name), rel=1e-6), name


def test_fit_paper_form_recovers_its_coefficients():
    paper = CostModel(a=2e-9, b=1.5e-9, f=3e-5, d=4e-4, lam=3e-4)
    fitted = CostModel.fit(synthetic(paper, 200, seed=2), prefix_read=False)
    assert fitted.g == 0.0
    for name in ("a", "b", "f", "d", "lam"):
        assert getattr(fitted, name) == pytest.approx(getattr(paper, name), rel=1e-6), name


def test_fit_recovers_a_planted_floor_and_context_term():
    samples = synthetic(FLOORED, 300, seed=11)
    assert any(s.num_tokens < 256 for s in samples) and any(s.num_tokens > 256 for s in samples)
    fitted = CostModel.fit(samples, floor=True, context=True)
    assert fitted.knee_tokens == 256
    for name in ("a", "b", "f", "d", "lam", "g", "floor", "h"):
        assert getattr(fitted, name) == pytest.approx(getattr(FLOORED, name), rel=1e-6), name
    # The additive model cannot follow it; the floor alone does not either.
    held_out = synthetic(FLOORED, 100, seed=12)
    assert fitted.mean_relative_error(held_out) < 1e-6
    assert CostModel.fit(samples).mean_relative_error(held_out) > 0.03
    assert CostModel.fit(samples, floor=True).mean_relative_error(held_out) > 0.01


def test_fit_of_the_floor_form_under_noise_predicts_held_out_batches():
    fitted = CostModel.fit(synthetic(FLOORED, 300, seed=13, noise=0.05), floor=True, context=True)
    assert fitted.mean_relative_error(synthetic(FLOORED, 100, seed=14)) < 0.02
    assert 128 <= fitted.knee_tokens <= 512


def test_fit_with_the_new_terms_on_additive_data_finds_none_of_them():
    fitted = CostModel.fit(synthetic(TRUE, 200, seed=15), floor=True, context=True)
    assert fitted.floor == pytest.approx(0.0, abs=1e-12) and fitted.h == pytest.approx(0.0, abs=1e-15)
    for name in ("a", "b", "f", "d", "lam", "g"):
        assert getattr(fitted, name) == pytest.approx(getattr(TRUE, name), rel=1e-6), name


def test_fit_under_noise_predicts_held_out_batches():
    fitted = CostModel.fit(synthetic(TRUE, 300, seed=3, noise=0.05))
    held_out = synthetic(TRUE, 100, seed=4)
    assert fitted.mean_relative_error(held_out) < 0.02


def test_token_linear_fit_recovers_a_linear_truth_but_not_the_quadratic_one():
    linear = TokenLinearModel(alpha=3e-5, beta=2e-3)
    fitted = TokenLinearModel.fit(synthetic(linear, 50, seed=5))
    assert fitted.alpha == pytest.approx(3e-5, rel=1e-6) and fitted.beta == pytest.approx(2e-3, rel=1e-6)
    # On batches whose cost is quadratic in the prefix the token count cannot keep up.
    quadratic = synthetic(TRUE, 200, seed=6)
    assert TokenLinearModel.fit(quadratic).mean_relative_error(quadratic) > 5 * CostModel.fit(
        quadratic).mean_relative_error(quadratic)


def test_fit_keeps_coefficients_non_negative():
    # Cost falls with tokens here: an unconstrained solve would give f < 0.
    samples = [BatchSample([ChunkWork("r", 0, c)], 1.0 - c * 1e-4) for c in range(1, 200, 7)]
    fitted = CostModel.fit(samples)
    assert min(fitted.a, fitted.b, fitted.f, fitted.d, fitted.lam, fitted.g) >= 0
    assert fitted.f == 0.0


def test_nnls_matches_scipy():
    scipy_optimize = pytest.importorskip("scipy.optimize")
    import numpy as np

    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y = rng.normal(size=(30, 5)), rng.normal(size=30)
        np.testing.assert_allclose(nnls(x, y), scipy_optimize.nnls(x, y)[0], atol=1e-8)


def test_fit_needs_enough_samples():
    with pytest.raises(ValueError, match="at least 6 samples"):
        CostModel.fit(synthetic(TRUE, 3, seed=7))


def test_mean_relative_error_takes_pairs_and_rejects_nothing_to_score():
    m = TokenLinearModel(alpha=1.0, beta=0.0)
    assert mean_relative_error(m.batch_cost, [([ChunkWork("r", 0, 10)], 8.0)]) == pytest.approx(0.25)
    assert m.mean_relative_error([([ChunkWork("r", 0, 10)], 10.0)]) == 0.0
    with pytest.raises(ValueError):
        m.mean_relative_error([])


# -- JSON -------------------------------------------------------------------------------------
def test_json_round_trip(tmp_path):
    TRUE.to_json(tmp_path / "m.json")
    assert CostModel.from_json(tmp_path / "m.json") == TRUE
    linear = TokenLinearModel(alpha=1e-5, beta=3e-3)
    linear.to_json(tmp_path / "t.json")
    assert TokenLinearModel.from_json(tmp_path / "t.json") == linear


def test_paper_form_json_without_g_loads_with_g_zero(tmp_path):
    data = {k: v for k, v in TRUE.to_dict().items() if k != "g"}
    (tmp_path / "m.json").write_text(json.dumps(data))
    assert CostModel.from_json(tmp_path / "m.json").g == 0.0


def test_floored_model_json_round_trip(tmp_path):
    FLOORED.to_json(tmp_path / "m.json")
    assert CostModel.from_json(tmp_path / "m.json") == FLOORED


def test_old_json_without_floor_loads_unchanged(tmp_path):
    # A profile written before the floor and context terms: the same model, the same costs.
    data = {k: TRUE.to_dict()[k] for k in ("form", "a", "b", "f", "d", "lambda", "g")}
    (tmp_path / "m.json").write_text(json.dumps(data))
    loaded = CostModel.from_json(tmp_path / "m.json")
    assert loaded == TRUE and (loaded.floor, loaded.knee_tokens, loaded.h) == (0.0, 1, 0.0)
    rng = random.Random(9)
    for _ in range(20):
        chunks = random_batch(rng)
        total = sum(TRUE.chunk_cost(c) for c in chunks) - (len(chunks) - 1) * TRUE.lam
        assert loaded.batch_cost(chunks) == total  # bit for bit: the additive sum, as before
    # floor = 0 written out explicitly loads the same; a floor without its knee does not load.
    (tmp_path / "z.json").write_text(json.dumps({**data, "floor": 0.0, "h": 0.0}))
    assert CostModel.from_json(tmp_path / "z.json") == TRUE
    (tmp_path / "k.json").write_text(json.dumps({**data, "floor": 1e-3}))
    with pytest.raises(ValueError, match=r"missing key 'knee_tokens'"):
        CostModel.from_json(tmp_path / "k.json")
    (tmp_path / "q.json").write_text(json.dumps({**data, "floor": 1e-3, "knee_tokens": 2.5}))
    with pytest.raises(ValueError, match=r"'knee_tokens' must be an int >= 1"):
        CostModel.from_json(tmp_path / "q.json")


def write_profile(path, **overrides):
    data = {"cost_model": TRUE.to_dict(), "token_linear": TokenLinearModel(1e-5, 2e-3).to_dict(),
            "min_tokens": 512, "device": "NVIDIA H100", "model": "llama3-8b"}
    data.update(overrides)
    path.write_text(json.dumps(data))
    return path


def test_profile_file_loads_both_models(tmp_path):
    path = write_profile(tmp_path / "p.json")
    profile = Profile.from_json(path)
    assert profile.cost_model == TRUE and profile.min_tokens == 512 and profile.device == "NVIDIA H100"
    assert CostModel.from_json(path) == TRUE  # a profile is also a cost-model file
    assert TokenLinearModel.from_json(path) == TokenLinearModel(1e-5, 2e-3)


def test_profile_section_loads_the_whole_grid_fit(tmp_path):
    whole = CostModel(a=1e-9, b=1e-9, f=1e-5, d=1e-3, lam=5e-4)
    path = write_profile(tmp_path / "p.json", whole_grid={
        "cost_model": whole.to_dict(), "token_linear": TokenLinearModel(2e-5, 1e-3).to_dict()})
    profile = Profile.from_json(path, section="whole_grid")
    assert profile.cost_model == whole and profile.min_tokens == 512
    assert Profile.from_json(path).cost_model == TRUE
    with pytest.raises(ValueError, match=r"p\.json: missing key 'by_target'"):
        Profile.from_json(path, section="by_target")
    path = write_profile(tmp_path / "q.json", whole_grid={"cost_model": whole.to_dict()})
    with pytest.raises(ValueError, match=r"q\.json: missing key 'whole_grid\.token_linear'"):
        Profile.from_json(path, section="whole_grid")


def test_the_shipped_h100_profile_loads():
    from pathlib import Path

    import kunserve

    path = Path(kunserve.__file__).parent / "data" / "profiles" / "h100-llama3-8b.json"
    profile = Profile.from_json(path)
    assert profile.model == "llama3-8b" and "H100" in profile.device and profile.min_tokens == 2048
    assert profile.cost_model.floor > 0 and profile.cost_model.h > 0  # fitted on the whole grid
    assert Profile.from_json(path, section="whole_grid").cost_model == profile.cost_model
    data = json.loads(path.read_text())
    assert CostModel.from_dict(data["cost_model_additive"]).floor == 0.0  # the model it replaced
    # What BENCHMARKS.md reports: the held-out error over every kind and size.
    assert data["errors"]["held_out"]["cost_model"] <= 0.05 < data["errors"]["held_out"]["cost_model_additive"]


def test_bad_json_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json.*not valid JSON"):
        CostModel.from_json(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="broken.json.*JSON object"):
        Profile.from_json(path)


def test_missing_key_names_file_and_key(tmp_path):
    data = TRUE.to_dict()
    del data["lambda"]
    path = write_profile(tmp_path / "p.json", cost_model=data)
    with pytest.raises(ValueError, match=r"p\.json: missing key 'cost_model\.lambda'"):
        Profile.from_json(path)
    with pytest.raises(ValueError, match=r"p\.json: missing key 'cost_model\.lambda'"):
        CostModel.from_json(path)
    path = write_profile(tmp_path / "q.json")
    data = json.loads(path.read_text())
    del data["min_tokens"]
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"q\.json: missing key 'min_tokens'"):
        Profile.from_json(path)


@pytest.mark.parametrize("field, value, match", [
    ("a", "fast", r"'cost_model\.a' must be a finite number"),
    ("b", True, r"'cost_model\.b' must be a finite number"),
    ("a", -1.0, r"cost_model\.a must be a finite number >= 0"),
])
def test_bad_values_name_file_and_key(tmp_path, field, value, match):
    data = TRUE.to_dict()
    data[field] = value
    with pytest.raises(ValueError, match=match):
        Profile.from_json(write_profile(tmp_path / "p.json", cost_model=data))


def test_bad_min_tokens_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="min_tokens"):
        Profile.from_json(write_profile(tmp_path / "p.json", min_tokens=0.5))


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        CostModel.from_json(tmp_path / "nope.json")


# -- the profiler, for real -------------------------------------------------------------------
def test_profile_cli_on_the_tiny_model(tmp_path):
    out, samples = tmp_path / "profile.json", tmp_path / "samples.json"
    cmd = [sys.executable, "-m", "kunserve.profile", "--out", str(out), "--samples-out", str(samples),
           "--num-batches", "16", "--max-context", "128", "--max-batch-tokens", "128", "--repeats", "1",
           "--device", "cpu", "--threads", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    profile = Profile.from_json(out)
    assert profile.model == "builtin-tiny-llama" and result["device"] == "cpu"
    assert 16 <= profile.min_tokens <= 128
    assert result["target"] == "wall" and set(result["by_target"]) == {"wall"}  # no GPU time on a CPU
    whole = result["whole_grid"]
    assert result["samples"] == whole["train_samples"] + result["held_out_samples"] >= 16
    assert result["fit_min_tokens"] == 1 and result["train_samples"] == whole["train_samples"]
    assert f"held_out_at_least_{max(1, profile.min_tokens // 4)}_tokens" in result["errors"]
    for part in (result, whole):
        held = part["errors"]["held_out"]
        assert held["n"] == result["held_out_samples"]
        for name in ("cost_model", "cost_model_additive", "cost_model_paper", "token_linear"):
            assert 0 <= held[name] < 10  # finite, and not absurd on a quiet or a busy CPU
    # Every batch stayed inside the grid's limits.
    saved = json.loads(samples.read_text())["samples"]
    assert len(saved) == result["samples"]
    for s in saved:
        assert sum(c for _, c in s["chunks"]) <= 128 and all(p + c <= 128 for p, c in s["chunks"])
    # --refit reproduces the fit from the saved batches without measuring.
    again = tmp_path / "again.json"
    cmd = [sys.executable, "-m", "kunserve.profile", "--refit", str(samples), "--out", str(again)]
    assert subprocess.run(cmd, capture_output=True, timeout=60).returncode == 0
    refit = json.loads(again.read_text())
    assert refit["cost_model"] == result["cost_model"] and refit["min_tokens"] == result["min_tokens"]
