"""Checkpoint loading: sharded files, layer ranges, HF cache ids, dummy weights, damaged files."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from kunserve.models import CheckpointError, ModelConfig, build_model, load_dummy, load_safetensors, resolve_model_dir
from kunserve.models.tiny import make_tiny_checkpoint

CPU = torch.device("cpu")


def meta_model(path, layer_range=None):
    with torch.device("meta"):
        return build_model(ModelConfig.from_dir(path), layer_range)


def shard_per_layer(src, dst):
    """Rewrite a checkpoint as one shard per layer plus one for the rest, with an index."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    (dst / "model.safetensors").unlink()
    shards: dict[str, dict] = {}
    for name, t in tensors.items():
        key = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        shards.setdefault(f"model-{key}.safetensors", {})[name] = t
    weight_map = {}
    for fname, part in shards.items():
        save_file(part, dst / fname)
        weight_map.update({n: fname for n in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("l") / "llama", "LlamaForCausalLM", with_tokenizer=False)


def test_single_file_loads_every_tensor_exactly(ckpt):
    model = meta_model(ckpt)
    load_safetensors(model, ckpt, torch.float32, CPU)
    reference = load_file(ckpt / "model.safetensors")
    state = model.state_dict()
    assert set(state) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(state[name], tensor), name


def test_sharded_stage_reads_only_its_shards(ckpt, tmp_path):
    sharded = shard_per_layer(ckpt, tmp_path / "sharded")
    (sharded / "model-0.safetensors").unlink()  # a stage owning layers [2, 4) never needs it
    (sharded / "model-1.safetensors").unlink()
    model = meta_model(sharded, (2, 4))
    load_safetensors(model, sharded, torch.float32, CPU)
    reference = load_file(ckpt / "model.safetensors")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    with pytest.raises(FileNotFoundError):  # the first stage does need the deleted shard
        load_safetensors(meta_model(sharded, (0, 2)), sharded, torch.float32, CPU)


def test_bf16_load_casts(ckpt):
    model = meta_model(ckpt)
    load_safetensors(model, ckpt, torch.bfloat16, CPU)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_missing_tensor_names_tensor_and_file(ckpt, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing.*broken"):
        load_safetensors(meta_model(broken), broken, torch.float32, CPU)


def test_wrong_shape_names_tensor_and_file(ckpt, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(7, 64)
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"k_proj\.weight.*model\.safetensors.*\(7, 64\).*\(32, 64\)"):
        load_safetensors(meta_model(broken), broken, torch.float32, CPU)


def test_truncated_file_names_tensor_and_file(ckpt, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"tensor '.+' in .*model\.safetensors is truncated"):
        load_safetensors(meta_model(broken), broken, torch.float32, CPU)
    (broken / "model.safetensors").write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        load_safetensors(meta_model(broken), broken, torch.float32, CPU)


def test_dummy_weights_depend_only_on_name_and_seed(ckpt):
    full, stage = meta_model(ckpt), meta_model(ckpt, (2, 4))
    load_dummy(full, torch.float32, CPU, seed=3)
    load_dummy(stage, torch.float32, CPU, seed=3)
    full_state = full.state_dict()
    for name, tensor in stage.state_dict().items():
        assert torch.equal(tensor, full_state[name]), name
    assert torch.equal(full_state["model.norm.weight"], torch.ones(64))
    other = meta_model(ckpt)
    load_dummy(other, torch.float32, CPU, seed=4)
    assert not torch.equal(other.state_dict()["lm_head.weight"], full_state["lm_head.weight"])


def test_repo_id_resolves_from_hf_cache(ckpt, tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny-llama" / "snapshots" / ("a" * 40)
    shutil.copytree(ckpt, snapshot)
    (cache / "models--acme--tiny-llama" / "refs").mkdir()
    (cache / "models--acme--tiny-llama" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as hfc

    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(cache))
    assert resolve_model_dir("acme/tiny-llama") == snapshot
    with pytest.raises(FileNotFoundError, match="acme/not-there.*nor in the Hugging Face cache. Download it"):
        resolve_model_dir("acme/not-there")


def test_missing_local_path_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        resolve_model_dir(str(tmp_path / "nope" / "deeper" / "model"))
