"""The timing model behind ``mopd bench pipeline --split-model``: the expected step time of a
synchronous MOPD step against asynchronous (k = 1) trainer/sampler splits of a TPU slice, from
``mopd compile-check``'s per-step lower bounds (``split_model`` states the assumptions)."""

from __future__ import annotations

import dataclasses
import math

V5P_ICI_BYTES_S = 600e9  # Cloud TPU v5p system architecture: 4,800 Gbps ICI per chip
MIN_TO_S = 60.0


@dataclasses.dataclass(frozen=True)
class StepEstimate:
    """Lower-bound seconds of one MOPD step's stages on ``chips`` chips (compile-check's)."""

    chips: int
    sample_s: float
    score_s: float
    train_s: float
    param_bytes: float
    source: str
    chip: str = "TPU v5p"

    @property
    def sync_s(self) -> float:
        return self.sample_s + self.score_s + self.train_s


def readme_30b_estimate() -> StepEstimate:
    """The README's compile-check figures for configs/qwen3_30b_a3b.yaml on v5p-64 (32 chips):
    sampling 92.4 min, train step 437 s, 99.8 min per MOPD step. Scoring is the rest, 7 s,
    which compile-check counts as one call per teacher (3); the 2,048-row batch in calls of
    ``mopd.score_rows`` = 32 rows takes at least 64 calls, so scoring is scaled to 64 / 3 of
    it (~150 s; derived from rounded figures: about +-1 s per call)."""
    from models.config import preset
    sample_s, train_s = 92.4 * MIN_TO_S, 437.0
    per_call = (99.8 * MIN_TO_S - sample_s - train_s) / 3
    params = preset("qwen3-30b-a3b").num_params()
    return StepEstimate(32, sample_s, per_call * math.ceil(2048 / 32), train_s, params * 2,
                        "README: mopd compile-check configs/qwen3_30b_a3b.yaml --topology v5p-64")


_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def estimate_from_compile_check(rep: dict, source: str = "compile-check JSON") -> StepEstimate:
    """A ``StepEstimate`` from ``mopd compile-check --json``: its sampling and train lower
    bounds, and scoring as the score step's per-call bound times the calls the batch needs
    (at least ceil(batch / score_rows), and one per teacher)."""
    e, steps = rep["estimate"], rep["steps"]
    missing = [k for k in ("sample_s", "score_s", "train_s") if k not in e]
    if missing:
        raise ValueError(f"{source}: no {', '.join(missing)} in its estimate; run mopd "
                         "compile-check with all three steps (--steps train,score,decode)")
    calls = max(e.get("score_calls", 1), math.ceil(rep["batch"] / rep["score_rows"]))
    score_s = steps["score"]["time_s"] * calls if "score" in steps else e["score_s"]
    m = rep["model"]
    return StepEstimate(rep["target"]["chips"], e["sample_s"], score_s, e["train_s"],
                        m["params"] * _DTYPE_BYTES.get(m.get("param_dtype"), 2), source,
                        rep["target"].get("kind", "?"))


def split_model(est: StepEstimate, trainer: int, sampler: int, *,
                ici_bytes_s: float = V5P_ICI_BYTES_S) -> dict:
    """Expected step seconds of a ``trainer`` / ``sampler`` chip split against the sync loop.

    Assumption: each stage's time scales inversely with the chips it runs on (its lower bound
    at ``est.chips`` chips times ``est.chips / chips``); teachers stay resident with the
    trainer, so scoring runs on the trainer chips. Sync: rollout + scoring + train, each on
    all chips. Async, k = 1: the sampler generates step i+1's rollouts while the trainer
    scores and trains step i, so a step takes max(rollout on the sampler chips, scoring +
    train on the trainer chips), plus the weight transfer to the sampler (param bytes over
    ``min(trainer, sampler)`` chips' ICI links at ``ici_bytes_s`` each), counted as not
    overlapped.
    """
    if trainer < 1 or sampler < 1 or trainer + sampler > est.chips:
        raise ValueError(f"split {trainer}/{sampler}: both >= 1 and at most {est.chips} chips "
                         "together")
    n = est.chips
    rollout_s = est.sample_s * n / sampler
    trainer_s = (est.score_s + est.train_s) * n / trainer
    transfer_s = est.param_bytes / (min(trainer, sampler) * ici_bytes_s)
    step_s = max(rollout_s, trainer_s) + transfer_s
    return {"trainer_chips": trainer, "sampler_chips": sampler, "rollout_s": rollout_s,
            "trainer_s": trainer_s, "transfer_s": transfer_s, "async_s": step_s,
            "sync_s": est.sync_s, "async_over_sync": step_s / est.sync_s,
            "idle": "trainer" if rollout_s > trainer_s else "sampler",
            "idle_frac": 1 - min(rollout_s, trainer_s) / max(rollout_s, trainer_s)}


def balanced_sampler_chips(est: StepEstimate) -> float:
    """Sampler chips (continuous) at which both sides take as long: n * sample / sync."""
    return est.chips * est.sample_s / est.sync_s


def default_splits(chips: int) -> list[tuple[int, int]]:
    """trainer/sampler = 3/4 : 1/4, 1/2 : 1/2 and 1/4 : 3/4 of the chips."""
    out = [(chips * 3 // 4, chips - chips * 3 // 4), (chips // 2, chips - chips // 2),
           (chips // 4, chips - chips // 4)]
    return [s for s in out if min(s) >= 1]


def timing_model(est: StepEstimate, splits, ici_bytes_s: float = V5P_ICI_BYTES_S) -> dict:
    rows = [split_model(est, t, s, ici_bytes_s=ici_bytes_s) for t, s in splits]
    bal = balanced_sampler_chips(est)
    near = min(max(round(bal), 1), est.chips - 1)
    if (est.chips - near, near) not in [tuple(s) for s in splits]:
        rows.append({**split_model(est, est.chips - near, near, ici_bytes_s=ici_bytes_s),
                     "nearest_balanced": True})
    return {"estimate": dataclasses.asdict(est), "sync_s": est.sync_s, "ici_bytes_s": ici_bytes_s,
            "balanced_sampler_chips": bal, "splits": rows}


def _secs(s: float) -> str:
    return f"{s * 1e3:.1f} ms" if s < 1 else f"{s:.1f} s" if s < 600 else f"{s / 60:.1f} min"


def format_timing_model(tm: dict) -> str:
    e = tm["estimate"]
    lines = [f"timing model, {e['chips']} x {e['chip']} chips, from {e['source']}",
             f"  per-step lower bounds on all {e['chips']} chips: sampling {_secs(e['sample_s'])}, "
             f"scoring {_secs(e['score_s'])}, train {_secs(e['train_s'])}; params "
             f"{e['param_bytes'] / 2**30:.1f} GiB; ICI {tm['ici_bytes_s'] / 1e9:.0f} GB/s per chip",
             "  assumed: each stage's time scales inversely with its chips; teachers resident with "
             "the trainer; async k=1 step = max(rollout on sampler chips, scoring + train on "
             "trainer chips) + weight transfer (params / (min(trainer, sampler) chips x ICI))",
             f"  sync (every stage on all chips): {_secs(tm['sync_s'])} per step",
             f"{'trainer/sampler':>17}{'rollout':>12}{'score+train':>13}{'transfer':>10}"
             f"{'async step':>12}{'vs sync':>9}  idle"]
    for r in tm["splits"]:
        tag = "  (nearest balanced)" if r.get("nearest_balanced") else ""
        lines.append(f"{r['trainer_chips']:>8}/{r['sampler_chips']:<8}{_secs(r['rollout_s']):>12}"
                     f"{_secs(r['trainer_s']):>13}{_secs(r['transfer_s']):>10}"
                     f"{_secs(r['async_s']):>12}{r['async_over_sync']:>8.2f}x  "
                     f"{r['idle']} {r['idle_frac']:.0%}{tag}")
    lines.append(f"  balanced at {tm['balanced_sampler_chips']:.1f} sampler chips; under linear "
                 "scaling no split beats sync (max(a n/S, b n/T) >= a + b when S + T = n): async "
                 "pays off only where a stage scales worse than linearly (decode's latency, "
                 "stragglers in the last wave), which this model does not credit")
    return "\n".join(lines)


def parse_splits(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        try:
            t, s = (int(x) for x in part.split("/"))
        except ValueError:
            raise ValueError(f"--splits {text!r}: expected TRAINER/SAMPLER chip counts, e.g. "
                             f"24/8,16/16") from None
        out.append((t, s))
    return out
