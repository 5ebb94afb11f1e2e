"""Model behaviour: KV cache equals full forward, ragged MoE equals dense, sharded equals
single-device, causality by gradient, sliding window and sinks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import FP32_ATOL
from models.config import ModelConfig, ModelConfigError, hybrid_layer_types, preset
from models import build
from mopd_jax.sharding import init_sharded, make_mesh, use_rules

HYBRID = preset("tiny-moe", num_layers=6, layer_types=hybrid_layer_types(6, 5),
                sliding_window=3, attention_sink=True, mlp_only_layers=(0,))
TOKENS = jax.random.randint(jax.random.key(1), (2, 10), 0, 128)


def _model(cfg, seed=0):
    return build(cfg, nnx.Rngs(seed))


@pytest.mark.parametrize("cfg", [preset("tiny"), HYBRID], ids=["dense", "hybrid-moe-sink"])
def test_prefill_then_decode_equals_full_forward(cfg):
    m = _model(cfg)
    full, _, _ = m(TOKENS)
    cache = m.init_cache(2, 16)
    h, cache, _ = m(TOKENS[:, :6], cache=cache)
    outs = [h]
    for t in range(6, 10):
        h, cache, _ = m(TOKENS[:, t:t + 1], jnp.full((2, 1), t, jnp.int32), cache=cache)
        outs.append(h)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=FP32_ATOL)


def test_ragged_moe_equals_dense_reference():
    for norm in (True, False):
        cfg = preset("tiny-moe", norm_topk_prob=norm)
        a, _, aux_a = _model(cfg)(TOKENS)
        b, _, aux_b = _model(cfg.replace(moe_impl="dense"))(TOKENS)
        np.testing.assert_allclose(a, b, atol=FP32_ATOL)
        assert float(aux_a) == pytest.approx(float(aux_b)) and float(aux_a) > 0


def test_sharded_forward_equals_single_device():
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 2, "expert": 2})
    ref, _, _ = _model(HYBRID)(TOKENS)
    for role in ("train", "sample", "teacher"):
        graphdef, state = init_sharded(lambda: _model(HYBRID), mesh, role)
        assert any(len(v.sharding.device_set) == 8 and not v.sharding.is_fully_replicated
                   for v in jax.tree.leaves(state))

        @jax.jit
        def fwd(state, tokens):
            with use_rules(mesh, role):
                return nnx.merge(graphdef, state)(tokens)[0]

        np.testing.assert_allclose(fwd(state, TOKENS), ref, atol=FP32_ATOL)


def test_causality_by_gradient():
    m = _model(HYBRID)
    graphdef, state = nnx.split(m)
    x = nnx.merge(graphdef, state).embed[...][TOKENS[:1]]

    # Differentiate output position t w.r.t. the input embeddings through the real blocks.
    def hidden_from_embeddings(x_BTD):
        model = nnx.merge(graphdef, state)
        pos = jnp.arange(x_BTD.shape[1])[None]
        for layer in model.layers:
            x_BTD, _, _ = layer(x_BTD, pos)
        return model.norm(x_BTD)

    t = 4
    g = jax.grad(lambda x: hidden_from_embeddings(x)[0, t].sum())(x)
    assert float(jnp.abs(g[0, t + 1:]).max()) == 0.0
    assert float(jnp.abs(g[0, :t + 1]).min(axis=-1).max()) > 0.0


def test_sliding_window_limits_attention_span():
    cfg = preset("tiny", num_layers=1, layer_types=("sliding",), sliding_window=3)
    m = _model(cfg)
    graphdef, state = nnx.split(m)
    x = m.embed[...][TOKENS[:1]]

    def h_t(x, t):
        model = nnx.merge(graphdef, state)
        return model.layers[0](x, jnp.arange(10)[None])[0][0, t].sum()

    g = jax.grad(h_t)(x, 7)
    nonzero = np.flatnonzero(np.abs(np.asarray(g[0])).sum(-1) > 0)
    assert nonzero.tolist() == [5, 6, 7]


def test_attention_sink_absorbs_probability():
    cfg = preset("tiny", num_layers=1, attention_sink=True)
    m = _model(cfg)
    base, _, _ = m(TOKENS)
    m.layers[0].self_attn.sinks[...] = jnp.full((cfg.num_heads,), -1e9)
    np.testing.assert_allclose(m(TOKENS)[0], _model(cfg.replace(attention_sink=False))(TOKENS)[0],
                               atol=FP32_ATOL)
    m.layers[0].self_attn.sinks[...] = jnp.full((cfg.num_heads,), 5.0)
    assert float(jnp.abs(m(TOKENS)[0] - base).max()) > 1e-3


def test_bf16_compute_keeps_fp32_logits():
    cfg = preset("tiny", dtype="bfloat16", param_dtype="bfloat16")
    m = _model(cfg)
    h, _, _ = m(TOKENS)
    assert h.dtype == jnp.bfloat16 and m.logits(h).dtype == jnp.float32


def test_bad_model_config_names_the_field():
    with pytest.raises(ModelConfigError, match="model.num_kv_heads: must divide num_heads"):
        ModelConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ModelConfigError, match="model.layer_types: needs 2 entries"):
        ModelConfig(num_layers=2, layer_types=("full",))
    with pytest.raises(ModelConfigError, match="model.sliding_window"):
        ModelConfig(num_layers=1, layer_types=("sliding",))


def test_presets_have_the_published_shapes():
    big = preset("qwen3-30b-a3b")
    assert (big.num_layers, big.hidden_size, big.num_heads, big.num_kv_heads, big.head_dim,
            big.num_experts, big.num_experts_per_tok, big.moe_intermediate_size,
            big.vocab_size) == (48, 2048, 32, 4, 128, 128, 8, 768, 151_936)
    assert 30.0e9 < big.num_params() < 31.0e9
    assert 0.55e9 < preset("qwen3-0.6b").num_params() < 0.65e9
    assert 7.9e9 < preset("qwen3-8b").num_params() < 8.3e9
