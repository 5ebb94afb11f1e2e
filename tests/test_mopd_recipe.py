"""The MOPD recipe's KL to its teachers: the first-step per-token KL under estimators A, B and
C (against a full-softmax reference) with the foreign-teacher warning, a few MOPD steps
lowering the KL on a tiny run that stops at its sample budget, `mopd inspect` on a C run, and
truncated sampling refused."""

import functools
import json

import jax
import numpy as np
import pytest
from flax import nnx

from models import build
from models.config import preset
from mopd_jax import config as cfgmod
from mopd_jax.estimators import DistillLossConfig
from mopd_jax.recipes import mopd as mopd_recipe
from mopd_jax.teachers import Teacher, TeacherPool

V = 32  # demo-moe's vocabulary


def _model(seed):
    return nnx.split(build(preset("demo-moe"), nnx.Rngs(seed)))


@functools.partial(jax.jit, static_argnums=0)
def _full_logp_jit(graphdef, params, tokens):
    model = nnx.merge(graphdef, params)
    hidden, _, _ = model(tokens)
    return jax.nn.log_softmax(hidden @ model.lm_head_weight(), -1)


def _full_logp(graphdef, params, tokens):
    """The naive full softmax, [B, T, V] (fine at V = 32)."""
    return np.asarray(_full_logp_jit(graphdef, params, tokens))


class Rollouts:
    """What _teacher_kl reads of a RolloutBatch."""

    def __init__(self, tokens, mask, logprobs, domain):
        self.tokens, self.response_mask, self.logprobs, self.domain = (
            tokens, mask, logprobs, domain)


@pytest.mark.parametrize("estimator", ["A", "B", "C"])
def test_initial_kl_to_each_teacher_under_every_estimator(estimator, capsys):
    rng = np.random.default_rng(0)
    s_graph, s_params = _model(0)
    teachers = {f"t{i}": Teacher(f"runs/x/t{i}/model", *_model(10 + i), V) for i in (1, 2)}
    pool = TeacherPool({"add": "t1", "sort": "t2"}, None,
                       {"t1": teachers["t1"], "t2": teachers["t2"]})
    B, T = 6, 10
    tokens = rng.integers(1, V, (B, T)).astype(np.int32)
    for t in range(3, T):  # the student's greedy continuation: what it would say
        tokens[:, t] = _full_logp(s_graph, s_params, tokens[:, :t])[:, -1].argmax(-1)
    mask = np.zeros((B, T), bool)
    mask[:, 3:] = True
    mask[0, 8:] = mask[3, 6:] = False
    lp = _full_logp(s_graph, s_params, tokens)[:, :-1]
    mu = np.zeros((B, T), np.float32)  # the student's own log-probs, aligned with tokens
    mu[:, 1:] = np.take_along_axis(lp, tokens[:, 1:, None], -1)[..., 0]
    domains = ["add", "sort", "add", "sort", "add", "add"]
    cfg = DistillLossConfig(estimator=estimator, num_domains=2, topk=4, vocab_chunk=V)
    scores = pool.score(tokens, domains, cfg, lengths=mask.sum(1) + 3)
    assert scores.logp_BT is not None  # C's teachers too
    kl = mopd_recipe._teacher_kl(pool, Rollouts(tokens, mask, mu, domains), scores.logp_BT)
    for name, ds in (("t1", "add"), ("t2", "sort")):
        rows = [i for i, d in enumerate(domains) if d == ds]
        t_lp = _full_logp(teachers[name].graphdef, teachers[name].params, tokens)[:, :-1]
        t_tok = np.take_along_axis(t_lp, tokens[:, 1:, None], -1)[..., 0]
        m = mask[rows, 1:]
        want = (mu[rows, 1:] - t_tok[rows])[m].mean()
        assert kl[name] == pytest.approx(float(want), rel=1e-4, abs=1e-5)
    record = {}
    pool.log_initial_kl(kl, record)
    assert record == kl and min(kl.values()) > 0.1  # random teachers: foreign
    err = capsys.readouterr().err
    assert err.count("warning: teacher") == 2 and "paper: 0.04 healthy" in err


def _save(path, seed):
    from mopd_jax.checkpoint import save_model
    model = build(preset("demo-moe"), nnx.Rngs(seed))
    save_model(path, nnx.state(model, nnx.Param), preset("demo-moe"))
    return path


def _cfg(tmp_path, name, **sets):
    base = {"run.out_dir": str(tmp_path / name), "run.name": name, "run.recipe": "mopd",
            "run.init": str(tmp_path / "pi0"), "run.checkpoint_every": 100,
            "model.preset": "demo-moe", "mesh.data": 1, "mesh.fsdp": -1,
            "data.builtin": "[add, sort]", "data.builtin_size": 64, "data.eval_size": 4,
            "data.max_prompt_len": 16, "rollout.max_new_tokens": 6, "rollout.slots": 32,
            "mopd.prompts_per_step": 16, "mopd.fallback": str(tmp_path / "teacher"),
            "optimizer.lr": 1e-2, "optimizer.total_steps": 50}
    base.update(sets)
    return cfgmod.load_config(None, [f"{k}={v}" for k, v in base.items()])


def _reverse_kl(graphdef, s_params, t_params, tokens, mask):
    """Exact per-token KL(student || teacher) on fixed rollouts, from full softmaxes."""
    a = _full_logp(graphdef, s_params, tokens)[:, :-1]
    b = _full_logp(graphdef, t_params, tokens)[:, :-1]
    kl = (np.exp(a) * (a - b)).sum(-1)
    return float(kl[mask[:, 1:]].mean())


def test_mopd_steps_lower_the_kl_and_stop_at_the_sample_budget(tmp_path):
    from mopd_jax.loading import load_model
    from mopd_jax.rollout_store import RolloutStore

    _save(tmp_path / "pi0", 0)
    _save(tmp_path / "teacher", 7)  # another init: a far, foreign teacher
    cfg = _cfg(tmp_path, "a", **{"mopd.estimator": "A", "optimizer.sample_budget": 120})
    result = mopd_recipe.run_mopd(cfg, quiet=True)
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "mopd/loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))  # 8 x 16 = 128 >= 120
    assert sum(result.samples.values()) == 128 and not result.stopped
    lrs = [r["optimizer/lr"] for r in steps]
    assert lrs[0] == pytest.approx(1e-2) and lrs[-1] < lrs[1]  # cosine over samples
    assert steps[0]["mopd/initial_kl/teacher"] > 0.1
    data = RolloutStore.open(tmp_path / "a" / "rollouts").read()
    first = data["step"] == 1
    tokens = data["tokens"][first]
    pos = np.arange(tokens.shape[1])[None]
    mask = (pos >= data["prompt_len"][first][:, None]) & (pos < data["length"][first][:, None])
    pi0, teacher, student = (load_model(checkpoint=str(tmp_path / p)) for p in (
        "pi0", "teacher", "a/model"))
    before = _reverse_kl(pi0.graphdef, pi0.params, teacher.params, tokens, mask)
    after = _reverse_kl(pi0.graphdef, student.params, teacher.params, tokens, mask)
    assert after < 0.9 * before, (before, after)


def test_inspect_shows_the_kl_of_a_c_run_and_truncation_is_refused(tmp_path):
    from mopd_jax.inspect_run import inspect_run

    _save(tmp_path / "pi0", 0)
    _save(tmp_path / "teacher", 7)
    mopd_recipe.run_mopd(_cfg(tmp_path, "c", **{"mopd.estimator": "C",
                                                "optimizer.total_steps": 2}), quiet=True)
    text = inspect_run(tmp_path / "c", samples=0)
    table = text.split("kl/token")[1].splitlines()[2:4]
    kls = [float(line.split()[-1]) for line in table]
    assert all(np.isfinite(kls)) and min(kls) > 0, text
    for field, value in (("rollout.top_k", 5), ("rollout.top_p", 0.9)):
        with pytest.raises(cfgmod.ConfigError, match=f"{field}={value}: recipe mopd trains"):
            mopd_recipe.run_mopd(_cfg(tmp_path, "t", **{field: value}), quiet=True)
    assert not (tmp_path / "t").exists()
