"""Asynchronous MOPD (run.max_staleness, mesh.roles): k = 0 is the synchronous loop exactly;
with k = 1 on disaggregated sub-meshes every rollout's version is within 1 of the step that
trains on it and carries that version's own sampler log-probs; SIGTERM + --resume under async
reproduce the uninterrupted run."""

import json
import signal

import jax
import numpy as np
import pytest
from flax import nnx

from models import build
from models.config import preset
from mopd_jax import config as cfgmod
from mopd_jax.batches import MOPDBatch
from mopd_jax.recipes import common
from mopd_jax.recipes import mopd as mopd_recipe
from mopd_jax.rollout_store import RolloutStore
from mopd_jax.sampling import rollout
from mopd_jax.sharding import MeshError
from mopd_jax.steps import distill_objective, token_logprobs_step
from mopd_jax.teachers import TeacherError, load_teachers
from test_pipeline import comparable, finished, mopd, read_jsonl, write_config

STEPS = 3


def _save(path, seed):
    from mopd_jax.checkpoint import save_model
    model = build(preset("demo-moe"), nnx.Rngs(seed))
    save_model(path, nnx.state(model, nnx.Param), preset("demo-moe"))
    return path


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("async")
    _save(d / "pi0", 0)
    _save(d / "teacher", 5)
    return d


def _sets(d, name, **over):
    base = {"run.out_dir": str(d / name), "run.name": name, "run.recipe": "mopd",
            "run.init": str(d / "pi0"), "run.checkpoint_every": 1, "run.keep_checkpoints": 10,
            "model.preset": "demo-moe", "data.builtin": "[add, sort]",
            "data.builtin_size": 64, "data.eval_size": 4, "data.max_prompt_len": 16,
            "rollout.max_new_tokens": 6, "rollout.slots": 16, "mopd.prompts_per_step": 8,
            "mopd.fallback": str(d / "teacher"), "mopd.estimator": "A",
            "optimizer.lr": 3e-2, "optimizer.total_steps": STEPS}
    base.update(over)
    return [f"{k}={v}" for k, v in base.items()]


def _run(d, name, **over):
    cfg = cfgmod.load_config(None, _sets(d, name, **over))
    return mopd_recipe.run_mopd(cfg, quiet=True), cfg


def _sync_reference(cfg):
    """The synchronous MOPD loop written out by hand: sample with the current weights, score,
    train, for every step (what max_staleness = 0 must equal)."""
    run = common.init_student(common.setup(cfg, quiet=True))
    pool = load_teachers({}, cfg.mopd.fallback, student=(run.graphdef, run.init_params,
                                                         run.model_cfg), mesh=run.mesh)
    loss_cfg = mopd_recipe.loss_config(run)
    pipeline = common.make_pipeline(run, cfg.mopd.prompts_per_step)
    opt, state = common.new_train_state(run)
    step = common.compile_train_step(run, opt, distill_objective(
        loss_cfg, aux_coef=run.model_cfg.router_aux_loss_coef))
    losses, tokens = [], []
    for i in range(cfg.optimizer.total_steps):
        rb = rollout(run.engine, state["params"], next(pipeline), n=1,
                     sampling=common.sampling_params(cfg), seed=common.step_seed(cfg, i))
        batch = MOPDBatch(tokens_BT=rb.tokens, mask_BT=rb.response_mask.astype(np.int32),
                          domain_B=run.domain_ids(rb.domain), sampler_logp_BT=rb.logprobs,
                          teacher=pool.score(rb.tokens, rb.domain, loss_cfg,
                                             lengths=rb.lengths),
                          reward_B=common.rewards_of(run, rb))
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
        tokens.append(rb.tokens)
    return losses, np.concatenate(tokens), state["params"]


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_staleness_zero_is_the_synchronous_loop_exactly(models_dir, tmp_path):
    res, cfg = _run(models_dir, "k0", **{"run.out_dir": str(tmp_path / "k0")})
    losses, tokens, params = _sync_reference(cfgmod.load_config(None, _sets(
        models_dir, "ref", **{"run.out_dir": str(tmp_path / "ref"),
                              "run.store_rollouts": "false"})))
    rows = read_jsonl(tmp_path / "k0" / "metrics.jsonl")
    assert [r["mopd/loss"] for r in rows if "mopd/loss" in r] == losses
    np.testing.assert_array_equal(RolloutStore.open(tmp_path / "k0" / "rollouts").read()[
        "tokens"], tokens)
    for a, b in zip(_leaves(res.params), _leaves(params)):
        np.testing.assert_array_equal(a, b)
    assert not any(k.startswith("async/") for r in rows for k in r)


def test_staleness_one_on_sub_meshes_trains_on_the_previous_version(models_dir, tmp_path):
    over = {"run.max_staleness": 1, "mesh.roles": "{trainer: 4, sampler: 4}",
            "mopd.router_replay": "true", "run.store_routing": "true",
            "run.out_dir": str(tmp_path / "k1")}
    res, cfg = _run(models_dir, "k1", **over)
    # version 1's weights: the same run stopped after one step
    one, _ = _run(models_dir, "one", **{**over, "run.out_dir": str(tmp_path / "one"),
                                        "optimizer.total_steps": 1})
    store = RolloutStore.open(tmp_path / "k1" / "rollouts").read()
    trained_at = store["step"] - 1  # the store names the step count after the update
    lag = trained_at - store["version"]
    assert set(lag[trained_at == 0]) == {0} and set(lag[trained_at > 0]) == {1}
    rows = [r for r in read_jsonl(tmp_path / "k1" / "metrics.jsonl") if "async/staleness" in r]
    assert [r["async/staleness"] for r in rows] == [0.0, 1.0, 1.0]
    assert all(0.0 <= r["mopd/is_masked_frac"] <= 1.0 for r in rows)
    from mopd_jax.inspect_run import inspect_run
    assert "policy staleness (rollouts trained on at each age in versions): {0: 8, 1: 16}" \
        in inspect_run(tmp_path / "k1", samples=0)
    R, L = store["tokens"].shape  # router replay's record, stored with the rollouts
    assert store["expert_ids"].shape[:2] == (R, L) and store["expert_ids"].any()

    # step 1 trained on rollouts of version 0 (pi_0), with pi_0's own log-probs as mu
    pick = trained_at == 1
    tok, mu = store["tokens"][pick], store["sampler_logp"][pick]
    resp = (np.arange(tok.shape[1])[None] >= store["prompt_len"][pick][:, None]) & (
        np.arange(tok.shape[1])[None] < store["length"][pick][:, None])
    from mopd_jax.loading import load_model
    pi0 = load_model(checkpoint=str(models_dir / "pi0"))

    def logp(params):
        lp = np.asarray(token_logprobs_step(pi0.graphdef, params, tok))
        return np.pad(lp, ((0, 0), (1, 0)))[resp]

    np.testing.assert_allclose(logp(pi0.params), mu[resp], atol=1e-4)
    assert np.abs(logp(one.params) - mu[resp]).max() > 1e-3  # not version 1's


def test_async_refuses_on_policy_estimators_and_bad_roles(models_dir, tmp_path):
    with pytest.raises(TeacherError, match="run.max_staleness=1: estimator C"):
        _run(models_dir, "c", **{"run.max_staleness": 1, "mopd.estimator": "C",
                                 "run.out_dir": str(tmp_path / "c")})
    with pytest.raises(MeshError, match="asks for 6 devices but 8"):
        _run(models_dir, "r", **{"mesh.roles": "{trainer: 4, sampler: 2}",
                                 "run.out_dir": str(tmp_path / "r")})
    with pytest.raises(cfgmod.ConfigError, match="both trainer and sampler"):
        cfgmod.load_config(None, ["mesh.roles={trainer: 8}"])
    assert not (tmp_path / "c").exists() and not (tmp_path / "r").exists()


def test_sigterm_and_resume_under_async_reproduce_the_uninterrupted_run(models_dir, tmp_path):
    from test_pipeline import small_config
    cfg = small_config(tmp_path / "ref", run={"max_staleness": 1, "checkpoint_every": 2},
                       mopd={"estimator": "A"}, optimizer={"total_steps": 8})
    rc, _, err = finished(mopd("train", str(write_config(tmp_path / "ref.yaml", cfg))))
    assert rc == 0, err[-3000:]
    cut = small_config(tmp_path / "cut", run={"max_staleness": 1, "checkpoint_every": 2},
                       mopd={"estimator": "A"}, optimizer={"total_steps": 8})
    path = write_config(tmp_path / "cut.yaml", cut)
    p = mopd("train", str(path))
    metrics = tmp_path / "cut" / "metrics.jsonl"
    import time
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert p.poll() is None, p.communicate()
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    rc, _, err = finished(p)
    assert rc == 143 and "continue with --resume" in err, err[-3000:]
    rc, _, err = finished(mopd("train", str(path), "--resume"))
    assert rc == 0 and "resumed" in err, err[-3000:]
    want = comparable(read_jsonl(tmp_path / "ref" / "metrics.jsonl"))
    got = comparable(read_jsonl(tmp_path / "cut" / "metrics.jsonl"))
    assert got == want
    a = RolloutStore.open(tmp_path / "ref" / "rollouts").read()
    b = RolloutStore.open(tmp_path / "cut" / "rollouts").read()
    for col in ("tokens", "sampler_logp", "version", "step"):
        np.testing.assert_array_equal(a[col], b[col])
    assert json.loads((tmp_path / "cut" / "eval.json").read_text()) == json.loads(
        (tmp_path / "ref" / "eval.json").read_text())


def test_teachers_on_their_own_sub_mesh_score_for_the_trainer(models_dir, tmp_path):
    res, _ = _run(models_dir, "t", **{"mesh.roles": "{trainer: 4, sampler: 2, teachers: 2}",
                                      "mopd.estimator": "C", "mopd.fallback": "self",
                                      "optimizer.total_steps": 1,
                                      "run.out_dir": str(tmp_path / "t")})
    rows = read_jsonl(tmp_path / "t" / "metrics.jsonl")
    assert np.isfinite(rows[0]["mopd/loss"])
    devices = {d.id for x in jax.tree.leaves(res.params) for d in x.sharding.device_set}
    assert devices == {0, 1, 2, 3}  # trained on the trainer's sub-mesh
