"""report.md with PNG plots for a demo (or any directory of recipe runs).

Plots: per-domain sample reward of each GRPO teacher over its steps, and the MOPD student's
per-domain reverse-KL estimate and sample reward over its steps (from each run's metrics.jsonl).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mopd_jax.metrics import read_metrics


def _series(rows: list[dict], key: str):
    pts = [(r["step"], r[key]) for r in rows if key in r and r[key] == r[key]]
    return (np.array([p[0] for p in pts]), np.array([p[1] for p in pts])) if pts else None


def _plot(path: Path, title: str, curves: dict, ylabel: str) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {k: v for k, v in curves.items() if v is not None}
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, (x, y) in curves.items():
        ax.plot(x, y, label=label)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _metrics(run_dir: Path) -> list[dict]:
    try:
        return read_metrics(run_dir)
    except FileNotFoundError:
        return []


def write_report(out: str | Path, table: dict) -> Path:
    """Write OUT/report.md (results table + plots) and return its path."""
    out = Path(out)
    domains = [r["domain"] for r in table["rows"]]
    figs = []
    teacher_curves = {d: _series(_metrics(out / f"teacher_{d}"), f"grpo/reward/{d}")
                      for d in domains}
    if _plot(out / "teacher_reward.png", "GRPO teachers: sample reward on their domain",
             teacher_curves, "mean reward"):
        figs.append(("Teachers (GRPO, one per domain)", "teacher_reward.png"))
    mopd = _metrics(out / "mopd")
    if _plot(out / "mopd_kl.png", "MOPD student: per-token KL to its teacher",
             {d: _series(mopd, f"mopd/kl/{d}") for d in domains}, "reverse KL estimate"):
        figs.append(("MOPD: reverse KL to the domain teacher", "mopd_kl.png"))
    if _plot(out / "mopd_reward.png", "MOPD student: sample reward",
             {d: _series(mopd, f"mopd/reward/{d}") for d in domains}, "mean reward"):
        figs.append(("MOPD: outcome reward of the student's samples", "mopd_reward.png"))

    lines = ["# MOPD demo report", "",
             "Held-out greedy accuracy per built-in domain. Normalised score = "
             "(student - pi_0) / (teacher - pi_0): 0 = the SFT base, 1 = that domain's teacher.",
             "", "| domain | pi_0 (SFT) | teacher | MOPD student | normalised |",
             "|---|---|---|---|---|"]
    for r in table["rows"]:
        lines.append(f"| {r['domain']} | {r['base']:.3f} | {r['teacher']:.3f} | "
                     f"{r['student']:.3f} | {r['normalised']:.3f} |")
    m = table.get("mean_normalised")
    lines += ["", f"Mean normalised score: **{m:.3f}**" if m is not None else
              "Mean normalised score: n/a (no teacher beat pi_0)"]
    lines += [""] + list(table["notes"]) if table.get("notes") else []
    if "wall_s" in table:
        lines.append(f"Wall time: {table['wall_s']:.0f} s")
    for title, png in figs:
        lines += ["", f"## {title}", "", f"![{title}]({png})"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
