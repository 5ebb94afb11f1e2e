"""FLOP accounting: causal attention counts the pairs a query sees, a train step is 3 forwards,
and the HLO count multiplies a loop body by its trips (XLA's cost_analysis counts it once)."""


import jax
import jax.numpy as jnp
import pytest

from models.config import preset
from mopd_jax import flops


def test_visible_pairs_count_causal_and_sliding_masks():
    for T, W in [(1, None), (7, None), (16, 4), (5, 8), (9, 9)]:
        brute = sum(1 for i in range(T) for j in range(T)
                    if j <= i and (W is None or i - j < W))
        assert flops.visible_pairs(T, W) == brute
    assert flops.visible_pairs(4096) / 4096**2 == pytest.approx(0.5, abs=1e-3)  # ~ full / 2


def test_model_flops_causal_train_is_three_forwards():
    cfg = preset("qwen3-0.6b")
    B, T = 2, 1024
    fwd = flops.forward_flops(cfg, B, T)
    matmul = 2 * flops.active_matmul_params(cfg) * B * T
    full_attn = 4 * cfg.num_heads * 2 * cfg.head_dim * T * T * B * cfg.num_layers
    assert fwd - matmul == pytest.approx(full_attn * (T + 1) / (2 * T))
    assert flops.train_flops(cfg, B, T) == 3 * fwd
    moe = preset("qwen3-30b-a3b")  # experts count by the k active, not the E held
    D, F, k = moe.hidden_size, moe.moe_intermediate_size, moe.num_experts_per_tok
    dense_of_moe = flops.active_matmul_params(moe.replace(num_experts_per_tok=k + 1))
    assert dense_of_moe - flops.active_matmul_params(moe) == 3 * D * F * moe.num_layers


def test_hlo_flops_equal_dots_and_count_loop_bodies_per_trip():
    a, b, c = jnp.ones((64, 128)), jnp.ones((128, 256)), jnp.ones((256, 32))
    comp = jax.jit(lambda a, b, c: (a @ b) @ c).lower(a, b, c).compile()
    expect = 2 * 64 * 128 * 256 + 2 * 64 * 256 * 32
    assert flops.hlo_flops(comp.as_text())["flops"] == expect
    assert flops.cost_analysis_flops(comp) == expect  # no loop, no elementwise: they agree

    def layers(x, ws):
        return jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x, ws)[0]

    x, ws = jnp.ones((64, 128)), jnp.ones((7, 128, 128))
    one = 2 * 64 * 128 * 128
    comp = jax.jit(jax.grad(lambda x, ws: layers(x, ws).sum(), 1)).lower(x, ws).compile()
    h = flops.hlo_flops(comp.as_text())
    assert h["flops"] == 3 * 7 * one and [t for _, t in h["loops"]] == [7, 7]
    assert flops.cost_analysis_flops(comp) < 7 * one  # XLA's own count: each body once


def test_hlo_flops_read_tpu_trip_counts_from_the_loop_condition():
    """XLA:TPU does not annotate known_trip_count: the count comes from ``i < N``."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from mopd_jax import compile_check as cc

    chip = NamedSharding(Mesh(cc.target_devices(cc.parse_topology("v5p-8"))[:1], ("x",)), P())
    x = jax.ShapeDtypeStruct((256, 256), jnp.bfloat16, sharding=chip)
    ws = jax.ShapeDtypeStruct((7, 256, 256), jnp.bfloat16, sharding=chip)

    def layers(x, ws):
        return jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x, ws)[0]

    hlo = jax.jit(jax.grad(lambda x, ws: layers(x, ws).astype(jnp.float32).sum(), 1)).lower(
        x, ws).compile().as_text()
    assert "known_trip_count" not in hlo
    h = flops.hlo_flops(hlo)
    assert not h["unknown_trips"] and sorted(t for _, t in h["loops"]) == [7, 7]
    assert h["flops"] == 3 * 7 * 2 * 256**3


def test_hlo_flops_of_tpu_batched_dots_written_as_padded_convolutions():
    """XLA:TPU writes attention's batched dots as convolutions over padded windows (one valid
    tap in K): counted by valid taps, they equal the analytic count, gradients included."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from mopd_jax import compile_check as cc

    chip = NamedSharding(Mesh(cc.target_devices(cc.parse_topology("v5p-8"))[:1], ("x",)), P())

    def attention(q, k, v, w):
        s = jnp.einsum("btkgh,bksh->bkgts", q, k)
        p = jax.nn.softmax(s.astype(jnp.float32)).astype(q.dtype)
        o = jnp.einsum("bkgts,bksh->btkgh", p, v)
        return (jnp.einsum("btkgh,kghd->btd", o, w).astype(jnp.float32) ** 2).sum()

    B, T, K, G, H, D = 2, 256, 2, 4, 128, 512
    sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=chip)  # noqa: E731
    args = (sds(B, T, K, G, H), sds(B, K, T, H), sds(B, K, T, H), sds(K, G, H, D))
    fwd = 2 * B * T * T * K * G * H * 2 + 2 * B * T * K * G * H * D
    for fn, expect in ((attention, fwd), (jax.grad(attention, argnums=(0, 1, 2, 3)), 3 * fwd)):
        hlo = jax.jit(fn).lower(*args).compile().as_text()
        assert "pad=" in hlo and " convolution(" in hlo
        assert flops.hlo_flops(hlo)["flops"] == expect
