"""Long rows (issue 14): attention backends against the dense reference, linear memory of the
blockwise kernel, layer scan and remat against the unrolled model, chunked teacher scoring,
strided microbatches with fp32 accumulation, and splash in TPU-compiled HLO."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from models import attention as A
from models import attention_kernels as AK
from models.config import preset
from models.decoder import forward_with_routing, layer_groups
from models.hf import iter_hf_tensors, load_hf_params, save_hf


def _qkv(B=2, T=37, S=None, H=4, K=2, Hd=16, E=None, seed=0):
    S, E = S or T, E or Hd
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    return (jax.random.normal(k[0], (B, T, H, Hd)), jax.random.normal(k[1], (B, K, S, Hd)),
            jax.random.normal(k[2], (B, K, S, E)), jax.random.normal(k[3], (H,)))


def _check(impl_fn, *, T=37, E=None, window=None, sinks=False, pad=True, tol=2e-5):
    """``impl_fn(q, k, v, valid, window, sinks)`` equals the reference on real rows: values
    and the gradients of q, k, v (and sinks) under a random cotangent on real rows."""
    q, k, v, s = _qkv(T=T, E=E)
    B, Hd = q.shape[0], q.shape[-1]
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    valid = (jnp.arange(T)[None] < jnp.array([T, T - 3])[:, None]) if pad else None
    rows = np.ones((B, T), bool) if valid is None else np.asarray(valid)
    sk = s if sinks else None
    w = jax.random.normal(jax.random.PRNGKey(9), (*q.shape[:3], v.shape[-1])) * rows[..., None,
                                                                                     None]

    def ref(q, k, v, sk):
        return A.reference(q, k, v, pos, pos, valid, window, sk, 1 / np.sqrt(Hd))

    def new(q, k, v, sk):
        return impl_fn(q, k, v, valid, window, sk)

    r, n = ref(q, k, v, sk), new(q, k, v, sk)
    assert n.shape == r.shape and n.dtype == r.dtype
    np.testing.assert_allclose(np.where(rows[..., None, None], n, 0),
                               np.where(rows[..., None, None], r, 0), atol=tol, rtol=tol)
    argnums = (0, 1, 2, 3) if sinks else (0, 1, 2)
    g_r = jax.grad(lambda *a: jnp.sum(ref(*a) * w), argnums)(q, k, v, sk)
    g_n = jax.grad(lambda *a: jnp.sum(new(*a) * w), argnums)(q, k, v, sk)
    for a, b in zip(g_r, g_n):
        np.testing.assert_allclose(b, a, atol=10 * tol, rtol=10 * tol)


FEATURES = [dict(), dict(window=5), dict(sinks=True), dict(window=7, sinks=True, T=50, E=8)]


@pytest.mark.parametrize("feat", FEATURES, ids=["causal", "window", "sinks", "window+sinks"])
def test_blockwise_equals_reference(feat):
    def blockwise(q, k, v, valid, window, sk):  # blocks of 16: three q and key blocks, odd tail
        pos = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
        return A.blockwise(q, k, v, pos, pos, valid, window, sk, 1 / np.sqrt(q.shape[-1]), 16)
    _check(blockwise, **feat)


@pytest.mark.parametrize("feat", [FEATURES[1], FEATURES[3]], ids=["window", "window+sinks"])
def test_splash_interpret_equals_reference(feat):
    def splash(q, k, v, valid, window, sk):
        return AK.splash(q, k, v, valid, window, sk, 1 / np.sqrt(q.shape[-1]), 128, True)
    _check(splash, **feat)


def test_gpu_backends_equal_reference():
    """The Pallas GPU kernel in interpret mode; the cuDNN call's argument mapping (right padding
    as key lengths, the window) through the same jax.nn.dot_product_attention on XLA."""
    def pallas_gpu(q, k, v, valid, window, sk):
        return AK.pallas_gpu(q, k, v, valid, 1 / np.sqrt(q.shape[-1]), True)
    _check(pallas_gpu)
    for window in (None, 5):
        q, k, v, _ = _qkv()
        pos = jnp.broadcast_to(jnp.arange(37), (2, 37))
        valid = jnp.arange(37)[None] < jnp.array([37, 32])[:, None]
        r = A.reference(q, k, v, pos, pos, valid, window, None, 0.25)
        c = AK.cudnn(q, k, v, valid, window, 0.25, implementation="xla")
        np.testing.assert_allclose(np.where(np.asarray(valid)[..., None, None], c, 0),
                                   np.where(np.asarray(valid)[..., None, None], r, 0), atol=2e-5)


def test_cached_decode_is_blockwise_over_the_live_cache():
    """Decode (queries at positions 3.. and S-T.., keys of a 40-slot cache): blockwise, which
    skips blocks past each query, equals the reference; unsupported backends hand it over."""
    q, k, v, s = _qkv(T=5, S=40)
    q_pos = jnp.stack([jnp.arange(5) + 3, jnp.arange(5) + 35])
    k_pos = jnp.broadcast_to(jnp.arange(40), (2, 40))
    for window, sk in ((None, None), (6, s)):
        r = A.reference(q, k, v, q_pos, k_pos, None, window, sk, 0.25)
        b = A.blockwise(q, k, v, q_pos, k_pos, None, window, sk, 0.25, 8)
        np.testing.assert_allclose(b, r, atol=2e-6)
    kw = dict(T=1, S=4096, cached=True, sinks=False, window=None, same_width=True)
    assert A.resolve("splash", **kw, platform="tpu") == "blockwise"
    assert A.resolve("auto", **kw, platform="cpu") == "blockwise"
    assert A.resolve("auto", **{**kw, "S": 64}, platform="cpu") == "reference"
    assert A.resolve("auto", **{**kw, "cached": False}, platform="tpu") == "splash"
    assert A.resolve("cudnn", **{**kw, "cached": False, "sinks": True}) == "blockwise"


def _train_temp_bytes(fn, T: int) -> int:
    q, k, v = (jax.ShapeDtypeStruct(s, jnp.float32)
               for s in ((1, T, 4, 32), (1, 2, T, 32), (1, 2, T, 32)))
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v)), (0, 1, 2)))
    return grad.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes


def test_blockwise_memory_grows_linearly_with_length():
    """XLA's compiled temp memory of attention fwd+bwd at T and 2T: ~2x for blockwise (linear),
    ~4x for the dense reference (quadratic)."""
    def blockwise(q, k, v):
        pos = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
        return A.blockwise(q, k, v, pos, pos, None, None, None, 0.2, 256)

    def reference(q, k, v):
        pos = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
        return A.reference(q, k, v, pos, pos, None, None, None, 0.2)

    b1, b2 = _train_temp_bytes(blockwise, 2048), _train_temp_bytes(blockwise, 4096)
    r1, r2 = _train_temp_bytes(reference, 2048), _train_temp_bytes(reference, 4096)
    assert b2 / b1 < 2.5, (b1, b2)
    assert r2 / r1 > 3.5, (r1, r2)
    assert b2 < r2 / 8


# ----------------------------------------------------------------------------- scan and remat
def _pair(name="tiny-mimo", **kw):
    """The same initial model unrolled and scanned (same rngs, so the same weights)."""
    base = preset(name, moe_impl="dense")
    m0 = models.build(dataclasses.replace(base, scan_layers=False), nnx.Rngs(0))
    m1 = models.build(dataclasses.replace(base, scan_layers=True, **kw), nnx.Rngs(0))
    return m0, m1


def _hf_of(state_or_model, cfg) -> dict:
    state = state_or_model if isinstance(state_or_model, nnx.State) else nnx.state(
        state_or_model)
    return dict(iter_hf_tensors(state, cfg))


def _loss(m, tok):
    h, _, aux = m(tok)
    return jnp.sum(m.logits(h) ** 2) * 1e-3 + aux


@nnx.jit
def _value_and_grad(m, tok):  # jitted: one compile instead of hundreds of eager op compiles
    return nnx.value_and_grad(_loss)(m, tok)


@nnx.jit
def _prefill_then_decode(m, tok):
    _, cache, _ = m(tok[:, :6], cache=m.init_cache(tok.shape[0], 16))
    return m(tok[:, 6:7], jnp.full((tok.shape[0], 1), 6), cache=cache)[0]


def test_scan_equals_unrolled_with_hybrid_groups_routing_and_cache():
    m0, m1 = _pair()
    assert layer_groups(m1.cfg) == ((0, 1), (1, 4), (5, 1))  # dense first, 4 sliding, full
    assert _hf_of(m0, m0.cfg).keys() == _hf_of(m1, m1.cfg).keys()
    tok = jax.random.randint(jax.random.PRNGKey(1), (2, 11), 0, m0.cfg.vocab_size)
    l0, g0 = _value_and_grad(m0, tok)
    l1, g1 = _value_and_grad(m1, tok)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    t0, t1 = _hf_of(g0, m0.cfg), _hf_of(g1, m1.cfg)
    for key in t0:
        np.testing.assert_allclose(t1[key], t0[key], atol=1e-6, err_msg=key)
    routed = nnx.jit(lambda m, t: forward_with_routing(m, t)[1])
    r0, r1 = routed(m0, tok), routed(m1, tok)
    assert sorted(r0) == sorted(r1) == [1, 2, 3, 4, 5]
    assert all(bool((r0[i] == r1[i]).all()) for i in r0)
    replay = {i: (r + 1) % m0.cfg.num_experts for i, r in r0.items()}  # replay other experts
    replayed = nnx.jit(lambda m, t, e: m(t, expert_ids=e)[0])
    np.testing.assert_allclose(replayed(m1, tok, replay), replayed(m0, tok, replay), atol=1e-5)
    np.testing.assert_allclose(_prefill_then_decode(m1, tok), _prefill_then_decode(m0, tok),
                               atol=1e-5)


@pytest.mark.parametrize("remat", ["full", "save_dots", "save_attention", "offload"])
def test_remat_equals_none(remat):
    m0, m1 = _pair("tiny-moe", remat=remat)
    tok = jax.random.randint(jax.random.PRNGKey(2), (2, 9), 0, m0.cfg.vocab_size)
    t0 = _hf_of(_value_and_grad(m0, tok)[1], m0.cfg)
    t1 = _hf_of(_value_and_grad(m1, tok)[1], m1.cfg)
    for key in t0:
        np.testing.assert_allclose(t1[key], t0[key], atol=1e-6, err_msg=key)


def test_scanned_model_hf_round_trip(tmp_path):
    """A scanned model exports the Hub layout; an unrolled model loads it, and back."""
    m0, m1 = _pair()
    tok = jax.random.randint(jax.random.PRNGKey(3), (1, 8), 0, m0.cfg.vocab_size)
    save_hf(nnx.state(m1), m1.cfg, tmp_path / "hf")
    for target in (m0, m1):
        gdef, abstract = nnx.split(nnx.eval_shape(lambda t=target: models.build(
            t.cfg, nnx.Rngs(5))))
        loaded = nnx.merge(gdef, load_hf_params(tmp_path / "hf", abstract, target.cfg))
        np.testing.assert_allclose(loaded(tok)[0], m1(tok)[0], atol=1e-5)


def test_model_dirs_load_in_either_layer_layout(tmp_path):
    """A model directory saved unrolled (e.g. before the layer scan) restores into the scanned
    layout and a scanned one into the unrolled layout (``runtime`` overrides, as ``run.init``
    and the teachers apply them), sharded over the 8-device mesh."""
    import json

    from mopd_jax.checkpoint import load_model_params, save_model
    from mopd_jax.sharding import make_mesh

    m0, m1 = _pair()
    save_model(tmp_path / "unrolled", nnx.state(m0), m0.cfg)
    save_model(tmp_path / "scanned", nnx.state(m1), m1.cfg)
    assert json.loads((tmp_path / "scanned" / "model.json").read_text())["scan_layers"]
    tok = jnp.arange(8)[None] % m0.cfg.vocab_size
    want = m0(tok)[0]
    for src, scan in (("unrolled", True), ("scanned", False)):
        cfg, gdef, state = load_model_params(tmp_path / src, make_mesh(), "train",
                                             {"scan_layers": scan})
        loaded = nnx.merge(gdef, state)
        assert cfg.scan_layers is scan and hasattr(loaded, "blocks") is scan
        assert len(jax.tree.leaves(state)[0].sharding.device_set) == 8
        np.testing.assert_allclose(loaded(tok)[0], want, atol=1e-5)


def test_splash_is_the_attention_compiled_for_a_v5p_topology():
    """A tiny bf16 model's train gradient, compiled with libtpu for a v5p compile-only mesh
    (no TPU): attention 'auto' resolves to splash from the mesh's platform, and its forward
    and its fused backward kernel (dQ beside dK, dV: no dq kernel) are TPU custom calls in the
    HLO."""
    import re

    from helpers import v5p_train_grad_hlo

    _, hlo = v5p_train_grad_hlo(preset("tiny", dtype="bfloat16", param_dtype="bfloat16"))
    assert "tpu_custom_call" in re.findall(r'custom_call_target="([^"]+)"', hlo)
    for kernel in ("splash_mha_fwd", "splash_mha_dkv"):
        assert kernel in hlo, kernel
    assert "splash_mha_dq" not in hlo


def test_sampler_logprob_equals_trainer_with_scan_and_blockwise(monkeypatch):
    """The rollout engine's log-probs (prefill and decode through the KV cache, blockwise over
    16-position blocks) equal the trainer's full forward on a scanned model."""
    from mopd_jax.chunked import chunked_token_logprobs
    from mopd_jax.sampling import Engine, SamplingParams, rollout

    monkeypatch.setattr(A, "BLOCK", 16)
    cfg = preset("tiny-moe", scan_layers=True, attention_impl="blockwise", moe_impl="dense")
    graphdef, params = nnx.split(models.build(cfg, nnx.Rngs(0)))
    engine = Engine(graphdef, params, max_concurrent_decodes=4, max_prefill_length=32,
                    max_target_length=56)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(1, 128, size=n).tolist() for n in (4, 21, 9)]
    batch = rollout(engine, params, prompts, n=1, sampling=SamplingParams(temperature=1.0))
    model = nnx.merge(graphdef, params)
    tokens = jnp.asarray(batch.tokens)
    hidden, _, _ = model(tokens)
    trainer = np.asarray(chunked_token_logprobs(hidden[:, :-1], model.lm_head_weight(),
                                                tokens[:, 1:], vocab_chunk=32, seq_chunk=16))
    mask = batch.response_mask[:, 1:]
    assert mask.sum() > 40 and tokens.shape[1] > 32  # rows cross several 16-key blocks
    np.testing.assert_allclose(batch.logprobs[:, 1:][mask], trainer[mask], atol=1e-5)


def test_microbatches_are_strided_and_gradients_accumulate_in_fp32():
    """Microbatch j holds rows j, j + k, ... (each spans every batch shard), and bf16
    parameters accumulate their gradients in fp32: 1 + 3 * 2**-8 survives (bf16 sums stay 1)."""
    import optax

    from mopd_jax.steps import _split_microbatches, make_train_step

    mbs = _split_microbatches({"x": jnp.arange(8)}, 4)["x"]
    assert mbs.tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]

    class Scalar(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((), jnp.bfloat16))

    gdef, params = nnx.split(Scalar())

    def objective(model, batch):  # d loss / d w = this microbatch's x
        return jnp.sum(model.w[...].astype(jnp.float32) * batch["x"]), {}

    opt = optax.sgd(0.0)
    state = {"params": params, "opt_state": opt.init(params), "step": jnp.zeros((), jnp.int32),
             "skipped": jnp.zeros((), jnp.int32)}
    x = jnp.asarray([1.0, 2**-8, 2**-8, 2**-8], jnp.float32)
    _, metrics = make_train_step(gdef, opt, objective, microbatches=4)(state, {"x": x})
    fp32_mean = float(jnp.asarray((1 + 3 * 2**-8) / 4, jnp.bfloat16))
    assert fp32_mean != 0.25 and float(metrics["grad_norm"]) == fp32_mean
