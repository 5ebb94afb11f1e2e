"""`mopd compare`'s numbers and outputs: normalised scores, seed statistics (mean, std, 95%
interval), "first reached", the tables, the CSV/JSON and the sample-efficiency plot.

Pure functions of the result dict that ``compare.run_compare`` builds (one entry per run:
method, seed, lr, scores, normalised, steps, nominal and consumed samples, curve), so they
are tested on hand-made results.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

NAMES = {"mix_rl": "Mix-RL", "cascade": "Cascade RL", "offpolicy_ft": "Off-Policy FT",
         "merge_avg": "Param-Merge (Avg)", "merge_ta": "Param-Merge (Task Arithmetic)",
         "merge_ties": "Param-Merge (TIES)"}
VARIANT_NAMES = {"": "", "dn": ", DN-MOPD rescale", "foreign": ", foreign teachers",
                 "round2": ", second round"}
NOT_BEATEN = "teacher ≤ π0"


def display(method: str) -> str:
    """'MOPD (A)', 'MOPD (A), DN-MOPD rescale', 'Mix-RL', ..."""
    if method.startswith("mopd_"):
        est, _, variant = method[len("mopd_"):].partition("_")
        return f"MOPD ({est}){VARIANT_NAMES.get(variant, ', ' + variant)}"
    return NAMES.get(method, method)


# ----------------------------------------------------------------------------- scores
def normalised(scores: dict, base: dict, teacher: dict) -> dict[str, float]:
    """(score - pi_0) / (teacher - pi_0) per domain; NaN where the teacher does not beat pi_0
    (no scale to normalise by) or the score is missing."""
    out = {}
    for d in teacher:
        gap = teacher[d] - base[d]
        out[d] = (scores[d] - base[d]) / gap if gap > 0 and d in scores else float("nan")
    return out


def mean_finite(xs) -> float:
    xs = [x for x in xs if x == x]
    return sum(xs) / len(xs) if xs else float("nan")


def excluded_domains(base: dict, teacher: dict) -> list[str]:
    """Domains whose teacher does not beat pi_0: out of every mean normalised score."""
    return sorted(d for d in teacher if not teacher[d] > base[d])


def exclusion_notes(result: dict) -> list[str]:
    return [f"note: domain {d}: its teacher ({result['teacher'][d]:.3f}) does not beat pi_0 "
            f"({result['base'][d]:.3f}), so it has no normalised score and is left out of the "
            "mean normalised score" for d in result.get("excluded", [])]


def seed_stats(values) -> dict:
    """mean, sample std and the 95% t-interval of the mean over seeds (NaNs dropped)."""
    xs = np.asarray([v for v in values if v == v], np.float64)
    if not len(xs):
        return {"mean": math.nan, "std": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
    m = float(xs.mean())
    if len(xs) < 2:
        return {"mean": m, "std": 0.0, "lo": math.nan, "hi": math.nan, "n": 1}
    from scipy import stats
    sd = float(xs.std(ddof=1))
    half = float(stats.t.ppf(0.975, len(xs) - 1)) * sd / math.sqrt(len(xs))
    return {"mean": m, "std": sd, "lo": m - half, "hi": m + half, "n": len(xs)}


def summary(result: dict) -> list[dict]:
    """One row per method: seed statistics of every column."""
    rows = []
    for method in dict.fromkeys(r["method"] for r in result["runs"]):
        rs = [r for r in result["runs"] if r["method"] == method]
        row = {"method": method, "name": display(method), "seeds": len(rs), "lr": rs[0]["lr"],
               "budget": rs[0]["budget"]}
        for d in result["domains"]:
            row[d] = seed_stats(r["scores"].get(d, math.nan) for r in rs)
            row[f"{d}_norm"] = seed_stats(r["normalised"][d] for r in rs)
        for key in ("mean_normalised", "steps", "nominal", "samples", "wall_s"):
            row[key] = seed_stats(r[key] for r in rs)
        rows.append(row)
    return rows


def first_reaching(result: dict, method: str, level: float = 0.9) -> float:
    """Consumed samples at which the seed-mean curve of ``method`` first reaches ``level``
    (curves aligned by evaluation index, x the seeds' mean; inf: never)."""
    curves = [r["curve"] for r in result["runs"] if r["method"] == method and r["curve"]]
    if not curves:
        return math.inf
    n = min(len(c) for c in curves)
    for i in range(n):
        if np.mean([c[i][1] for c in curves]) >= level:
            return float(np.mean([c[i][0] for c in curves]))
    return math.inf


def read_curve(run_dir: Path) -> tuple[list[tuple[float, dict]], int]:
    """((samples consumed so far, {domain: score}) at each evaluation, last step) of a run."""
    pts, samples, steps = [], {}, 0
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return pts, steps
    for line in path.read_text().splitlines():
        r = json.loads(line)
        steps = max(steps, int(r.get("step", 0)))
        samples.update({k: v for k, v in r.items() if k.startswith("samples/")})
        ev = {k[5:]: v for k, v in r.items() if k.startswith("eval/")}
        if ev:
            pts.append((float(sum(samples.values())), ev))
    return pts, steps


# ----------------------------------------------------------------------------- tables
def _cell(st: dict, fmt: str = "{:.2f}", interval: bool = True) -> str:
    if st["n"] == 0:
        return "n/a"
    out = fmt.format(st["mean"])
    if st["n"] > 1:
        out += f" ± {fmt.format(st['std'])}"
        if interval:
            out += f" [{fmt.format(st['lo'])}, {fmt.format(st['hi'])}]"
    return out


def _int(st: dict) -> str:
    if st["n"] == 0 or st["mean"] != st["mean"]:
        return "–"
    return f"{st['mean']:,.0f}" + (f" ± {st['std']:,.0f}" if st["n"] > 1 and st["std"] else "")


def format_compare(result: dict) -> str:
    """The main table: normalised score per domain and the mean (mean ± std [95% interval]
    over seeds), then optimizer steps, nominal and consumed samples and the lr."""
    doms, excluded = result["domains"], set(result.get("excluded", []))
    head = ["method", *doms, "mean normalised", "steps", "samples nominal", "samples consumed",
            "lr"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    tail = " | – | – | – | – |"
    lines.append("| π0 (SFT base) | " + " | ".join(
        f"{result['base'][d]:.3f}" for d in doms) + " | 0" + tail)
    lines.append("| teachers | " + " | ".join(
        f"{result['teacher'][d]:.3f}" + (f" ({NOT_BEATEN})" if d in excluded else "")
        for d in doms) + " | 1" + tail)
    for row in summary(result):
        cells = [row["name"]]
        cells += [NOT_BEATEN if d in excluded else _cell(row[f"{d}_norm"]) for d in doms]
        cells.append(f"**{_cell(row['mean_normalised'])}**" if row["method"].startswith(
            "mopd_") else _cell(row["mean_normalised"]))
        cells += [_int(row["steps"]), _int(row["nominal"]), _int(row["samples"]),
                  "–" if row["lr"] is None else f"{row['lr']:g}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_raw(result: dict) -> str:
    """Held-out greedy score per domain (mean ± std over seeds) and the wall time."""
    doms = result["domains"]
    lines = ["| method | " + " | ".join(doms) + " | wall s |", "|" + "---|" * (len(doms) + 2)]
    for row in summary(result):
        lines.append(f"| {row['name']} | " + " | ".join(
            _cell(row[d], "{:.3f}", interval=False) for d in doms) + f" | {_int(row['wall_s'])} |")
    return "\n".join(lines)


def suffix(result: dict) -> str:
    return "" if result.get("protocol", "paper") == "paper" else f"_{result['protocol']}"


def write_outputs(out: Path, result: dict) -> list[Path]:
    """compare{suffix}.csv / .json / .md and _samples.png; returns the paths written."""
    sfx = suffix(result)
    paths = [out / f"compare{sfx}.md", out / f"compare{sfx}.csv", out / f"compare{sfx}.json"]
    with open(paths[1], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "seed", "domain", "score", "normalised", "pi0", "teacher", "lr",
                    "steps", "samples_nominal", "samples", "budget", "wall_s"])
        for r in result["runs"]:
            tail = [r["lr"] if r["lr"] is not None else "", r["steps"], r["nominal"],
                    r["samples"], r["budget"], round(r["wall_s"], 1)]
            for d in result["domains"]:
                w.writerow([r["method"], r["seed"], d, r["scores"].get(d, ""),
                            r["normalised"][d], result["base"][d], result["teacher"][d], *tail])
            w.writerow([r["method"], r["seed"], "mean", "", r["mean_normalised"], "", "", *tail])
    paths[2].write_text(json.dumps(result, indent=1))
    png = out / f"compare{sfx}_samples.png"
    plotted = plot(png, result)
    budgets = ", ".join(f"{d} {n:,}" for d, n in sorted(result.get("teacher_samples",
                                                                     {}).items()))
    protocol = result.get("protocol", "paper")
    md = [f"# mopd compare — protocol {protocol}, {len(result['domains'])} domains, "
          f"{result['seeds']} seed(s)", "",
          (f"Budgets in consumed samples: MOPD and Off-Policy FT {result['samples']:,}; the RL "
           f"baselines the teachers' per-domain budget ({budgets}; Mix-RL their sum, Cascade "
           "each stage its domain's)." if protocol == "paper" else
           f"Budgets in consumed samples: every trained method {result['samples']:,}."),
          "Each run stops at its budget, with its cosine LR decay over samples.", "",
          "Normalised held-out greedy score per domain (0 = π0, 1 = that domain's teacher) and "
          "their mean over domains with equal weight; mean ± sample std [95% t-interval] over "
          "seeds. Steps: optimizer steps; samples nominal: steps × the method's samples per "
          "step; consumed: every student rollout (teacher response for Off-Policy FT) drawn, "
          "GRPO's dynamically resampled groups included.", "", format_compare(result), ""]
    md += [n + "." for n in exclusion_notes(result)] + ([""] if result.get("excluded") else [])
    md += ["Held-out greedy score (mean ± std over seeds) and wall time per run:", "",
           format_raw(result), ""]
    reach = {m: first_reaching(result, m) for m in dict.fromkeys(
        r["method"] for r in result["runs"]) if not m.startswith("merge_")}
    if reach:
        md += ["Consumed samples until the seed-mean normalised score first reached 0.9 (at "
               "the evaluation points): " + ", ".join(
                   f"{display(m)} {'not reached' if v == math.inf else f'{v:,.0f}'}"
                   for m, v in reach.items()), ""]
    if result.get("lr_grid"):
        md += ["Learning rates chosen on the validation split (mean normalised score there): "
               + "; ".join(f"{display(m)}: " + ", ".join(
                   f"{float(k):g} → {v:.3f}" for k, v in g["validation"].items())
                   + f" (kept {g['lr']:g})" for m, g in result["lr_grid"].items()), ""]
    if plotted:
        md += ["## Normalised score vs consumed samples", "", f"![]({png.name})", ""]
    paths[0].write_text("\n".join(md))
    return paths + ([png] if plotted else [])


def plot(path: Path, result: dict) -> bool:
    """Mean normalised score vs consumed samples, one curve per method with its seeds' 95%
    band (± std when the interval is undefined); Param-Merges as points at 0 samples."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    any_curve = False
    for method in dict.fromkeys(r["method"] for r in result["runs"]):
        curves = [r["curve"] for r in result["runs"] if r["method"] == method and r["curve"]]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        x = np.mean([[p[0] for p in c[:n]] for c in curves], 0)
        st = [seed_stats([c[i][1] for c in curves]) for i in range(n)]
        y = np.array([s["mean"] for s in st])
        line, = ax.plot(x, y, "o" if n == 1 else "-o", label=display(method), markersize=3)
        if len(curves) > 1 and n > 1:
            lo = np.array([s["lo"] for s in st])
            hi = np.array([s["hi"] for s in st])
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
        any_curve = True
    if not any_curve:
        plt.close(fig)
        return False
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.axhline(0.9, color="gray", lw=0.5, ls=":")
    ax.set_xlabel("samples consumed")
    ax.set_ylabel("mean normalised score")
    ax.set_title(f"protocol {result.get('protocol', 'paper')}, {result['seeds']} seed(s), "
                 "bands: 95% interval over seeds", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
