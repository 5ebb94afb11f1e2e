"""`mopd demo`: SFT base -> one GRPO teacher per built-in domain -> MOPD student -> evaluation.

Every phase is an ordinary recipe run in its own directory under ``--out`` (sft/,
teacher_<domain>/, mopd/), configured from ``mopd_jax/assets/demo.yaml`` plus the phase's step
counts. A finished phase (its model/ exists) is reused, an interrupted one resumes from its
checkpoint, so re-running the same command continues where it stopped.
"""

from __future__ import annotations

import json
import sys
import time
from importlib import resources
from pathlib import Path

from mopd_jax import config as cfgmod
from mopd_jax.recipes import common

DEMO_CONFIG = resources.files("mopd_jax") / "assets" / "demo.yaml"

# Step counts and sizes per mode. Full: about 10 minutes on a 2-core CPU. The SFT base is
# deliberately short and weighted toward `add` (the slowest skill), so pi_0 is partly
# competent on every domain and each GRPO teacher has room to become a specialist.
MODES = {
    "full": {"sft": 400, "sft_lr": 3e-3, "grpo": 300, "grpo_lr": 1e-3, "mopd": 450,
             "mopd_lr": 1e-3, "eval_size": 512, "builtin_size": 4000},
    "quick": {"sft": 60, "sft_lr": 3e-3, "grpo": 3, "grpo_lr": 1e-3, "mopd": 4,
              "mopd_lr": 1e-3, "eval_size": 16, "builtin_size": 600},
}
SFT_MIX = {"add": 0.55, "sort": 0.2, "rev": 0.25}
# Which MOPD estimator the demo's student uses, and why (demo.yaml sets it).
WHY_ESTIMATOR = {
    "C": "estimator C (exact full-vocabulary reverse KL): at the built-in 32-token vocabulary "
         "the exact sum costs what the sampled token costs and has no sampling noise; the "
         "paper's headline is estimator A (sampled token), the one affordable at a "
         "151,936-token vocabulary, which `mopd compare` runs by default "
         "(compare.estimators: [A, B, C] puts them side by side)",
}


def phase_config(out: Path, phase: str, mode: dict, overrides, config=DEMO_CONFIG, **extra):
    sets = [f"run.out_dir={out / phase}", f"run.name={phase}",
            f"data.eval_size={mode['eval_size']}", f"data.builtin_size={mode['builtin_size']}"]
    sets += [f"{k}={v}" for k, v in extra.items()]
    return cfgmod.load_config(str(config), sets + list(overrides))


def base_and_teachers(out: Path, mode: dict, overrides=(), config=DEMO_CONFIG):
    """pi_0 (SFT, or run.init when the config names one) and one GRPO teacher per domain (or
    the config's mopd.teachers); each phase reused when finished. Returns (pi0, teachers, cfg)."""
    from mopd_jax.recipes.baselines import run_phase
    from mopd_jax.recipes.grpo import run_grpo
    from mopd_jax.recipes.sft import run_sft

    weights = {}
    if str(config) == str(DEMO_CONFIG):  # the SFT mix, over the domains this demo runs
        builtin = phase_config(out, "sft", mode, overrides, config).data.builtin
        mix = {d: w for d, w in SFT_MIX.items() if d in builtin}
        if mix:
            weights = {"data.weights": "{" + ", ".join(f"{d}: {w}" for d, w in mix.items())
                                       + "}"}
    sft_cfg = phase_config(out, "sft", mode, overrides, config, **{
        "run.recipe": "sft", "optimizer.total_steps": mode["sft"], "optimizer.lr": mode["sft_lr"],
        **weights})
    domains = sorted(set(sft_cfg.data.builtin) | {r for r in sft_cfg.mopd.teachers})
    pi0 = Path(sft_cfg.run.init) if sft_cfg.run.init else run_phase(run_sft, sft_cfg)
    teachers = {}
    for d in domains:
        if d in sft_cfg.mopd.teachers:
            teachers[d] = sft_cfg.mopd.teachers[d]
            continue
        cfg = phase_config(out, f"teacher_{d}", mode, overrides, config, **{
            "run.recipe": "grpo", "run.init": pi0, "data.only_domains": f"[{d}]",
            "optimizer.total_steps": mode["grpo"], "optimizer.lr": mode["grpo_lr"]})
        teachers[d] = run_phase(run_grpo, cfg)
    return pi0, teachers, sft_cfg


def run_demo(out: str = "runs/demo", quick: bool = False, overrides=()) -> dict:
    """Run the whole method; returns the results table and writes OUT/report.md."""
    from mopd_jax.recipes.baselines import run_phase
    from mopd_jax.recipes.mopd import run_mopd
    from mopd_jax.report import write_report

    out = Path(out)
    mode = MODES["quick" if quick else "full"]
    t0 = time.perf_counter()
    pi0, teachers, _ = base_and_teachers(out, mode, overrides)
    mopd_cfg = phase_config(out, "mopd", mode, overrides, **{
        "run.recipe": "mopd", "run.init": pi0, "optimizer.total_steps": mode["mopd"],
        "optimizer.lr": mode["mopd_lr"],
        **{f"mopd.teachers.{d}": str(p) for d, p in teachers.items()}})
    est = mopd_cfg.mopd.estimator
    print(f"MOPD student: {WHY_ESTIMATOR.get(est, f'estimator {est} (mopd.estimator)')}",
          file=sys.stderr)
    student = run_phase(run_mopd, mopd_cfg)

    table = evaluate_models(mopd_cfg, pi0, teachers, student)
    table["wall_s"] = time.perf_counter() - t0
    table["estimator"] = est
    table["notes"] = [f"MOPD student: {WHY_ESTIMATOR.get(est, f'estimator {est}')}."]
    table["notes"] += excluded_notes(table)
    (out / "results.json").write_text(json.dumps(table, indent=1))
    write_report(out, table)
    print(format_table(table))
    print(f"report: {out / 'report.md'}")
    return table


def evaluate_models(cfg, pi0, teachers: dict, student) -> dict:
    """Held-out greedy scores: pi_0, each teacher on its domain, the student; normalised."""
    from mopd_jax.loading import load_model

    run = common.setup(cfg, resume=True, quiet=True)

    def scores(path, domains=None):
        loaded = load_model(checkpoint=str(path), mesh=run.mesh, role="sample")
        return common.evaluate(run.with_model(loaded.graphdef, loaded.params, loaded.cfg),
                               loaded.params, domains)

    base = scores(pi0)
    stud = scores(student) if student is not None else base
    rows = []
    for d in sorted(teachers):
        t = scores(teachers[d], [d])[d]
        gap = t - base[d]
        norm = (stud[d] - base[d]) / gap if gap > 0 else float("nan")
        rows.append({"domain": d, "base": base[d], "teacher": t, "student": stud[d],
                     "normalised": norm})
    finite = [r["normalised"] for r in rows if r["normalised"] == r["normalised"]]
    table = {"rows": rows, "mean_normalised": sum(finite) / len(finite) if finite else None}
    for note in excluded_notes(table):
        print(note, file=sys.stderr)
    return table


def excluded_notes(table: dict) -> list[str]:
    """A line per domain whose teacher does not beat pi_0 (no normalised score, not in the
    mean)."""
    return [f"note: domain {r['domain']}: its teacher ({r['teacher']:.3f}) does not beat pi_0 "
            f"({r['base']:.3f}); it has no normalised score and is left out of the mean"
            for r in table["rows"] if not r["teacher"] > r["base"]]


def format_table(table: dict) -> str:
    lines = [f"{'domain':8s} {'pi_0':>6s} {'teacher':>8s} {'student':>8s} {'normalised':>10s}"]
    for r in table["rows"]:
        norm = (f"{r['normalised']:10.3f}" if r["normalised"] == r["normalised"]
                else f"{'teacher <= pi_0':>10s}")
        lines.append(f"{r['domain']:8s} {r['base']:6.3f} {r['teacher']:8.3f} "
                     f"{r['student']:8.3f} {norm}")
    m = table.get("mean_normalised")
    lines.append(f"mean normalised score: {m:.3f}" if m is not None else
                 "mean normalised score: n/a (no teacher beat pi_0)")
    return "\n".join(lines)
