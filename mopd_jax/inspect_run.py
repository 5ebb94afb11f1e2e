"""``mopd inspect``: a printable summary of a run directory's rollouts and metrics.

Reads ``run_dir/rollouts`` (a ``RolloutStore``) and, if present, ``run_dir/metrics.jsonl``.
Safe on a run that is still training: only published rollouts are read. The [N, L] arrays
are read in blocks of rows, so this works on runs far larger than memory.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np

from mopd_jax.metrics import METRICS_FILE, read_metrics
from mopd_jax.rollout_store import RolloutStore, StoreError

ROLLOUTS_DIR = "rollouts"
_BLOCK_ROWS = 256  # rows of [N, L] arrays read at a time


def _log_ratio_sums(store: RolloutStore, start: int, stop: int) -> dict[str, list[float]]:
    """Per domain [sum of (sampler - teacher) log-prob, token count] over response tokens.

    This estimates KL(sampler || teacher) per token, E_mu[log mu - log pi_T], on the sampler's
    own tokens; positions the teacher did not score (NaN) are skipped. Reads the [N, L]
    arrays in blocks of rows so a long run never has to fit in memory.
    """
    sums: dict[str, list[float]] = {}
    for b0 in range(start, stop, _BLOCK_ROWS):
        blk = store.read(b0, min(b0 + _BLOCK_ROWS, stop), columns=(
            "prompt_len", "length", "sampler_logp", "teacher_logp", "domain"))
        t = np.arange(blk["sampler_logp"].shape[1])[None, :]
        log_ratio = blk["sampler_logp"] - blk["teacher_logp"]
        scored = ((t >= blk["prompt_len"][:, None]) & (t < blk["length"][:, None])
                  & np.isfinite(log_ratio))
        for d in np.unique(blk["domain"]):
            m = scored & (blk["domain"] == d)[:, None]
            acc = sums.setdefault(str(d), [0.0, 0])
            acc[0] += float(log_ratio[m].sum())
            acc[1] += int(m.sum())
    return sums


def _domain_rows(rows: dict[str, np.ndarray], kl: dict[str, list[float]]) -> list[tuple]:
    """(domain, count, mean reward, mean response length, KL per token) per domain, + all."""
    resp_len = rows["length"] - rows["prompt_len"]

    def row(name, sel, kl_sum, kl_tokens):
        rewards = rows["reward"][sel]
        rewards = rewards[np.isfinite(rewards)]
        return (name, int(sel.sum()), rewards.mean() if rewards.size else math.nan,
                resp_len[sel].mean(), kl_sum / kl_tokens if kl_tokens else math.nan)

    names = sorted(set(rows["domain"].tolist()))
    table = [row(d, rows["domain"] == d, *kl.get(d, (0.0, 0))) for d in names]
    if len(names) > 1:
        table.append(row("(all)", np.ones(len(resp_len), bool),
                         sum(v[0] for v in kl.values()), sum(v[1] for v in kl.values())))
    return table


def _table(header: tuple[str, ...], rows: list[tuple]) -> str:
    def cell(v):
        return f"{v:.4g}" if isinstance(v, (float, np.floating)) else str(v)

    cells = [header] + [tuple(cell(v) for v in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(cells[0]), fmt(tuple("-" * w for w in widths))]
                     + [fmt(r) for r in cells[1:]])


def _pick_samples(data: dict[str, np.ndarray], k: int) -> list[int]:
    """Up to ``k`` row indices, newest first, taking the domains in turn."""
    by_domain: dict[str, list[int]] = {}
    for i in range(len(data["step"]) - 1, -1, -1):
        by_domain.setdefault(str(data["domain"][i]), []).append(i)
    queues = [by_domain[d] for d in sorted(by_domain)]
    picked = []
    while len(picked) < k and any(queues):
        for q in queues:
            if q and len(picked) < k:
                picked.append(q.pop(0))
    return picked


def _staleness(store: RolloutStore, steps: np.ndarray, start: int, stop: int) -> list[str]:
    """Async runs: how many policy versions old the rollouts were when trained on."""
    try:
        version = store.read(start, stop, columns=("version",))["version"]
    except StoreError:  # a store from before the version column
        return []
    lag = (steps - 1) - version  # the store's step counts the update the rows went into
    if not (version >= 0).all() or not lag.any():
        return []
    hist = ", ".join(f"{int(v)}: {int(c)}" for v, c in zip(*np.unique(lag, return_counts=True)))
    return [f"policy staleness (rollouts trained on at each age in versions): {{{hist}}}"]


def inspect_run(run_dir: str | Path, *, samples: int = 3,
                decode: Callable[[list[int]], str] | None = None,
                step: int | None = None) -> str:
    """A report on ``run_dir``: rollout counts, a per-domain table and a few sample rollouts.

    ``step`` restricts everything to one training step (default: all steps). ``decode`` turns
    token ids into text; without it the samples show the ids. Raises ``StoreError`` naming the
    path when the run directory or its rollout store is missing.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise StoreError(f"run directory not found: {run_dir}")
    store_path = run_dir / ROLLOUTS_DIR
    if not (store_path / "meta.json").exists():
        raise StoreError(f"no rollout store in run directory {run_dir} (expected "
                         f"{store_path}/meta.json); has the run written any rollouts?")
    store = RolloutStore.open(store_path)
    rows = store.read(columns=("step", "domain", "prompt_len", "length", "reward"))
    steps = np.unique(rows["step"])
    out = [f"run {run_dir}"]
    if len(steps):
        out.append(f"rollouts: {len(rows['step'])} over {len(steps)} steps "
                   f"({steps[0]}..{steps[-1]})")
    else:
        out.append("rollouts: 0")
    start, stop = 0, len(rows["step"])
    if step is not None:  # steps are non-decreasing, so one step's rows are contiguous
        start, stop = (int(np.searchsorted(rows["step"], step, side=side))
                       for side in ("left", "right"))
        rows = {k: v[start:stop] for k, v in rows.items()}
        out.append(f"step {step}: {stop - start} rollouts")

    if stop > start:
        out += _staleness(store, rows["step"], start, stop)
        out += ["", _table(("domain", "rollouts", "reward", "resp_len", "kl/token"),
                           _domain_rows(rows, _log_ratio_sums(store, start, stop))),
                "(kl/token: mean of sampler minus teacher log-prob on response tokens, an "
                "estimate of KL(student || teacher))"]
        show = decode or (lambda ids: " ".join(map(str, ids)))
        for i in _pick_samples(rows, samples):
            p, n = int(rows["prompt_len"][i]), int(rows["length"][i])
            ids = store.read(start + i, start + i + 1, columns=("tokens",))["tokens"][0].tolist()
            out += ["", f"--- sample: step {rows['step'][i]}, domain {rows['domain'][i]}, "
                        f"reward {float(rows['reward'][i]):.4g}, {n - p} response tokens",
                    f"prompt:   {show(ids[:p])}", f"response: {show(ids[p:n])}"]

    metrics_path = run_dir / METRICS_FILE
    if metrics_path.exists():
        records = [r for r in read_metrics(run_dir) if step is None or r["step"] <= step]
        out += ["", f"metrics: {len(records)} records in {metrics_path}"]
        if records:
            last = records[-1]
            out.append(f"latest (step {last['step']}):")
            keys = sorted(k for k in last if k != "step")
            width = max((len(k) for k in keys), default=0)
            out += [f"  {k:<{width}}  {last[k]:.6g}" for k in keys]
    return "\n".join(out)
