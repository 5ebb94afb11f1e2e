"""Router replay (R3): the sampler records each MoE layer's experts per token, the trainer's
forward uses them; the gate weights come from the current router, which keeps learning."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from models.config import preset
from mopd_jax.batches import MOPDBatch
from mopd_jax.estimators import DistillLossConfig
from mopd_jax.sampling import Engine, SamplingParams, rollout
from mopd_jax.sampling.engine import EngineError
from mopd_jax.steps import (distill_objective, init_train_state, make_optimizer,
                            make_train_step, score_step, student_forward)
from mopd_jax.config import OptimizerConfig

CFG = preset("tiny-moe", num_layers=2)


@pytest.fixture(scope="module")
def sampled():
    graphdef, params = nnx.split(models.build(CFG, nnx.Rngs(0)))
    engine = Engine(graphdef, params, max_concurrent_decodes=8, max_prefill_length=16,
                    max_target_length=32, record_routing=True)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(1, 100, size=rng.integers(3, 12))) for _ in range(6)]
    rb = rollout(engine, params, prompts, n=2, seed=1,
                 sampling=SamplingParams(temperature=1.0, max_new_tokens=12))
    return graphdef, params, rb


def _fed(rb):
    """[R, T] positions whose token the sampler fed (all but each row's last token)."""
    return np.arange(rb.tokens.shape[1])[None] < (rb.lengths - 1)[:, None]


def _routing(graphdef, params, tokens, expert_ids=None):
    model = nnx.merge(graphdef, params)
    kw = {} if expert_ids is None else {"expert_ids": expert_ids}
    _, ids = models.forward_with_routing(model, jnp.asarray(tokens), **kw)
    return np.stack([np.asarray(ids[i]) for i in model.moe_layers()], axis=2)


def _same_experts(a, b):
    return np.all(np.sort(a, -1) == np.sort(b.astype(a.dtype), -1), -1)  # [..., L]


def _moved(params, scale=0.5, seed=3):
    """The weights after a large step: every router matrix perturbed."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = [x + scale * jax.random.normal(k, x.shape, x.dtype) * jnp.std(x)
           if "router" in jax.tree_util.keystr(p) else x
           for (p, x), k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(tree, out)


def test_the_engine_records_what_a_full_forward_chooses(sampled):
    graphdef, params, rb = sampled
    R, T = rb.tokens.shape
    layers = nnx.merge(graphdef, params).moe_layers()
    assert rb.expert_ids.shape == (R, T, len(layers), CFG.num_experts_per_tok)
    assert rb.expert_ids.dtype == np.uint8  # one byte per id up to 256 experts
    fed = _fed(rb)
    same = _same_experts(_routing(graphdef, params, rb.tokens), rb.expert_ids)
    assert same[fed].all()  # prompt (prefill) and response (decode) positions alike
    assert not rb.expert_ids[~fed].any()  # never fed: zeros


def test_replay_keeps_the_sampler_experts_after_the_weights_moved(sampled):
    graphdef, params, rb = sampled
    moved, fed = _moved(params), _fed(rb)
    rerouted = _same_experts(_routing(graphdef, moved, rb.tokens), rb.expert_ids)
    assert rerouted[fed].mean() < 0.95  # the moved router chooses differently ...
    model = nnx.merge(graphdef, moved)
    replay = {i: jnp.asarray(rb.expert_ids[:, :, j], jnp.int32)
              for j, i in enumerate(model.moe_layers())}
    replayed = _same_experts(_routing(graphdef, moved, rb.tokens, replay), rb.expert_ids)
    assert replayed[fed].all()  # ... replay uses the sampler's


def test_student_forward_replays_the_batch_routing_and_the_router_learns(sampled):
    graphdef, params, rb = sampled
    moved = _moved(params)
    loss_cfg = DistillLossConfig(estimator="C", num_domains=1, vocab_chunk=64, seq_chunk=16)
    _, teacher = nnx.split(models.build(CFG, nnx.Rngs(1)))
    tokens = jnp.asarray(rb.tokens)
    batch = MOPDBatch(tokens_BT=tokens, mask_BT=jnp.asarray(rb.response_mask, jnp.int32),
                      domain_B=jnp.zeros((len(rb),), jnp.int32),
                      sampler_logp_BT=jnp.asarray(rb.logprobs),
                      teacher=score_step(graphdef, teacher, tokens, loss_cfg=loss_cfg),
                      expert_ids_BTLk=jnp.asarray(rb.expert_ids))
    model = nnx.merge(graphdef, moved)
    replay = {i: jnp.asarray(rb.expert_ids[:, :-1, j], jnp.int32)
              for j, i in enumerate(model.moe_layers())}
    want = model(tokens[:, :-1], expert_ids=replay)[0]
    np.testing.assert_array_equal(student_forward(model, batch)[0], want)
    assert not np.allclose(student_forward(model, batch.replace(expert_ids_BTLk=None))[0], want)

    opt = make_optimizer(OptimizerConfig(lr=1e-2))
    step = make_train_step(graphdef, opt, distill_objective(loss_cfg))
    state = init_train_state(jax.tree.map(jnp.copy, moved), opt)
    before = jax.tree.map(np.asarray, state["params"])
    state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))
    changed = {jax.tree_util.keystr(p): not np.array_equal(a, np.asarray(b))
               for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(before)[0],
                                    jax.tree.leaves(state["params"]))}
    routers = [v for k, v in changed.items() if "router" in k]
    assert routers and all(routers)  # replayed experts, yet the gate weights train the router


def test_a_dense_model_has_no_routing_to_record():
    dense = preset("tiny")
    graphdef, params = nnx.split(models.build(dense, nnx.Rngs(0)))
    with pytest.raises(EngineError, match="no MoE layers"):
        Engine(graphdef, params, max_prefill_length=16, record_routing=True)


def test_a_bf16_sampler_flips_routings_and_replay_removes_that_mismatch(sampled):
    """What ``mopd bench replay`` measures, on the fixture's rollouts: same numerics leave
    nothing to fix; a bf16 sampler flips some routings, and replay shrinks |log pi - mu|."""
    from mopd_jax.bench.replay import mismatch
    graphdef, params, rb = sampled
    same = mismatch(graphdef, params, rb)
    assert same["flips"] == 0.0 and same["replay"] < 1e-5
    g16, p16 = nnx.split(models.build(CFG.replace(dtype="bfloat16"), nnx.Rngs(0)))
    p16 = jax.tree.map(lambda a, b: a.astype(b.dtype), params, p16)
    engine = Engine(g16, p16, max_concurrent_decodes=8, max_prefill_length=16,
                    max_target_length=32, record_routing=True)
    prompts = [rb.tokens[r, :rb.prompt_lengths[r]].tolist() for r in range(0, len(rb), 2)]
    rb16 = rollout(engine, p16, prompts, n=2, seed=1,
                   sampling=SamplingParams(temperature=1.0, max_new_tokens=12))
    bf16 = mismatch(graphdef, params, rb16)
    assert bf16["flips"] > 0 and bf16["replay"] < bf16["no_replay"]


def test_the_rollout_store_keeps_the_routing(tmp_path):
    from mopd_jax.rollout_store import RolloutStore, StoreError
    store = RolloutStore(tmp_path / "s", max_len=6)
    tok = np.ones((2, 4), np.int32)
    ids = np.arange(2 * 4 * 3 * 2, dtype=np.uint8).reshape(2, 4, 3, 2)
    store.append(1, tok, [1, 1], [4, 3], np.zeros((2, 4)), expert_ids=ids)
    store.append(2, tok, [1, 1], [4, 3], np.zeros((2, 4)))  # a batch without: zeros
    got = RolloutStore.open(tmp_path / "s").read()["expert_ids"]
    assert got.shape == (4, 6, 3, 2) and got.dtype == np.uint8
    np.testing.assert_array_equal(got[:2, :4], ids)
    assert not got[:2, 4:].any() and not got[2:].any()
    late = RolloutStore(tmp_path / "late", max_len=6)
    late.append(1, tok, [1, 1], [4, 3], np.zeros((2, 4)))
    with pytest.raises(StoreError, match="routing arrives after rows without it"):
        late.append(2, tok, [1, 1], [4, 3], np.zeros((2, 4)), expert_ids=ids)
    assert "expert_ids" not in RolloutStore.open(tmp_path / "late").read()
