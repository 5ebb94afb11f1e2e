"""Baselines: Param-Merge math (average, task arithmetic, TIES) against numpy, `mopd merge`,
and the baseline recipes' config errors. The end-to-end `mopd compare --quick` run is in
test_pipeline.py (it reuses the quick demo's pi_0 and teachers)."""

import numpy as np
import pytest
from flax import nnx

from models.config import preset
from models import build
from mopd_jax.cli import main as cli_main
from mopd_jax.merge import MergeError, merge_params


def ties_reference(base, models, lam, density):
    """TIES-Merging written out entry by entry (Yadav et al., 2023), per tensor."""
    taus = [m - base for m in models]
    trimmed = []
    for t in taus:
        k = max(1, int(round(density * t.size)))
        thresh = np.sort(np.abs(t).ravel())[::-1][k - 1]
        trimmed.append(np.where(np.abs(t) >= thresh, t, 0.0))
    out = np.zeros_like(base)
    for idx in np.ndindex(base.shape):
        vals = np.array([t[idx] for t in trimmed])
        sign = np.sign(vals.sum())
        agree = [v for v in vals if v != 0 and np.sign(v) == sign]
        out[idx] = np.mean(agree) if agree else 0.0
    return base + lam * out


def test_merge_methods_match_their_definitions():
    rng = np.random.default_rng(0)
    base = {"a": rng.normal(size=(4, 5)).astype(np.float32), "b": rng.normal(size=7)}
    base["b"] = base["b"].astype(np.float32)
    models = [{k: v + rng.normal(size=v.shape).astype(np.float32) for k, v in base.items()}
              for _ in range(3)]
    avg = merge_params(base, models, "average")
    ta = merge_params(base, models, "task_arithmetic", lam=0.3)
    ties = merge_params(base, models, "ties", lam=0.7, density=0.4)
    for k in base:
        ms = [m[k] for m in models]
        np.testing.assert_allclose(avg[k], np.mean(ms, 0), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(ta[k], base[k] + 0.3 * sum(m - base[k] for m in ms),
                                   rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(ties[k], ties_reference(base[k], ms, 0.7, 0.4),
                                   rtol=1e-6, atol=1e-6)
    # TIES with density 1 and agreeing signs is the mean task vector
    same = [{k: base[k] + (i + 1) * np.ones_like(v) for k, v in base.items()} for i in range(2)]
    t1 = merge_params(base, same, "ties", lam=1.0, density=1.0)
    np.testing.assert_allclose(t1["a"], base["a"] + 1.5, rtol=1e-6)


def test_merge_rejects_mismatched_models():
    base = {"w": np.zeros((2, 2), np.float32)}
    with pytest.raises(MergeError, match="shapes differ"):
        merge_params(base, [{"w": np.zeros((3, 2), np.float32)}])
    with pytest.raises(MergeError, match="different parameter tree"):
        merge_params(base, [{"v": np.zeros((2, 2), np.float32)}])
    with pytest.raises(MergeError, match="unknown method"):
        merge_params(base, [base], "median")


def _save_random(path, seed):
    from mopd_jax.checkpoint import save_model
    cfg = preset("demo-moe")
    model = build(cfg, nnx.Rngs(seed))
    params = nnx.state(model, nnx.Param)
    save_model(path, params, cfg)
    return params


def test_mopd_merge_cli_writes_a_loadable_merged_checkpoint(tmp_path, capsys):
    from mopd_jax.loading import load_model

    base = _save_random(tmp_path / "base", 0)
    t1 = _save_random(tmp_path / "t1", 1)
    t2 = _save_random(tmp_path / "t2", 2)
    rc = cli_main(["merge", "--base", str(tmp_path / "base"), "--models", str(tmp_path / "t1"),
                   str(tmp_path / "t2"), "--method", "task_arithmetic", "--lam", "0.25",
                   "--out", str(tmp_path / "merged")])
    assert rc == 0
    assert "merged 2 models (task_arithmetic)" in capsys.readouterr().out
    got = load_model(checkpoint=str(tmp_path / "merged")).params
    want = merge_params(base, [t1, t2], "task_arithmetic", lam=0.25)
    for g, w in zip(nnx.to_flat_state(got), nnx.to_flat_state(want)):
        np.testing.assert_allclose(np.asarray(g[1][...]), np.asarray(w[1][...]), rtol=1e-6,
                                   atol=1e-6)

    rc = cli_main(["merge", "--base", str(tmp_path / "base"), "--models",
                   str(tmp_path / "missing"), "--out", str(tmp_path / "m2")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "missing" in err and "not found" in err and "Traceback" not in err
    assert not (tmp_path / "m2").exists()


def test_baseline_recipes_reject_bad_configs(tmp_path, capsys):
    import yaml
    cfg = {"run": {"out_dir": str(tmp_path / "r"), "recipe": "mix_rl"},
           "model": {"preset": "demo-moe"},
           "data": {"builtin": ["add", "sort"], "builtin_size": 16, "eval_size": 2,
                    "only_domains": ["add"]}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli_main(["train", str(path)]) == 2
    assert "data.only_domains: Mix-RL trains on the whole mix" in capsys.readouterr().err

    cfg["run"]["recipe"] = "cascade"
    cfg["data"].pop("only_domains")
    cfg["cascade"] = {"order": ["add", "rev"]}
    path.write_text(yaml.safe_dump(cfg))
    assert cli_main(["train", str(path)]) == 2
    assert "cascade.order: domains ['rev'] have no training prompts" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # validated before anything is written

    cfg["run"]["recipe"] = "merge"
    cfg.pop("cascade")
    path.write_text(yaml.safe_dump(cfg))
    assert cli_main(["train", str(path)]) == 2
    assert "run.init: Param-Merge needs pi_0" in capsys.readouterr().err


def test_compare_rejects_unknown_methods_before_training(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert cli_main(["compare", "demo", "--quick", "--out", str(out),
                     "--set", "compare.methods=[mopd, foo]"]) == 2
    err = capsys.readouterr().err
    assert "compare.methods: unknown method(s) ['foo']" in err and "Traceback" not in err
    assert not out.exists()
    assert cli_main(["compare", "demo", "--seeds", "0", "--out", str(out)]) == 2
    assert "--seeds: must be >= 1" in capsys.readouterr().err
