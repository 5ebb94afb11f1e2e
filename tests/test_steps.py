"""The jitted train and score steps: mesh equivalence, NaN skipping, gradient accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.config import preset
from models import build
from mopd_jax.batches import GRPOBatch, MOPDBatch, SFTBatch
from mopd_jax.config import OptimizerConfig
from mopd_jax.estimators import DistillLossConfig
from mopd_jax.sharding import batch_sharding, init_sharded, make_mesh
from mopd_jax.steps import (distill_objective, init_train_state, make_optimizer, make_train_step,
                            score_step, sft_objective, state_shardings_of, token_logprobs_step)

CFG = preset("tiny-moe", num_layers=2)
B, T = 8, 12


def _batch(loss_cfg, teacher_params, graphdef, seed=0):
    rng = np.random.RandomState(seed)
    tokens = jnp.asarray(rng.randint(3, CFG.vocab_size, (B, T)), jnp.int32)
    lengths = rng.randint(4, T - 4, B)
    mask = (np.arange(T)[None] >= 4) & (np.arange(T)[None] < 4 + lengths[:, None])
    return MOPDBatch(tokens_BT=tokens, mask_BT=jnp.asarray(mask, jnp.float32),
                     domain_B=jnp.asarray(rng.randint(0, 2, B), jnp.int32), sampler_logp_BT=None,
                     teacher=score_step(graphdef, teacher_params, tokens, loss_cfg=loss_cfg))


@pytest.fixture(scope="module")
def setup():
    graphdef, student = nnx.split(build(CFG, nnx.Rngs(0)))
    _, teacher = nnx.split(build(CFG, nnx.Rngs(1)))
    return graphdef, student, teacher


def _run(graphdef, params, batch, loss_cfg, microbatches=1, mesh=None, steps=2):
    # Adam with eps well above fp32 gradient round-off: otherwise near-zero gradients map
    # round-off to full-size +-lr updates and no two summation orders could agree.
    opt = make_optimizer(OptimizerConfig(lr=1e-2, eps=1e-3, microbatches=microbatches))
    state = init_train_state(jax.tree.map(jnp.copy, params), opt, mesh)
    kw = {}
    if mesh is not None:
        kw = dict(mesh=mesh, state_shardings=state_shardings_of(state),
                  batch_shardings=jax.tree.map(lambda x: batch_sharding(mesh, x.ndim), batch))
    step = make_train_step(graphdef, opt, distill_objective(loss_cfg), microbatches=microbatches,
                           **kw)
    metrics = []
    for _ in range(steps):
        state, m = step(state, batch)
        metrics.append(m)
    return state, metrics


def test_single_device_equals_8_device_mesh(setup):
    graphdef, student, teacher = setup
    loss_cfg = DistillLossConfig(estimator="C", num_domains=2, vocab_chunk=48, seq_chunk=40)
    batch = _batch(loss_cfg, teacher, graphdef)
    ref_state, ref_m = _run(graphdef, student, batch, loss_cfg)
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 2, "expert": 2})
    g2, sharded = init_sharded(lambda: build(CFG, nnx.Rngs(0)), mesh, "train")
    state, m = _run(g2, sharded, batch, loss_cfg, mesh=mesh)
    for a, b in zip(jax.tree.leaves(ref_state["params"]), jax.tree.leaves(state["params"])):
        np.testing.assert_allclose(a, b, atol=2e-5)
    np.testing.assert_allclose(ref_m[-1]["loss"], m[-1]["loss"], rtol=1e-5)
    assert float(m[1]["loss"]) < float(m[0]["loss"])  # the student moves toward the teacher


def test_nan_gradient_is_skipped(setup):
    graphdef, student, teacher = setup
    loss_cfg = DistillLossConfig(estimator="A", num_domains=2)
    batch = _batch(loss_cfg, teacher, graphdef)
    bad = batch.replace(teacher=batch.teacher._replace(
        logp_BT=batch.teacher.logp_BT.at[0, 5].set(jnp.nan)))
    opt = make_optimizer(OptimizerConfig(lr=1e-2))
    state = init_train_state(jax.tree.map(jnp.copy, student), opt)
    before = jax.tree.map(np.asarray, state)
    step = make_train_step(graphdef, opt, distill_objective(loss_cfg))
    state, m = step(state, bad)
    assert int(state["skipped"]) == 1 and not bool(m["finite"])
    for a, b in zip(jax.tree.leaves(before["params"]) + jax.tree.leaves(before["opt_state"]),
                    jax.tree.leaves(state["params"]) + jax.tree.leaves(state["opt_state"])):
        np.testing.assert_array_equal(a, b)
    state, m = step(state, batch)
    assert int(state["skipped"]) == 1 and bool(m["finite"])


@pytest.mark.parametrize("estimator", ["A", "B", "C"])  # C: its lm_head w is not split
def test_microbatch_accumulation_equals_one_batch(setup, estimator):
    graphdef, student, teacher = setup
    loss_cfg = DistillLossConfig(estimator=estimator, num_domains=2, topk=8)
    batch = _batch(loss_cfg, teacher, graphdef)
    one, m1 = _run(graphdef, student, batch, loss_cfg, steps=1)
    four, m4 = _run(graphdef, student, batch, loss_cfg, microbatches=4, steps=1)
    np.testing.assert_allclose(m1[0]["loss"], m4[0]["loss"], rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(one["params"]), jax.tree.leaves(four["params"])):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_score_step_serves_any_params_and_matches_token_logprobs(setup):
    graphdef, student, teacher = setup
    tokens = jnp.asarray(np.random.RandomState(2).randint(0, 128, (2, 9)), jnp.int32)
    cfg = DistillLossConfig(estimator="B", topk=5, vocab_chunk=48)
    compiled_before = score_step._cache_size()
    for params in (student, teacher):
        s = score_step(graphdef, params, tokens, loss_cfg=cfg)
        np.testing.assert_allclose(s.logp_BT, token_logprobs_step(graphdef, params, tokens),
                                   atol=1e-5)
        assert s.topk_ids_BTk.shape == (2, 8, 5)
        assert bool(jnp.all(s.topk_logp_BTk[..., 0] >= s.logp_BT))
    assert score_step._cache_size() == compiled_before + 1  # one compile serves both models


def test_sft_step_lowers_nll(setup):
    graphdef, student, _ = setup
    opt = make_optimizer(OptimizerConfig(lr=1e-2))
    state = init_train_state(jax.tree.map(jnp.copy, student), opt)
    step = make_train_step(graphdef, opt, sft_objective(vocab_chunk=48))
    tokens = jnp.tile(jnp.arange(3, 3 + T, dtype=jnp.int32)[None], (B, 1))
    batch = SFTBatch(tokens_BT=tokens, mask_BT=jnp.ones((B, T), jnp.float32))
    losses = []
    for _ in range(5):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.7 * losses[0]


def test_optimizer_moments_take_the_param_shardings():
    from models.config import preset
    from models import build
    from mopd_jax.config import OptimizerConfig

    mesh = make_mesh({"fsdp": 2, "tensor": 4})
    _, params = init_sharded(lambda: build(preset("tiny"), nnx.Rngs(0)), mesh, "train")
    state = init_train_state(params, make_optimizer(OptimizerConfig(lr=1e-3)), mesh)
    adam = state["opt_state"][1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState
    for p, mu, nu in zip(jax.tree.leaves(params), jax.tree.leaves(adam.mu),
                         jax.tree.leaves(adam.nu)):
        assert mu.sharding.is_equivalent_to(p.sharding, p.ndim), (mu.sharding, p.sharding)
        assert nu.sharding.is_equivalent_to(p.sharding, p.ndim)
    assert any(len(p.sharding.spec) and any(p.sharding.spec) for p in jax.tree.leaves(params))


def test_grpo_objective_is_at_the_rollout_temperature(setup):
    """Old log-probs come from the sampler at T: before any update every ratio is 1, so a
    clip band narrower than any T = 1 mismatch clips nothing."""
    from mopd_jax.steps import grpo_objective
    graphdef, student, _ = setup
    tokens = jnp.asarray(np.random.RandomState(3).randint(3, CFG.vocab_size, (B, T)), jnp.int32)
    mu = token_logprobs_step(graphdef, student, tokens, temperature=1.7)
    batch = GRPOBatch(tokens_BT=tokens, mask_BT=jnp.ones((B, T)).at[:, :4].set(0.0),
                      domain_B=None, sampler_logp_BT=jnp.pad(mu, ((0, 0), (1, 0))),
                      adv_B=jnp.linspace(-1.0, 1.0, B))
    model = nnx.merge(graphdef, student)
    for temperature, clipped in ((1.7, False), (1.0, True)):
        _, metrics = grpo_objective(clip_low=1e-4, clip_high=1e-4, temperature=temperature,
                                    vocab_chunk=64)(model, batch)
        assert (float(metrics["clip_frac"]) > 0.1) == clipped, (temperature, metrics["clip_frac"])


@pytest.mark.parametrize("aggregation", ["seq_mean", "token_sum"])  # rows; rows x T
def test_microbatches_with_uneven_padding_equal_one_batch(setup, aggregation):
    """GRPO padding rows (no response) land unevenly in strided microbatches: rows 2, 4, 6
    leave microbatch 0 (rows 0, 2, 4, 6) with one real row and microbatch 1 with four. Each
    microbatch weighs by its share of the loss's denominator, so the step equals one batch."""
    from mopd_jax.steps import grpo_objective
    graphdef, student, _ = setup
    rng = np.random.RandomState(4)
    tokens = jnp.asarray(rng.randint(3, CFG.vocab_size, (B, T)), jnp.int32)
    lengths = rng.randint(2, T - 4, B)
    mask = (np.arange(T)[None] >= 4) & (np.arange(T)[None] < 4 + lengths[:, None])
    mask[[2, 4, 6]] = False
    adv = np.where(mask.any(-1), rng.normal(size=B), 0.0).astype(np.float32)
    mu = token_logprobs_step(graphdef, student, tokens)
    batch = GRPOBatch(tokens_BT=tokens, mask_BT=jnp.asarray(mask, jnp.float32),
                      domain_B=jnp.zeros((B,), jnp.int32),
                      sampler_logp_BT=jnp.pad(mu, ((0, 0), (1, 0))) - 0.1, adv_B=adv)
    out = []
    for k in (1, 2):
        opt = make_optimizer(OptimizerConfig(lr=1e-2, eps=1e-3, microbatches=k))
        state = init_train_state(jax.tree.map(jnp.copy, student), opt)
        step = make_train_step(graphdef, opt, grpo_objective(aggregation=aggregation,
                                                             vocab_chunk=64), microbatches=k)
        out.append(step(state, batch))
    (one, m1), (two, m2) = out
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5, atol=1e-7)
    for a, b in zip(jax.tree.leaves(one["params"]), jax.tree.leaves(two["params"])):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_the_train_step_compiles_once_on_a_one_device_mesh(setup):
    """The state's counters start as NamedShardings on the mesh, as the step returns them: a
    SingleDeviceSharding there compiled the step a second time on its second call."""
    graphdef, student, _ = setup
    mesh = make_mesh(None, devices=jax.devices()[:1])
    params = jax.device_put(student, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    opt = make_optimizer(OptimizerConfig(lr=1e-3))
    state = init_train_state(params, opt, mesh)
    step = make_train_step(graphdef, opt, sft_objective(vocab_chunk=64), mesh=mesh)
    batch = SFTBatch(tokens_BT=np.ones((4, 8), np.int32), mask_BT=np.ones((4, 8), np.int32))
    for _ in range(3):
        state, _ = step(state, batch)
    (fn, _), = step._jitted.values()
    assert fn._cache_size() == 1
