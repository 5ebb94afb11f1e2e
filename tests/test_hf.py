"""Hugging Face parity: our Qwen3 / Qwen3-MoE logits equal transformers' on tiny random models,
under every role's sharding; export loads in transformers; import -> export is lossless."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import FP32_LOGPROB_ATOL, hf_token_logprobs, write_hf_model
from models.hf import (HFCheckpointError, SafetensorsDir, config_from_hf, save_hf,
                       save_safetensors)
from mopd_jax.loading import load_model
from mopd_jax.sharding import make_mesh
from mopd_jax.steps import token_logprobs_step

TOKENS = np.random.RandomState(0).randint(0, 97, (2, 11)).astype(np.int32)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    out = {}
    for kind, over in [("dense", {}), ("moe", {}), ("moe_unnorm", {"norm_topk_prob": False}),
                       ("sliding", {"use_sliding_window": True, "sliding_window": 3,
                                    "max_window_layers": 1})]:
        path = tmp_path_factory.mktemp(kind)
        base = "dense" if kind in ("dense", "sliding") else "moe"
        out[kind] = (path, write_hf_model(path, base, **over))
    return out


@pytest.mark.parametrize("kind", ["dense", "moe", "moe_unnorm", "sliding"])
def test_logits_match_transformers_under_every_role(hf_models, kind):
    path, torch_model = hf_models[kind]
    ref = hf_token_logprobs(torch_model, TOKENS)
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 2, "expert": 2})
    for role in ("train", "sample", "teacher"):
        loaded = load_model(hf=str(path), mesh=mesh, role=role)
        lp = np.asarray(token_logprobs_step(loaded.graphdef, loaded.params, jnp.asarray(TOKENS),
                                            vocab_chunk=32, seq_chunk=8))
        assert np.abs(lp - ref).max() <= FP32_LOGPROB_ATOL, (kind, role)


def test_config_reads_both_transformers_spellings(hf_models):
    path, _ = hf_models["moe"]
    c = json.loads((path / "config.json").read_text())
    a = config_from_hf(c)
    c2 = dict(c)
    c2["num_experts"] = c2.pop("num_local_experts", c2.get("num_experts"))
    c2.pop("rope_parameters", None)
    c2["rope_theta"] = 10000.0
    b = config_from_hf(c2)
    assert a == b and a.num_experts == 8 and a.rope_theta == 10000.0
    assert a.mlp_only_layers == (1,) and a.norm_topk_prob


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_export_loads_in_transformers_and_roundtrips(hf_models, tmp_path, kind):
    import transformers

    path, torch_model = hf_models[kind]
    loaded = load_model(hf=str(path))
    save_hf(loaded.params, loaded.cfg, tmp_path / "out", max_shard_bytes=20_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()  # sharded export
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_allclose(hf_token_logprobs(again, TOKENS),
                               hf_token_logprobs(torch_model, TOKENS), atol=1e-6)
    src, dst = SafetensorsDir(path), SafetensorsDir(tmp_path / "out")
    assert set(src.keys()) == set(dst.keys())
    for k in src.keys():
        assert np.array_equal(np.asarray(src.get(k)), np.asarray(dst.get(k))), k


def test_fused_expert_layout_loads_like_per_expert_keys(hf_models, tmp_path):
    """transformers 5 may save experts fused: gate_up_proj [E, 2F, D], down_proj [E, D, F]."""
    path, _ = hf_models["moe"]
    src = SafetensorsDir(path)
    tensors = {k: np.array(src.get(k)) for k in src.keys() if ".experts." not in k}
    cfg = config_from_hf(path)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}.mlp.experts."
        if p + "0.up_proj.weight" not in src:
            continue  # a dense layer inside the MoE model
        get = lambda e, n: np.array(src.get(f"{p}{e}.{n}.weight"))  # noqa: E731
        E = cfg.num_experts
        tensors[p + "gate_up_proj"] = np.stack(
            [np.concatenate([get(e, "gate_proj"), get(e, "up_proj")]) for e in range(E)])
        tensors[p + "down_proj"] = np.stack([get(e, "down_proj") for e in range(E)])
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    save_safetensors(tensors, tmp_path / "model.safetensors")
    fused, per_expert = load_model(hf=str(tmp_path)), load_model(hf=str(path))
    for a, b in zip(jax.tree.leaves(fused.params), jax.tree.leaves(per_expert.params)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_bad_checkpoints_give_clear_errors(hf_models, tmp_path):
    path, _ = hf_models["dense"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HFCheckpointError, match="config.json"):
        load_model(hf=str(empty))
    (empty / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(HFCheckpointError, match="no \\*.safetensors"):
        load_model(hf=str(empty))

    c = json.loads((path / "config.json").read_text())
    c["architectures"], c["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    with pytest.raises(HFCheckpointError, match="unsupported model_type 'gpt2'"):
        config_from_hf(c)

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    c = json.loads((path / "config.json").read_text())
    c["intermediate_size"] = 40
    (wrong / "config.json").write_text(json.dumps(c))
    (wrong / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    with pytest.raises(HFCheckpointError, match=r"mlp\.\w+\.weight' has shape .* config.json "
                                                "does not match"):
        load_model(hf=str(wrong))

    # Weights that disagree with an unchanged config.json: named before any reshape or stack.
    for kind, key in (("dense", "model.layers.0.self_attn.q_proj.weight"),
                      ("moe", "model.layers.0.mlp.experts.1.up_proj.weight")):
        src_dir = hf_models[kind][0]
        src = SafetensorsDir(src_dir)
        tensors = {k: np.array(src.get(k)) for k in src.keys()}
        tensors[key] = np.concatenate([tensors[key], tensors[key][:1]])  # one row too many
        bad = tmp_path / f"bad_{kind}"
        bad.mkdir()
        (bad / "config.json").write_text((src_dir / "config.json").read_text())
        save_safetensors(tensors, bad / "model.safetensors")
        with pytest.raises(HFCheckpointError, match=rf"{re.escape(key)}' has shape"):
            load_model(hf=str(bad))

    c = json.loads((path / "config.json").read_text())
    del c["num_attention_heads"]
    with pytest.raises(HFCheckpointError, match="missing field 'num_attention_heads'"):
        config_from_hf(c)

    (wrong / "config.json").write_text((path / "config.json").read_text())
    (wrong / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes()[:2000])
    with pytest.raises(HFCheckpointError, match="truncated|corrupt|runs past"):
        load_model(hf=str(wrong))
