"""``mopd bench pipeline``: every stage of a MOPD step timed with positive rates, the MOPD / GRPO
ratio built from the measured stages, the JSON round trip, the recipe's sync (and async, once
it exists) step times, and the split timing model's arithmetic on hand-made inputs.

No timing is asserted (timing claims live in the bench's own output)."""

import json
import math

import pytest
import yaml

from mopd_jax.bench import pipeline as bp
from mopd_jax.bench import split_model as sm
from mopd_jax.cli import build_parser


def tiny_config(tmp_path, **sections):
    """Two built-in domains, a 4-token response, 8 rollouts: seconds per round."""
    cfg = {
        "run": {"name": "bench", "out_dir": str(tmp_path / "unused"), "seed": 1},
        "model": {"preset": "tiny"},
        "data": {"builtin": ["add", "sort"], "builtin_size": 64, "eval_size": 4,
                 "max_prompt_len": 16},
        "rollout": {"max_new_tokens": 4, "slots": 8, "prefill_batch": 4},
        "mopd": {"prompts_per_step": 8, "estimator": "A"},
        "optimizer": {"lr": 1e-3, "total_steps": 3},
    }
    for k, v in sections.items():
        cfg[k] = {**cfg.get(k, {}), **v}
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _run(argv):
    args = build_parser().parse_args(argv)
    return args.run(args)


def test_every_stage_timed_rates_positive_ratio_from_stages_json_and_recipe_steps(
        tmp_path, capsys):
    res = _run(["bench", "pipeline", tiny_config(tmp_path), "--iters", "2", "--sync-vs-async", "3",
                "--json"])
    out = capsys.readouterr().out
    assert json.loads(out) == json.loads(json.dumps(res))  # stdout: that one JSON object
    p = res["pipeline"]
    assert set(p["stages"]) == set(bp.STAGES)
    for s in bp.STAGES:
        st = p["stages"][s]
        assert st["n"] == 2 and 0 < st["min"] <= st["median"] <= st["max"], s
    for s, rate in p["tok_s"].items():
        assert math.isfinite(rate) and rate > 0, s
    # the config names no teachers: one random teacher per training domain, each timed alone
    assert p["teacher_source"] == "random"
    assert set(p["teachers"]) == {"random-add", "random-sort"}
    c = p["counts"]
    assert sum(t["rows"] for t in p["teachers"].values()) == c["rows"] == 8
    assert sum(t["response_tokens"] for t in p["teachers"].values()) == c["generated_tokens"] > 0
    for t in p["teachers"].values():
        assert t["tok_s"] == pytest.approx(t["response_tokens"] / t["s"]["median"])
    assert p["tok_s"]["rollout"] == pytest.approx(c["generated_tokens"]
                                                  / p["stages"]["rollout"]["median"])
    # each round: prefill + decode is the rollout; its MOPD step is rollout + scoring +
    # rewards + train, its GRPO step rollout + rewards + GRPO train; the ratio is theirs
    assert len(p["rounds"]) == 2
    mopd, grpo = [], []
    for t in p["rounds"]:
        assert t["prefill"] + t["decode"] == pytest.approx(t["rollout"])
        mopd.append(t["rollout"] + t["scoring"] + t["rewards"] + t["train"])
        grpo.append(t["rollout"] + t["rewards"] + t["grpo_train"])
    assert p["mopd_step"]["median"] == pytest.approx(sum(mopd) / 2)
    assert p["grpo_step"]["median"] == pytest.approx(sum(grpo) / 2)
    assert p["mopd_over_grpo"]["median"] == pytest.approx((mopd[0] / grpo[0]
                                                           + mopd[1] / grpo[1]) / 2)
    assert all(v >= 0 for k, v in p["compile_s"].items() if k != "teachers")
    text = bp.format_stages(p)
    for label in ("rollout", "prefill", "decode", "teacher scoring", "random-add", "random-sort",
                  "rewards", "train step (MOPD)", "train step (GRPO)", "MOPD / GRPO"):
        assert label in text, label
    # whole steps of the recipe, with the random teachers saved as its checkpoints; async
    # (max_staleness 1 on trainer/sampler halves of the 8 devices) once the recipe has it
    sa = res["sync_vs_async"]
    assert len(sa["sync"]["step_s"]) == 3 and sa["sync"]["after_first"]["n"] == 2
    assert "8 cpu device(s)" in sa["label"] and "share the same cores" in sa["label"]
    if bp.async_support() is None:
        assert sa["roles"] == {"trainer": 4, "sampler": 4}
        assert len(sa["async"]["step_s"]) == 3 and sa["async_over_sync"] > 0
        assert len(sa["sync_split"]["step_s"]) == 3 and sa["async_over_sync_split"] > 0
    else:  # the recipe has no run.max_staleness yet: said, not guessed
        assert sa["async"] is None and "run.max_staleness" in sa["async_unavailable"]
    assert "sync  (max_staleness 0, one mesh)" in bp.format_sync_vs_async(sa)


def test_ratio_is_taken_round_by_round():
    def round_(rollout, scoring, train, grpo):
        t = dict.fromkeys(bp.STAGES, 0.0)
        t.update(rollout=rollout, scoring=scoring, rewards=1.0, train=train, grpo_train=grpo)
        counts = {"teachers": {"T": scoring}, "teacher_rows": {"T": 4},
                  "teacher_tokens": {"T": 8}, "generated_tokens": 8, "prompt_tokens": 4}
        return t, counts

    t = dict.fromkeys(bp.STAGES, 1.0)
    t.update(prefill=0.5, decode=0.5)
    r = bp.summarize([round_(1.0, 2.0, 3.0, 4.0), round_(3.0, 2.0, 3.0, 4.0)],
                     (t, {"teachers": {"T": 1.0}}))
    # round 1: MOPD 1 + 2 + 1 + 3 = 7, GRPO 1 + 1 + 4 = 6; round 2: 9 and 8
    assert r["mopd_step"] == {"median": 8.0, "min": 7.0, "max": 9.0, "n": 2}
    assert r["grpo_step"]["median"] == 7.0
    # the median of 7/6 and 9/8, not 8/7 (the ratio of the medians)
    assert r["mopd_over_grpo"] == pytest.approx({"median": (7 / 6 + 9 / 8) / 2, "min": 9 / 8,
                                                 "max": 7 / 6, "n": 2})
    assert r["teachers"]["T"]["tok_s"] == 8 / 2.0


# ----------------------------------------------------------------------------- timing model
EST = sm.StepEstimate(chips=32, sample_s=60.0, score_s=4.0, train_s=12.0, param_bytes=6e9,
                      source="hand-made")


def test_split_model_arithmetic():
    r = sm.split_model(EST, 16, 16, ici_bytes_s=600e9)
    assert r["sync_s"] == 76.0
    assert r["rollout_s"] == 120.0  # 60 s on 32 chips -> 16 chips
    assert r["trainer_s"] == 32.0  # (4 + 12) s x 32 / 16
    assert r["transfer_s"] == pytest.approx(6e9 / (16 * 600e9))
    assert r["async_s"] == pytest.approx(120.0 + 6.25e-4)
    assert r["async_over_sync"] == pytest.approx((120.0 + 6.25e-4) / 76.0)
    assert r["idle"] == "trainer" and r["idle_frac"] == pytest.approx(1 - 32 / 120)
    r = sm.split_model(EST, 8, 24, ici_bytes_s=600e9)
    assert (r["rollout_s"], r["trainer_s"]) == (pytest.approx(80.0), 64.0)
    assert r["async_s"] == pytest.approx(80.0 + 6e9 / (8 * 600e9))
    # balanced: sampler share = sampling share of the sync step; 32 x 60 / 76 = 25.26 -> 25
    assert sm.balanced_sampler_chips(EST) == pytest.approx(32 * 60 / 76)
    tm = sm.timing_model(EST, sm.default_splits(32), 600e9)
    assert [(s["trainer_chips"], s["sampler_chips"]) for s in tm["splits"]] == [
        (24, 8), (16, 16), (8, 24), (7, 25)]
    near = tm["splits"][-1]
    assert near["nearest_balanced"]
    assert near["async_s"] == pytest.approx(max(60 * 32 / 25, 16 * 32 / 7) + 6e9 / (7 * 600e9))
    # linear scaling: no split beats the sync step
    assert all(s["async_s"] >= tm["sync_s"] for s in tm["splits"])
    with pytest.raises(ValueError, match="at most 32 chips"):
        sm.split_model(EST, 24, 16)


def _compile_check_report():
    """The fields of ``mopd compile-check --json`` the model reads (hand-made values)."""
    return {"target": {"name": "v5p-64", "kind": "TPU v5p", "chips": 32},
            "model": {"name": "m", "params": 1e9, "param_dtype": "bfloat16"},
            "batch": 2048, "score_rows": 32,
            "steps": {"train": {"time_s": 400.0}, "score": {"time_s": 2.0},
                      "decode": {"time_s": 0.1}},
            "estimate": {"sample_s": 5000.0, "score_s": 6.0, "train_s": 400.0, "waves": 8,
                         "score_calls": 3, "total_s": 5406.0}}


def test_compile_check_json_into_the_model(tmp_path, capsys):
    est = sm.estimate_from_compile_check(_compile_check_report())
    # scoring: the per-call bound x ceil(2048 / 32) = 64 calls, not compile-check's 3
    assert (est.chips, est.sample_s, est.score_s, est.train_s) == (32, 5000.0, 128.0, 400.0)
    assert est.param_bytes == 2e9 and est.sync_s == 5528.0
    path = tmp_path / "cc.json"
    path.write_text(json.dumps(_compile_check_report()))
    res = _run(["bench", "pipeline", "--from-compile-check", str(path), "--splits", "16/16",
                "--ici-gbps", "4800", "--json"])
    row = res["timing_model"]["splits"][0]
    assert (row["trainer_chips"], row["sampler_chips"]) == (16, 16)
    assert row["rollout_s"] == 10000.0 and row["trainer_s"] == 1056.0
    assert row["async_s"] == pytest.approx(10000.0 + 2e9 / (16 * 600e9))
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["timing_model"] == \
        json.loads(json.dumps(res["timing_model"]))
    bad = _compile_check_report()
    del bad["estimate"]["train_s"]
    with pytest.raises(ValueError, match="--steps train,score,decode"):
        sm.estimate_from_compile_check(bad)


def test_readme_defaults_are_the_readme_figures(capsys):
    est = sm.readme_30b_estimate()
    assert (est.chips, est.sample_s, est.train_s) == (32, 92.4 * 60, 437.0)
    # compile-check's 99.8 min counted 3 teacher calls; the batch needs 64 of them
    assert est.score_s == pytest.approx(((99.8 - 92.4) * 60 - 437.0) / 3 * 64)
    res = _run(["bench", "pipeline", "--split-model"])
    text = capsys.readouterr().out
    assert "scales inversely with its chips" in text and "sync (every stage on all chips)" in text
    assert len(res["timing_model"]["splits"]) >= 3
