"""`mopd compare`: each protocol's budget and step arithmetic, the runs' configs, the sample
budget's LR schedule, the normalised score / "first reached" / seed statistics on hand-made
results (a domain whose teacher does not beat pi_0 included), the outputs, and the lr grid's
validation split. The end-to-end quick compare is in test_pipeline.py."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from mopd_jax import config as cfgmod
from mopd_jax.recipes import common, compare, demo
from mopd_jax.recipes import compare_report as report

DOMAINS = ["add", "rev", "sort"]
TEACHER_SAMPLES = {"add": 50_000, "rev": 40_001, "sort": 45_000}


def demo_config(*sets):
    return cfgmod.load_config(str(demo.DEMO_CONFIG), list(sets))


@pytest.mark.parametrize("protocol", ["paper", "equal_samples"])
def test_budgets_and_steps_of_each_protocol(protocol):
    cfg = demo_config("compare.samples=28800", f"compare.protocol={protocol}")
    P = {m: compare.plan(protocol, m, cfg, TEACHER_SAMPLES, DOMAINS)
         for m in ("mopd_A", "mopd_C_dn", "offpolicy_ft", "mix_rl", "cascade", "merge_ta")}
    # MOPD: 64 prompts x 1 rollout per step; Off-Policy FT: 64 teacher responses per step
    assert (P["mopd_A"].samples, P["mopd_A"].per_step, P["mopd_A"].nominal_steps) == \
        (28800, 64, 450)
    assert P["mopd_C_dn"] == P["mopd_A"]
    assert (P["offpolicy_ft"].samples, P["offpolicy_ft"].nominal_steps) == (28800, 450)
    assert (P["merge_ta"].samples, P["merge_ta"].nominal_steps) == (0, 0)
    assert P["mix_rl"].per_step == P["cascade"].per_step == 16 * 8
    if protocol == "paper":  # the teachers' per-domain budgets
        assert P["mix_rl"].samples == 135_001
        assert P["mix_rl"].nominal_steps == math.ceil(135_001 / 128) == 1055
        assert P["cascade"].stages == TEACHER_SAMPLES
        assert P["cascade"].nominal_steps == 391 + 313 + 352
    else:  # one budget for all, Cascade's split evenly
        assert P["mix_rl"].samples == 28800 and P["mix_rl"].nominal_steps == 225
        assert P["cascade"].stages == {"add": 9600, "rev": 9600, "sort": 9600}
        assert P["cascade"].nominal_steps == 3 * 75
    uneven = compare.plan("equal_samples", "cascade", demo_config("compare.samples=100"),
                          {}, DOMAINS)
    assert uneven.stages == {"add": 34, "rev": 33, "sort": 33}


def test_run_configs_carry_the_budget_estimator_and_ablation(tmp_path):
    cfg = demo_config("compare.eval_points=4")
    ctx = compare.Context(tmp_path, demo.MODES["full"], [], demo.DEMO_CONFIG, cfg,
                          tmp_path / "pi0", {d: tmp_path / d for d in DOMAINS}, {}, "paper")
    budget = compare.plan("paper", "cascade", cfg, TEACHER_SAMPLES, DOMAINS)
    run = compare.method_config("cascade", budget, 5e-4, tmp_path / "c", ctx, 2, ctx.pi0,
                                ctx.teachers)
    assert run.run.recipe == "cascade" and run.run.seed == 2 and run.optimizer.lr == 5e-4
    assert run.optimizer.sample_budget == 135_001 and run.cascade.stage_samples == \
        TEACHER_SAMPLES
    assert run.optimizer.total_steps == 391  # each stage's cap: its nominal steps
    assert run.run.eval_every == 1056 // 4
    budget = compare.plan("paper", "mopd_B_dn", cfg, TEACHER_SAMPLES, DOMAINS)
    run = compare.method_config("mopd_B_dn", budget, 1e-3, tmp_path / "m", ctx, 0, ctx.pi0,
                                ctx.teachers)
    assert (run.run.recipe, run.mopd.estimator, run.mopd.dn_rescale) == ("mopd", "B", True)
    assert run.optimizer.sample_budget == 28800 and run.optimizer.total_steps == 450
    assert run.mopd.teachers == {d: str(tmp_path / d) for d in DOMAINS}
    rows = compare.method_rows(demo_config(
        "compare.methods=[mopd, mix_rl]", "compare.estimators=[A, C]",
        "compare.ablations=[foreign_teacher, dn_rescale]").compare, True)
    assert rows == ["mopd_A", "mopd_C", "mix_rl", "mopd_A_foreign", "mopd_A_dn",
                    "mopd_A_round2"]
    assert [report.display(m) for m in rows[3:]] == [
        "MOPD (A), foreign teachers", "MOPD (A), DN-MOPD rescale", "MOPD (A), second round"]
    with pytest.raises(cfgmod.ConfigError, match="compare.estimators: unknown estimator 'Z'"):
        demo_config("compare.estimators=[A, Z]")
    with pytest.raises(cfgmod.ConfigError, match="compare.ablations: unknown ablation"):
        demo_config("compare.ablations=[merge]")


def test_teacher_budgets_come_from_the_teacher_runs(tmp_path):
    for d, n in (("add", 100), ("rev", 250)):
        (tmp_path / f"teacher_{d}" / "model").mkdir(parents=True)
        (tmp_path / f"teacher_{d}" / "metrics.jsonl").write_text(
            json.dumps({"step": 1, f"samples/{d}": n / 2}) + "\n"
            + json.dumps({"step": 2, f"samples/{d}": float(n)}) + "\n")
    teachers = {d: tmp_path / f"teacher_{d}" / "model" for d in ("add", "rev")}
    c = demo_config().compare
    assert compare.teacher_budgets(c, teachers) == {"add": 100, "rev": 250}
    c = demo_config("compare.teacher_samples.rev=7").compare
    assert compare.teacher_budgets(c, teachers) == {"add": 100, "rev": 7}
    with pytest.raises(cfgmod.ConfigError, match="compare.teacher_samples.sort=N"):
        compare.teacher_budgets(c, {"sort": tmp_path / "teacher_sort" / "model"})


def test_lr_follows_the_consumed_samples():
    o = demo_config("optimizer.sample_budget=1000", "optimizer.warmup_steps=4",
                    "optimizer.min_lr_ratio=0.1", "optimizer.lr=0.01").optimizer
    assert common.lr_at(o, 0, 0) == 0.0  # optax's warmup starts at 0
    assert common.lr_at(o, 2, 0) == pytest.approx(0.005)
    assert common.lr_at(o, 10, 0) == pytest.approx(0.01)
    assert common.lr_at(o, 10, 500) == pytest.approx(0.001 + 0.009 * 0.5)
    assert common.lr_at(o, 10, 1000) == common.lr_at(o, 99, 5000) == pytest.approx(0.001)
    # the same step count at twice the samples is further down the schedule
    assert common.lr_at(o, 10, 600) < common.lr_at(o, 10, 300)


# ----------------------------------------------------------------------------- the score
def hand_result(seeds=3):
    """Two methods on three domains; 'sort''s teacher does not beat pi_0."""
    base = {"add": 0.2, "rev": 0.1, "sort": 0.8}
    teacher = {"add": 0.6, "rev": 0.5, "sort": 0.7}
    runs = []
    for s in range(seeds):
        for method, add, rev, curve in (
                ("mopd_A", 0.56 + 0.04 * s, 0.42, [(0, 0), (100, 0.5), (200, 0.88 + 0.02 * s),
                                                   (300, 0.95)]),
                ("mix_rl", 0.3, 0.2 + 0.04 * s, [(0, 0), (500, 0.2), (900, 0.4)])):
            scores = {"add": add, "rev": rev, "sort": 0.9}
            norm = report.normalised(scores, base, teacher)
            runs.append({"method": method, "seed": s, "lr": 1e-3, "scores": scores,
                         "normalised": norm, "mean_normalised": report.mean_finite(
                             norm.values()), "steps": 10 + s, "nominal": 640, "samples": 700,
                         "budget": 700, "wall_s": 1.0, "curve": curve})
    return {"protocol": "paper", "base": base, "teacher": teacher, "runs": runs,
            "domains": ["add", "rev", "sort"], "seeds": seeds, "samples": 700,
            "teacher_samples": {"add": 300, "rev": 400}, "lr_grid": {},
            "excluded": report.excluded_domains(base, teacher)}


def test_normalised_score_and_first_reached_on_a_hand_made_table():
    r = hand_result()
    assert r["excluded"] == ["sort"]
    n = r["runs"][0]["normalised"]  # mopd_A seed 0: add (0.56-0.2)/0.4, rev (0.42-0.1)/0.4
    assert n["add"] == pytest.approx(0.9) and n["rev"] == pytest.approx(0.8)
    assert math.isnan(n["sort"])  # teacher 0.7 <= pi_0 0.8: no scale, even at score 0.9
    assert r["runs"][0]["mean_normalised"] == pytest.approx(0.85)  # sort left out
    # the seed-mean curve: 0.88, 0.90, 0.92 at the third point -> mean 0.90 at 200 samples
    assert report.first_reaching(r, "mopd_A") == 200.0
    assert report.first_reaching(r, "mopd_A", level=0.91) == 300.0
    assert report.first_reaching(r, "mix_rl") == math.inf
    rows = {row["method"]: row for row in report.summary(r)}
    st = rows["mopd_A"]["add_norm"]  # 0.9, 1.0, 1.1
    assert st["mean"] == pytest.approx(1.0) and st["std"] == pytest.approx(0.1)
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, 2 dof)
    assert (st["lo"], st["hi"]) == (pytest.approx(1.0 - half), pytest.approx(1.0 + half))
    assert rows["mix_rl"]["steps"]["mean"] == 11
    single = report.seed_stats([0.5])
    assert single["n"] == 1 and math.isnan(single["lo"])
    table = report.format_compare(r)
    assert "| teachers | 0.600 | 0.500 | 0.700 (teacher ≤ π0) | 1 |" in table
    line = next(x for x in table.splitlines() if x.startswith("| MOPD (A) |"))
    cells = [c.strip() for c in line.split("|")[1:-1]]
    assert cells[1] == f"1.00 ± 0.10 [{1 - half:.2f}, {1 + half:.2f}]"
    assert cells[3] == "teacher ≤ π0" and cells[4].startswith("**0.90")
    assert cells[5:] == ["11 ± 1", "640", "700", "0.001"]
    notes = report.exclusion_notes(r)
    assert len(notes) == 1 and "domain sort" in notes[0] and "left out of the mean" in notes[0]


def test_outputs_hold_the_tables_notes_and_the_banded_plot(tmp_path):
    r = hand_result()
    paths = report.write_outputs(tmp_path, r)
    assert [p.name for p in paths] == ["compare.md", "compare.csv", "compare.json",
                                       "compare_samples.png"]
    md = (tmp_path / "compare.md").read_text()
    assert "teacher ≤ π0" in md and "domain sort" in md and "MOPD (A) 200" in md
    assert "Mix-RL not reached" in md and "add 300, rev 400" in md
    import csv
    rows = list(csv.DictReader(open(tmp_path / "compare.csv")))
    assert len(rows) == 6 * 4 and {"steps", "samples_nominal", "samples", "lr"} <= set(rows[0])
    assert (tmp_path / "compare_samples.png").stat().st_size > 1000
    r["protocol"] = "equal_samples"
    assert report.write_outputs(tmp_path, r)[0].name == "compare_equal_samples.md"


# ----------------------------------------------------------------------------- lr grid
def test_validation_split_is_disjoint_from_the_test_set():
    cfg = demo_config("data.eval_size=64")
    val = compare.validation_records(cfg)
    _, test = common.load_records(cfg)
    for d in DOMAINS:
        assert len(val[d]) == 64 == len(test[d])
        assert not {r["prompt"] for r in val[d]} & {r["prompt"] for r in test[d]}
    with pytest.raises(cfgmod.ConfigError, match="no held-out records beyond"):
        compare.validation_records(demo_config("data.eval_size=5000"))


def test_lr_grid_keeps_the_best_validation_score(tmp_path, monkeypatch):
    trained = []
    val = {0.01: {"add": 0.3}, 0.001: {"add": 0.5}, 0.0001: {"add": 0.45}}

    def fake_train(ctx, method, budget, lr, seed, sources):
        trained.append((lr, seed))
        return {"dir": str(tmp_path / f"lr{lr:g}")}

    def fake_scores(eval_cfg, dirs, domains=None):
        if "base" in dirs:
            return {"base": {"add": 0.2}, "t_add": {"add": 0.6}}
        return {"m": val[float(Path(dirs["m"]).parent.name[2:])]}

    monkeypatch.setattr(compare, "train_one", fake_train)
    monkeypatch.setattr(compare, "validation_scores", fake_scores)
    cfg = demo_config("compare.lr_grid=[0.01, 0.001, 0.0001]")
    ctx = compare.Context(tmp_path, demo.MODES["full"], [], demo.DEMO_CONFIG, cfg,
                          tmp_path / "pi0", {"add": tmp_path / "t"}, {}, "paper")
    lr, grid = compare.select_lr(ctx, "mopd_A", None, None, None)
    assert lr == 0.001 and trained == [(0.01, 0), (0.001, 0), (0.0001, 0)]
    assert grid[0.001] == pytest.approx(0.75) and grid[0.01] == pytest.approx(0.25)
    assert np.isfinite(list(grid.values())).all()
