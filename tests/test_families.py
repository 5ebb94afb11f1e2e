"""Model families behind one seam, each held to transformers on tiny random checkpoints:
logits under every sharding role, greedy generation, export -> from_pretrained, import ->
export; MiMo-V2-Flash's traits (grouped sigmoid routing with a correction bias, partial
rotary, Vd != Hd, sliding layers with their own KV heads and sinks); routing record/replay."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from helpers import FP32_ATOL, FP32_LOGPROB_ATOL, hf_token_logprobs, write_hf_model
from models.config import ModelConfig, preset
from models.hf import HFCheckpointError, SafetensorsDir, config_from_hf, save_hf, save_safetensors
from mopd_jax.checkpoint import load_model_params, save_model
from mopd_jax.loading import load_model
from mopd_jax.sharding import MeshError, logical_to_spec, make_mesh
from mopd_jax.steps import token_logprobs_step

KINDS = ["mimo", "llama", "qwen2"]
TOKENS = np.random.RandomState(0).randint(0, 97, (2, 11)).astype(np.int32)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    out = {}
    for kind in KINDS:
        path = tmp_path_factory.mktemp(kind)
        out[kind] = (path, write_hf_model(path, kind))
    return out


def _logprobs(loaded):
    return np.asarray(token_logprobs_step(loaded.graphdef, loaded.params, jnp.asarray(TOKENS),
                                          vocab_chunk=32, seq_chunk=8))


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers_under_every_role(hf_dirs, kind):
    path, torch_model = hf_dirs[kind]
    ref = hf_token_logprobs(torch_model, TOKENS)
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 2, "expert": 2})
    for role in ("train", "sample", "teacher"):
        loaded = load_model(hf=str(path), mesh=mesh, role=role)
        assert loaded.cfg.family == {"mimo": "mimo_v2_flash"}.get(kind, "llama")
        assert np.abs(_logprobs(loaded) - ref).max() <= FP32_LOGPROB_ATOL, (kind, role)


@pytest.mark.parametrize("kind", KINDS)
def test_export_loads_in_transformers_and_import_export_is_identical(hf_dirs, tmp_path, kind):
    import transformers

    path, torch_model = hf_dirs[kind]
    loaded = load_model(hf=str(path))
    save_hf(loaded.params, loaded.cfg, tmp_path / "out")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_allclose(hf_token_logprobs(again, TOKENS),
                               hf_token_logprobs(torch_model, TOKENS), atol=1e-6)
    src, dst = SafetensorsDir(path), SafetensorsDir(tmp_path / "out")
    assert set(src.keys()) == set(dst.keys())
    for k in src.keys():
        assert np.array_equal(np.asarray(src.get(k)), np.asarray(dst.get(k))), k
    assert config_from_hf(tmp_path / "out").replace(name="x") == loaded.cfg.replace(name="x")


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_equals_transformers_generate(hf_dirs, kind):
    import dataclasses

    import torch

    from mopd_jax.sampling import GREEDY, Engine, Prompt, rollout

    path, torch_model = hf_dirs[kind]
    loaded = load_model(hf=str(path))
    engine = Engine(loaded.graphdef, loaded.params, max_concurrent_decodes=2,
                    max_prefill_length=16, max_target_length=40)
    prompts = [TOKENS[0, :5].tolist(), TOKENS[1, :9].tolist()]
    batch = rollout(engine, loaded.params, [Prompt(p) for p in prompts],
                    sampling=dataclasses.replace(GREEDY, max_new_tokens=16))
    torch_model.generation_config.pad_token_id = 0
    for r, prompt in enumerate(prompts):
        with torch.no_grad():
            out = torch_model.generate(torch.tensor([prompt]), max_new_tokens=16,
                                       do_sample=False, eos_token_id=None)
        np.testing.assert_array_equal(batch.tokens[r, :batch.lengths[r]], out[0].numpy())


def test_mimo_checkpoint_variants_load_alike(hf_dirs, tmp_path, capfd):
    """Fused experts, ``sinks`` spelled as in memory, and the MTP head (skipped, one note)."""
    path, _ = hf_dirs["mimo"]
    src = SafetensorsDir(path)
    cfg = config_from_hf(path)
    tensors = {k.replace("attention_sink_bias", "sinks"): np.array(src.get(k))
               for k in src.keys() if ".experts." not in k}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}.mlp.experts."
        if not cfg.is_moe_layer(i):
            continue
        get = lambda e, n: np.array(src.get(f"{p}{e}.{n}.weight"))  # noqa: E731
        tensors[p + "gate_up_proj"] = np.stack([np.concatenate(
            [get(e, "gate_proj"), get(e, "up_proj")]) for e in range(cfg.num_experts)])
        tensors[p + "down_proj"] = np.stack([get(e, "down_proj")
                                             for e in range(cfg.num_experts)])
    tensors["model.mtp.layers.0.enorm.weight"] = np.ones(32, np.float32)
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    save_safetensors(tensors, tmp_path / "model.safetensors")
    capfd.readouterr()
    variant, hub = load_model(hf=str(tmp_path)), load_model(hf=str(path))
    err = capfd.readouterr().err
    assert err.count("skipping 1 tensors under model.mtp") == 1
    for a, b in zip(jax.tree.leaves(variant.params), jax.tree.leaves(hub.params)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_mimo_config_reads_the_reference_fields(hf_dirs):
    cfg = config_from_hf(hf_dirs["mimo"][0])
    assert (cfg.family, cfg.router, cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor,
            cfg.head_dim, cfg.value_dim, cfg.rotary_dim, cfg.sliding_window) == (
        "mimo_v2_flash", "sigmoid", 4, 2, 2.5, 12, 8, 6, 3)
    assert cfg.layer_types == ("full", "sliding", "sliding", "full")
    assert [cfg.kv_heads(i) for i in range(4)] == [1, 2, 2, 1]
    assert [cfg.has_sinks(i) for i in range(4)] == [False, True, True, False]
    assert (cfg.rope_theta, cfg.sliding_rope_theta, cfg.mlp_only_layers) == (
        50000.0, 10000.0, (0,))
    c = json.loads((hf_dirs["mimo"][0] / "config.json").read_text())
    c["sliding_window_size"] = 7
    assert config_from_hf(c).sliding_window == 8  # SGLang's window excludes the query


def test_unsupported_model_type_names_it_and_the_families():
    with pytest.raises(HFCheckpointError, match=r"unsupported model_type 'gpt2'.*qwen3"):
        config_from_hf({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})


@pytest.mark.parametrize("name", ["tiny-mimo", "tiny-moe"])
def test_ragged_equals_dense_for_every_router(name):
    cfg = preset(name)
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, 128, (2, 12)))
    a = models.build(cfg, nnx.Rngs(0))
    if cfg.router == "sigmoid":  # a non-zero correction bias must change the choice only
        for layer in a.layers:
            if layer.is_moe:
                layer.mlp.router_bias[...] = jax.random.normal(jax.random.key(3), (8,))
    graphdef, state = nnx.split(a)
    dense = nnx.merge(nnx.split(models.build(cfg.replace(moe_impl="dense"), nnx.Rngs(0)))[0],
                      state)

    def loss(model):
        h, _, aux = model(tokens)
        return jnp.sum(h ** 2) + aux, h

    (la, ha), ga = nnx.value_and_grad(loss, has_aux=True)(nnx.merge(graphdef, state))
    (lb, hb), gb = nnx.value_and_grad(loss, has_aux=True)(dense)
    np.testing.assert_allclose(ha, hb, atol=FP32_ATOL)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(x, y, atol=1e-4, rtol=1e-4)


def test_grouped_routing_only_picks_from_the_best_groups():
    cfg = preset("tiny-mimo")
    moe = next(layer.mlp for layer in models.build(cfg, nnx.Rngs(0)).layers if layer.is_moe)
    x = jax.random.normal(jax.random.key(0), (64, cfg.hidden_size))
    bias = jnp.zeros(8).at[jnp.array([0, 1])].set(10.0)  # group 0 always wins
    moe.router_bias[...] = bias
    _, w, ids = moe.route(x)
    assert bool(jnp.all(ids < 2))  # both from group 0 (experts 0, 1)
    scores = jax.nn.sigmoid(x @ moe.router[...])
    expect = jnp.take_along_axis(scores, ids, -1)
    np.testing.assert_allclose(w, 2.5 * expect / expect.sum(-1, keepdims=True), rtol=1e-6)


@pytest.mark.parametrize("name", ["tiny-mimo", "tiny-moe"])
def test_routing_is_recorded_and_replays(name):
    cfg = preset(name)
    model = models.build(cfg, nnx.Rngs(0))
    tokens = jnp.asarray(np.random.RandomState(4).randint(0, 128, (2, 9)))
    (h, _, _), ids = models.forward_with_routing(model, tokens)
    assert sorted(ids) == list(model.moe_layers()) and ids[1].shape == (2, 9, 2)
    replayed, _, _ = model(tokens, expert_ids=ids)
    np.testing.assert_allclose(replayed, h, atol=FP32_ATOL)
    flipped = {i: (x + 1) % cfg.num_experts for i, x in ids.items()}
    assert float(jnp.abs(model(tokens, expert_ids=flipped)[0] - h).max()) > 1e-3
    graphdef, state = nnx.split(model)

    def loss(s):  # under replay the router still gets a gradient through the gate weights
        return jnp.sum(nnx.merge(graphdef, s)(tokens, expert_ids=ids)[0] ** 2)

    g = jax.grad(loss)(state)
    assert float(jnp.abs(g["layers"][1]["mlp"]["router"][...]).max()) > 0


def test_prefill_then_decode_equals_full_forward_mimo():
    cfg = preset("tiny-mimo")
    m = models.build(cfg, nnx.Rngs(0))
    tokens = jnp.asarray(np.random.RandomState(1).randint(0, 128, (2, 10)))
    full, _, _ = m(tokens)
    cache = m.init_cache(2, 16)
    assert cache[1]["k"].shape == (2, 2, 16, 24) and cache[1]["v"].shape == (2, 2, 16, 16)
    h, cache, _ = m(tokens[:, :6], cache=cache)
    outs = [h]
    for t in range(6, 10):
        h, cache, _ = m(tokens[:, t:t + 1], jnp.full((2, 1), t, jnp.int32), cache=cache)
        outs.append(h)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=FP32_ATOL)


def test_model_json_without_family_loads_as_qwen3(tmp_path):
    cfg = preset("tiny")
    save_model(tmp_path, nnx.split(models.build(cfg, nnx.Rngs(0)))[1], cfg)
    d = json.loads((tmp_path / "model.json").read_text())
    del d["family"]
    d["attention_sink"] = False  # the boolean spelling of earlier checkpoints
    (tmp_path / "model.json").write_text(json.dumps(d))
    got, _, _ = load_model_params(tmp_path, make_mesh())
    assert got.family == "qwen3" and got == cfg


def test_unknown_family_and_logical_axis_are_errors():
    with pytest.raises(ValueError, match="unknown family 'gpt2'"):
        models.build(ModelConfig(family="gpt2"), nnx.Rngs(0))
    with pytest.raises(MeshError, match="logical axis 'stages' has no entry in the 'train'"):
        logical_to_spec(("stages", "embed"), (2, 64), make_mesh(), "train")


def test_family_presets_have_the_published_sizes():
    mimo = preset("mimo-v2-flash")
    assert 308e9 < mimo.num_params() < 310e9           # published: 309B total
    assert 15.0e9 < mimo.num_params(active=True) < 15.6e9  # published: 15B active
    assert (mimo.family, mimo.kv_heads(0), mimo.kv_heads(1), mimo.rotary_dim) == (
        "mimo_v2_flash", 4, 8, 64)
    assert 1.23e9 < preset("llama-3.2-1b").num_params() < 1.25e9   # published: 1.24B
    assert 8.02e9 < preset("llama-3.1-8b").num_params() < 8.04e9   # published: 8.03B


def test_llama3_rope_scaling_equals_transformers():
    import torch
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = preset("llama-3.1-8b")
    hf = transformers.LlamaConfig(**models.registry.family("llama").hf_config(cfg))
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, torch.device("cpu"))
    ours = models.registry.family("llama").Model.rope_inv_freq(cfg, 0)
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-6)
    assert not np.allclose(ours, models.layers.default_inv_freq(cfg, 0))


FAMILY_RUNS = {"mimo_v2_flash": ["model.preset=tiny-mimo", "model.num_layers=2",
                                 "model.layer_types=[sliding, full]"],
               "llama": ["model.preset=tiny-llama"]}


@pytest.mark.parametrize("family", sorted(FAMILY_RUNS))
def test_tiny_mopd_run_with_a_student_of_the_family(family, tmp_path):
    """SFT pi_0 -> one GRPO teacher -> MOPD, the student of ``family`` (the quick demo, one
    domain, small batches)."""
    from mopd_jax.checkpoint import read_model_config
    from mopd_jax.recipes.demo import run_demo

    table = run_demo(str(tmp_path), quick=True, overrides=FAMILY_RUNS[family] + [
        "data.builtin=[add]", "rollout.slots=16", "sft.batch_size=16",
        "grpo.prompts_per_step=4", "grpo.group_size=4", "mopd.prompts_per_step=8"])
    for phase in ("sft", "teacher_add", "mopd"):
        assert read_model_config(tmp_path / phase / "model").family == family
    (row,) = table["rows"]
    assert row["domain"] == "add" and all(0.0 <= row[k] <= 1.0
                                           for k in ("base", "teacher", "student"))


@pytest.mark.parametrize("kind", ["mimo", "llama"])
def test_cli_verbs_serve_every_family(hf_dirs, tmp_path, capsys, kind):
    """score = transformers; convert hf -> orbax -> hf keeps scores; greedy generate =
    transformers generate; merge of two models of the family."""
    import torch

    from mopd_jax.cli import main

    path, torch_model = hf_dirs[kind]
    ids = TOKENS[0, :7].tolist()
    args = ["--tokens", ",".join(map(str, ids)), "--json"]
    assert main(["score", "--hf", str(path), *args]) == 0
    ref = hf_token_logprobs(torch_model, np.array([ids]))[0]
    assert np.abs(np.array(json.loads(capsys.readouterr().out)["logprobs"][1:]) - ref).max() \
        <= FP32_LOGPROB_ATOL
    assert main(["convert", str(path), str(tmp_path / "ck"), "--to", "orbax"]) == 0
    assert main(["convert", str(tmp_path / "ck"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    capsys.readouterr()
    for flag, d in [("--checkpoint", tmp_path / "ck"), ("--hf", tmp_path / "hf")]:
        assert main(["score", flag, str(d), *args]) == 0
        got = json.loads(capsys.readouterr().out)["logprobs"][1:]
        np.testing.assert_allclose(got, ref, atol=FP32_LOGPROB_ATOL)

    assert main(["generate", "--checkpoint", str(tmp_path / "ck"), "--tokens",
                 ",".join(map(str, ids)), "--greedy", "--max-new-tokens", "8", "--json"]) == 0
    sample = json.loads(capsys.readouterr().out)["samples"][0]["tokens"]
    with torch.no_grad():
        want = torch_model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)[0, len(ids):]
    assert sample == want.tolist()

    other = tmp_path / "other"
    write_hf_model(other, kind, seed=1)
    assert main(["merge", "--base", str(tmp_path / "ck"), "--models", f"hf:{other}",
                 f"hf:{path}", "--method", "average", "--out", str(tmp_path / "merged")]) == 0
    merged = load_model(checkpoint=str(tmp_path / "merged"))
    a, b = load_model(hf=str(other)), load_model(hf=str(path))
    assert merged.cfg.family == a.cfg.family
    for m, x, y in zip(jax.tree.leaves(merged.params), jax.tree.leaves(a.params),
                       jax.tree.leaves(b.params)):
        np.testing.assert_allclose(m, (np.asarray(x) + np.asarray(y)) / 2, atol=1e-6)
    capsys.readouterr()
    assert main(["merge", "--base", str(tmp_path / "ck"), "--models", f"hf:{hf_dirs['qwen2'][0]}",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "different architecture" in capsys.readouterr().err


def test_a_teacher_of_another_family_scores_through_its_own_graph(hf_dirs):
    """A Qwen3 student with MiMo and Llama teachers (same 97-token vocabulary): each teacher's
    sampled-token log-probs equal transformers' for it."""
    from mopd_jax.estimators import DistillLossConfig
    from mopd_jax.teachers import load_teachers

    cfg = preset("tiny", vocab_size=97)
    s_graphdef, s_params = nnx.split(models.build(cfg, nnx.Rngs(0)))
    routes = {"math": f"hf:{hf_dirs['mimo'][0]}", "code": f"hf:{hf_dirs['llama'][0]}"}
    pool = load_teachers(routes, None, student=(s_graphdef, s_params, cfg), mesh=make_mesh())
    scores = pool.score(TOKENS, ["math", "code"], DistillLossConfig(estimator="A",
                                                                    num_domains=2))
    for row, kind in enumerate(["mimo", "llama"]):
        ref = hf_token_logprobs(hf_dirs[kind][1], TOKENS[row:row + 1])[0]
        assert np.abs(np.asarray(scores.logp_BT[row]) - ref).max() <= FP32_LOGPROB_ATOL, kind
