"""`mopd compare`: MOPD and every baseline from one pi_0 and one set of teachers, equal budget.

Layout under ``--out``: ``sft/`` and ``teacher_<d>/`` (shared with `mopd demo`, reused when
finished), then ``compare/<method>/s<seed>/`` per method and seed (``compare/round2/`` holds the
second round's teachers), and the outputs ``compare.md``, ``compare.csv``, ``compare.json`` and
``compare_samples.png``.

Budget: every trained method gets ``compare.samples`` samples (student rollouts, or teacher
responses for Off-Policy FT) in all, turned into its own step count from its samples per step;
the samples it really consumed (GRPO's dynamic sampling draws extra rounds) are reported.
Param-Merge uses none. Scores are greedy rewards on the fixed, seeded held-out set, normalised
per domain: 0 = pi_0, 1 = that domain's teacher; the mean gives each domain equal weight.
"""

from __future__ import annotations

import csv
import json
import math
import time
from importlib import resources
from pathlib import Path

import numpy as np

from mopd_jax import config as cfgmod
from mopd_jax.recipes import demo, recipe_fn
from mopd_jax.recipes.baselines import run_phase
from mopd_jax.recipes.grpo import run_grpo

METHODS = {
    "mopd": "MOPD",
    "mix_rl": "Mix-RL",
    "cascade": "Cascade RL",
    "offpolicy_ft": "Off-Policy FT",
    "merge_avg": "Param-Merge (Avg)",
    "merge_ta": "Param-Merge (Task Arithmetic)",
    "merge_ties": "Param-Merge (TIES)",
    "mopd_round2": "MOPD, second round",
}
QUICK_SAMPLES = 384


def resolve_config(name: str) -> Path:
    """CONFIG path; 'demo' names the built-in demo config."""
    if name == "demo":
        return Path(str(resources.files("mopd_jax") / "assets" / "demo.yaml"))
    return Path(name)


def _steps(samples: int, per_step: int, minimum: int = 1) -> int:
    return max(minimum, round(samples / per_step))


def method_config(method: str, base, out: Path, seed: int, mode: dict, pi0, teachers,
                  overrides, config):
    """The recipe config of one method run at the compare budget."""
    cfg0 = base
    budget = cfg0.compare.samples
    run_dir = out / "compare" / method / f"s{seed}"
    common = {"run.seed": seed, "run.init": str(pi0),
              **{f"mopd.teachers.{d}": str(p) for d, p in teachers.items()}}
    if method in ("mopd", "mopd_round2"):
        m = cfg0.mopd
        steps = _steps(budget, m.prompts_per_step * m.samples_per_prompt)
        extra = {"run.recipe": "mopd", "optimizer.lr": mode["mopd_lr"]}
    elif method in ("mix_rl", "cascade"):
        g = cfg0.grpo
        n_stages = len(cfg0.cascade.order or cfg0.data.builtin or [1])
        steps = _steps(budget, g.prompts_per_step * g.group_size,
                       n_stages if method == "cascade" else 1)
        extra = {"run.recipe": method, "optimizer.lr": mode["grpo_lr"]}
    elif method == "offpolicy_ft":
        steps = _steps(budget, cfg0.offpolicy.prompts_per_step)
        extra = {"run.recipe": "offpolicy_ft", "optimizer.lr": mode["mopd_lr"]}
    elif method.startswith("merge_"):
        steps = 1
        kind = {"merge_avg": "average", "merge_ta": "task_arithmetic",
                "merge_ties": "ties"}[method]
        extra = {"run.recipe": "merge", "merge.method": kind}
    else:
        raise cfgmod.ConfigError(f"compare.methods: unknown method {method!r}; choose from "
                                 f"{[m for m in METHODS if m != 'mopd_round2']}")
    points = cfg0.compare.eval_points
    every = max(1, steps // points) if points and steps > 1 else 0
    return demo.phase_config(out, f"compare/{method}/s{seed}", mode, overrides, config, **{
        **common, **extra, "run.name": f"{method}-s{seed}", "run.out_dir": str(run_dir),
        "optimizer.total_steps": steps, "run.eval_every": every})


def _final_scores(run_dir: Path) -> dict[str, float]:
    return json.loads((run_dir / "eval.json").read_text())


def _curve(run_dir: Path) -> list[tuple[float, dict]]:
    """(samples consumed so far, {domain: score}) at each evaluation of a run."""
    pts, samples = [], {}
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return pts
    for line in path.read_text().splitlines():
        r = json.loads(line)
        samples.update({k: v for k, v in r.items() if k.startswith("samples/")})
        ev = {k[5:]: v for k, v in r.items() if k.startswith("eval/")}
        if ev:
            pts.append((float(sum(samples.values())), ev))
    return pts


def normalised(scores: dict, base: dict, teacher: dict) -> dict[str, float]:
    out = {}
    for d in teacher:
        gap = teacher[d] - base[d]
        out[d] = (scores[d] - base[d]) / gap if gap > 0 and d in scores else float("nan")
    return out


def _mean(xs):
    xs = [x for x in xs if x == x]
    return sum(xs) / len(xs) if xs else float("nan")


def run_compare(config: str = "demo", out: str = "runs/compare", quick: bool = False,
                seeds: int = 1, overrides=(), second_round: bool | None = None) -> dict:
    """Run every method of compare.methods for each seed; write compare.md/.csv/.json + plot."""
    out = Path(out)
    cfg_path = resolve_config(config)
    mode = dict(demo.MODES["quick" if quick else "full"])
    overrides = list(overrides)
    if quick:
        overrides = [f"compare.samples={QUICK_SAMPLES}", "compare.eval_points=1"] + overrides
    base = demo.phase_config(out, "compare", mode, overrides, cfg_path)
    if seeds < 1:
        raise cfgmod.ConfigError("--seeds: must be >= 1")
    unknown = [m for m in base.compare.methods if m not in METHODS or m == "mopd_round2"]
    if unknown:  # before any training, not after the first methods ran
        raise cfgmod.ConfigError(f"compare.methods: unknown method(s) {unknown}; choose from "
                                 f"{[m for m in METHODS if m != 'mopd_round2']} (the second "
                                 "round is --second-round)")
    second = base.compare.second_round if second_round is None else second_round
    t_all = time.perf_counter()
    pi0, teachers, _ = demo.base_and_teachers(out, mode, overrides, cfg_path)
    eval_cfg = demo.phase_config(out, "compare/eval", mode, overrides, cfg_path, **{
        "run.init": str(pi0), **{f"mopd.teachers.{d}": str(p) for d, p in teachers.items()}})
    ref = demo.evaluate_models(eval_cfg, pi0, teachers, None)
    base_scores = {r["domain"]: r["base"] for r in ref["rows"]}
    teacher_scores = {r["domain"]: r["teacher"] for r in ref["rows"]}

    runs = []  # one dict per (method, seed)
    methods = list(base.compare.methods) + (["mopd_round2"] if second else [])
    for method in methods:
        for seed in range(seeds):
            if method == "mopd_round2":
                student = out / "compare" / "mopd" / f"s{seed}" / "model"
                t2 = _second_round_teachers(out, mode, overrides, cfg_path, student, seed)
                cfg = method_config(method, base, out, seed, mode, student, t2, overrides,
                                    cfg_path)
            else:
                cfg = method_config(method, base, out, seed, mode, pi0, teachers, overrides,
                                    cfg_path)
            run_dir = Path(cfg.run.out_dir)
            reused = (run_dir / "model" / "model.json").is_file()
            t0 = time.perf_counter()
            run_phase(recipe_fn(cfg.run.recipe), cfg)  # the recipe its config names
            wall = _wall(run_dir, None if reused else time.perf_counter() - t0)
            scores = _final_scores(run_dir)
            curve = _curve(run_dir)
            used = curve[-1][0] if curve else 0.0
            norm = normalised(scores, base_scores, teacher_scores)
            runs.append({"method": method, "seed": seed, "scores": scores, "normalised": norm,
                         "mean_normalised": _mean(norm.values()), "samples": used,
                         "wall_s": wall, "curve": ([] if method.startswith("merge_") else
                                                   [(0.0, 0.0)]) + [
                             (s, _mean(normalised(ev, base_scores, teacher_scores).values()))
                             for s, ev in curve]})
    result = {"base": base_scores, "teacher": teacher_scores, "runs": runs,
              "domains": sorted(teacher_scores), "seeds": seeds,
              "budget": base.compare.samples, "wall_s": time.perf_counter() - t_all}
    write_outputs(out, result)
    print(format_compare(result))
    print(f"wrote {out / 'compare.md'}, {out / 'compare.csv'}, {out / 'compare_samples.png'}")
    return result


def _wall(run_dir: Path, measured: float | None) -> float:
    """Wall time of a run: measured now, or the one recorded when a reused run ran."""
    path = run_dir / "wall_s.json"
    if measured is None:
        return json.loads(path.read_text()) if path.is_file() else float("nan")
    path.write_text(json.dumps(measured))
    return measured


def _second_round_teachers(out, mode, overrides, cfg_path, student, seed) -> dict:
    """Paper 5.4: new GRPO teachers forked from the MOPD student, one per domain."""
    base = demo.phase_config(out, "compare/round2", mode, overrides, cfg_path)
    teachers = {}
    for d in sorted(base.data.builtin or base.mopd.teachers):
        cfg = demo.phase_config(out, f"compare/round2/s{seed}/teacher_{d}", mode, overrides,
                                cfg_path, **{
            "run.recipe": "grpo", "run.init": str(student), "data.only_domains": f"[{d}]",
            "optimizer.total_steps": mode["grpo"], "optimizer.lr": mode["grpo_lr"],
            "run.seed": seed})
        teachers[d] = run_phase(run_grpo, cfg)
    return teachers


# ----------------------------------------------------------------------------- outputs
def _agg(runs, key):
    vals = [r[key] for r in runs]
    m = _mean(vals)
    finite = [v for v in vals if v == v]
    sd = float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0
    return m, sd


def summary(result: dict) -> list[dict]:
    """One row per method: mean and spread (sample std over seeds) of every column."""
    rows = []
    for method in dict.fromkeys(r["method"] for r in result["runs"]):
        rs = [r for r in result["runs"] if r["method"] == method]
        row = {"method": method, "name": METHODS[method], "seeds": len(rs)}
        for d in result["domains"]:
            row[f"{d}"] = _agg([{"v": r["scores"].get(d, float("nan"))} for r in rs], "v")
            row[f"{d}_norm"] = _agg([{"v": r["normalised"][d]} for r in rs], "v")
        row["mean_normalised"] = _agg(rs, "mean_normalised")
        row["samples"] = _agg(rs, "samples")
        row["wall_s"] = _agg(rs, "wall_s")
        rows.append(row)
    return rows


def _pm(v, fmt="{:.3f}"):
    m, sd = v
    if m != m:
        return "n/a"
    return fmt.format(m) + (f" ± {fmt.format(sd)}" if sd else "")


def format_compare(result: dict) -> str:
    doms = result["domains"]
    head = ["method", *[f"{d} (norm)" for d in doms], "mean norm", "samples", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| pi_0 (SFT base) | " + " | ".join(
        f"{result['base'][d]:.3f} (0)" for d in doms) + " | 0 | – | – |")
    lines.append("| teachers | " + " | ".join(
        f"{result['teacher'][d]:.3f} (1)" for d in doms) + " | 1 | – | – |")
    for row in summary(result):
        cells = [row["name"]]
        cells += [f"{_pm(row[d])} ({_pm(row[f'{d}_norm'], '{:.2f}')})" for d in doms]
        cells += [_pm(row["mean_normalised"]), _pm(row["samples"], "{:.0f}"),
                  _pm(row["wall_s"], "{:.0f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(out: Path, result: dict) -> None:
    with open(out / "compare.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "seed", "domain", "score", "normalised", "pi0", "teacher",
                    "samples", "wall_s"])
        for r in result["runs"]:
            for d in result["domains"]:
                w.writerow([r["method"], r["seed"], d, r["scores"].get(d, ""),
                            r["normalised"][d], result["base"][d], result["teacher"][d],
                            r["samples"], round(r["wall_s"], 1)])
            w.writerow([r["method"], r["seed"], "mean", "", r["mean_normalised"], "", "",
                        r["samples"], round(r["wall_s"], 1)])
    (out / "compare.json").write_text(json.dumps(result, indent=1))
    plotted = _plot(out / "compare_samples.png", result)
    md = [f"# mopd compare — {len(result['domains'])} domains, budget "
          f"{result['budget']} samples per method, {result['seeds']} seed(s)", "",
          "Greedy held-out reward per domain, normalised in parentheses (0 = pi_0, 1 = that "
          "domain's teacher); mean over domains with equal weight; ± is the sample standard "
          "deviation over seeds. Samples: student rollouts (teacher responses for Off-Policy "
          "FT) actually consumed.", "", format_compare(result), ""]
    reach = {m: first_reaching(result, m) for m in ("mopd", "mix_rl")
             if any(r["method"] == m for r in result["runs"])}
    if reach:
        md += ["Samples until the mean normalised score first reached 0.9 (at the evaluation "
               "points): " + ", ".join(f"{METHODS[m]} {'not reached' if v == math.inf else int(v)}"
                                      for m, v in reach.items()), ""]
    if plotted:
        md += ["## Normalised score vs samples consumed", "", "![](compare_samples.png)", ""]
    (out / "compare.md").write_text("\n".join(md))


def _plot(path: Path, result: dict) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    any_curve = False
    for method in dict.fromkeys(r["method"] for r in result["runs"]):
        curves = [r["curve"] for r in result["runs"] if r["method"] == method and r["curve"]]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        x = np.mean([[p[0] for p in c[:n]] for c in curves], 0)
        y = np.mean([[p[1] for p in c[:n]] for c in curves], 0)
        style = "o" if n == 1 else "-o"
        ax.plot(x, y, style, label=METHODS[method], markersize=3)
        any_curve = True
    if not any_curve:
        plt.close(fig)
        return False
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.axhline(0.9, color="gray", lw=0.5, ls=":")
    ax.set_xlabel("samples consumed")
    ax.set_ylabel("mean normalised score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def first_reaching(result: dict, method: str, level: float = 0.9) -> float:
    """Samples at which the seed-mean curve of ``method`` first reaches ``level`` (inf: never)."""
    curves = [r["curve"] for r in result["runs"] if r["method"] == method and r["curve"]]
    if not curves:
        return math.inf
    n = min(len(c) for c in curves)
    for i in range(n):
        if np.mean([c[i][1] for c in curves]) >= level:
            return float(np.mean([c[i][0] for c in curves]))
    return math.inf
