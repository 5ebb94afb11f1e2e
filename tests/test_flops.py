"""FLOP accounting: causal attention counts the pairs a query sees, a train step is 3 forwards,
and the HLO count multiplies a loop body by its trips (XLA's cost_analysis counts it once)."""

import contextlib
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
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
    # full attention: QK^T and PV, each 2 * T * T * head_dim FLOPs per head (MaxText's count)
    full_attn = 2 * 2 * T * T * cfg.head_dim * cfg.num_heads * B * cfg.num_layers
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


def _v5p_chip():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from mopd_jax import compile_check as cc

    return NamedSharding(Mesh(cc.target_devices(cc.parse_topology("v5p-8"))[:1], ("x",)), P())


@pytest.mark.parametrize("fused", [False, True])
def test_hlo_flops_count_splash_kernels_by_the_pairs_a_causal_row_sees(fused):
    """Splash hands XLA no cost estimate: its kernels, compiled for v5p, are counted from their
    q, k, v operands. The forward is the model's causal attention (4 B H T(T+1)/2 Hd); the dq
    kernel recomputes QK and dP (6 per pair and Hd), the dkv kernel QK, dP, dK, dV (8), the
    fused backward forms dQ there as well (10) instead of in a dq kernel."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    B, H, K, T, Hd, b = 2, 4, 2, 512, 128, 128
    dq_blocks = {} if fused else {"block_q_dq": b, "block_kv_dq": b}
    sizes = sk.BlockSizes(block_q=b, block_kv=b, block_q_dkv=b, block_kv_dkv=b,
                          use_fused_bwd_kernel=fused, **dq_blocks)
    kernel = sk.make_splash_mha(sm.MultiHeadMask([sm.CausalMask((T, T))] * H),
                                block_sizes=sizes, head_shards=1, q_seq_shards=1)

    def attend(q, k, v):
        return jax.vmap(kernel)(q, k, v).astype(jnp.float32).sum()

    chip = _v5p_chip()
    sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=chip)  # noqa: E731
    args = (sds(B, H, T, Hd), sds(B, K, T, Hd), sds(B, K, T, Hd))
    unit = 2 * B * H * flops.visible_pairs(T) * Hd  # one [pairs, Hd] matmul
    with jax.default_matmul_precision("default"):  # conftest's fp32 dots do not lower in Mosaic
        fwd = flops.hlo_flops(jax.jit(attend).lower(*args).compile().as_text())
        grad = jax.jit(jax.grad(attend, argnums=(0, 1, 2))).lower(*args).compile().as_text()
    assert fwd["custom_call"] == 2 * unit and fwd["dot"] == fwd["conv"] == 0
    cfg = preset("tiny").replace(num_heads=H, head_dim=Hd, num_layers=1)
    assert 2 * unit == B * flops._attn_per_pair(cfg) * flops.visible_pairs(T)
    kernels = re.findall(r"splash_mha_(fwd|dq|dkv)\w*(?:\.\d+)? = ", grad)
    assert sorted(kernels) == sorted(["fwd", "dkv"] + ([] if fused else ["dq"]))
    assert flops.hlo_flops(grad)["custom_call"] == (2 + 5 if fused else 2 + 3 + 4) * unit


def test_chunked_loss_tiles_split_over_the_tensor_axis():
    """On a 2 x 4 (fsdp x tensor) mesh every device multiplies only its share of the chunked
    loss's lm_head tiles, also when the vocabulary chunk asked for (250 of V = 1000) is not a
    multiple of the tensor axis; the values and gradients equal one device's."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from mopd_jax import sharding as shd
    from mopd_jax.chunked import chunked_reverse_kl, chunked_token_logprobs

    mesh = shd.make_mesh(shd.MeshConfig(fsdp=2, tensor=4))
    B, T, D, V = 4, 64, 64, 1000
    ks = jax.random.split(jax.random.key(0), 4)
    h, th = (jax.random.normal(k, (B, T, D)) for k in ks[:2])
    w, tw = (jax.random.normal(k, (D, V)) / 8 for k in ks[2:])
    ids = jax.random.randint(ks[0], (B, T), 0, V)
    chunks = {"vocab_chunk": 256, "seq_chunk": 64}

    def loss(h, w, th, tw, ids, mesh=None):
        with shd.use_rules(mesh, "train") if mesh is not None else contextlib.nullcontext():
            return (chunked_token_logprobs(h, w, ids, **chunks).sum()
                    + chunked_reverse_kl(h, w, th, tw, **chunks).sum())

    grad = jax.value_and_grad(loss, argnums=(0, 1))
    one = jax.jit(grad).lower(h, w, th, tw, ids).compile()
    rows, cols = NamedSharding(mesh, P("fsdp")), NamedSharding(mesh, P("fsdp", "tensor"))
    put = [jax.device_put(x, s) for x, s in zip((h, w, th, tw, ids),
                                                 (rows, cols, rows, cols, rows))]
    split = jax.jit(functools.partial(grad, mesh=mesh)).lower(*put).compile()
    per_device = flops.hlo_flops(split.as_text())["dot"]
    share = flops.hlo_flops(one.as_text())["dot"] / mesh.size
    assert share <= per_device <= 1.03 * share  # 1024 padded columns for 1000: 2.4%
    (v1, g1), (v8, g8) = one(h, w, th, tw, ids), split(*put)
    np.testing.assert_allclose(v8, v1, rtol=1e-5)
    for a, b in zip(g8, g1):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_hlo_flops_inferred_trips_follow_the_counter_step():
    """XLA:TPU's windowed einsum (an all-gathered matmul as a loop over shards) steps its
    counter by two and does two shards a trip: i < 8 by 2 is 4 trips, not 8."""
    hlo = """HloModule m

%body (p: (s32[], f32[8,8])) -> (s32[], f32[8,8]) {
  %p = (s32[], f32[8,8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8,8] get-tuple-element(%p), index=1
  %d = f32[8,8] dot(%x, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %e = f32[8,8] dot(%d, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %two = s32[] constant(2)
  %j = s32[] add(%i, %two)
  ROOT %t = (s32[], f32[8,8]) tuple(%j, %e)
}

%cond (p: (s32[], f32[8,8])) -> pred[] {
  %p = (s32[], f32[8,8]) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(8)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: f32[8,8]) -> f32[8,8] {
  %x = f32[8,8] parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[8,8]) tuple(%zero, %x)
  %w = (s32[], f32[8,8]) while(%init), condition=%cond, body=%body
  ROOT %r = f32[8,8] get-tuple-element(%w), index=1
}
"""
    h = flops.hlo_flops(hlo)
    assert [t for _, t in h["loops"]] == [4] and not h["unknown_trips"]
    assert h["flops"] == 4 * 2 * (2 * 8 * 8 * 8)
    assert sum(flops.flops_by_op(hlo).values()) == h["flops"]


def test_splash_under_save_attention_remat_runs_each_kernel_once_a_layer():
    """A tiny scanned model's train gradient compiled for v5p with ``save_attention`` remat:
    splash's output and logsumexp are saved, so the backward has no second forward kernel, and
    its one fused backward kernel forms dQ, dK and dV: 2 + 5 [pairs, Hd] matmuls a layer."""
    from helpers import v5p_train_grad_hlo

    cfg = preset("tiny", dtype="bfloat16", param_dtype="bfloat16", scan_layers=True,
                 remat="save_attention")
    B, T = 8, 256
    mesh, hlo = v5p_train_grad_hlo(cfg, B, T)
    kernels = re.findall(r"splash_mha_(fwd|dq|dkv)\w*(?:\.\d+)? = ", hlo)
    assert sorted(kernels) == ["dkv", "fwd"]  # one scanned body each
    unit = 2 * (B // mesh.size) * cfg.num_heads * flops.visible_pairs(T) * cfg.head_dim
    assert flops.hlo_flops(hlo)["custom_call"] == 7 * unit * cfg.num_layers
