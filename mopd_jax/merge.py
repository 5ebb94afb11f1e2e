"""Param-Merge: combine models fine-tuned from one base without any samples (MOPD.md baselines).

With base weights ``b`` and teacher weights ``t_d`` (task vectors ``tau_d = t_d - b``):

- ``average``: ``mean_d t_d``.
- ``task_arithmetic``: ``b + lam * sum_d tau_d`` (Ilharco et al., 2023).
- ``ties``: TIES-Merging (Yadav et al., 2023): trim each ``tau_d`` to its ``density`` largest
  magnitudes (per tensor), elect each entry's sign as the sign of the trimmed sum, average the
  trimmed entries that agree with it (disjoint mean), then ``b + lam * merged``.

Works on any pytrees of arrays with identical structure, shapes and dtypes (sharded jax arrays
stay sharded); arithmetic is done in float32 and cast back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp

from models.decoder import scans

METHODS = ("average", "task_arithmetic", "ties")


class MergeError(ValueError):
    """Models that cannot be merged (different architectures or shapes) or a bad method."""


def _trim(tau: jax.Array, density: float) -> jax.Array:
    if density >= 1.0:
        return tau
    k = max(1, int(round(density * tau.size)))
    thresh = jax.lax.top_k(jnp.abs(tau).reshape(-1), k)[0][-1]
    return jnp.where(jnp.abs(tau) >= thresh, tau, 0.0)


@jax.jit
def _ties_combine(trimmed: jax.Array) -> jax.Array:
    """[n, ...] trimmed task vectors -> disjoint mean over entries agreeing with the elected sign."""
    sign = jnp.sign(trimmed.sum(0))
    agree = (jnp.sign(trimmed) == sign) & (trimmed != 0)
    count = agree.sum(0)
    return jnp.where(count > 0, (trimmed * agree).sum(0) / jnp.maximum(count, 1), 0.0)


def _layout(cfg) -> str:
    return "scanned" if scans(cfg) else "unrolled"


def merge_params(base, models: Sequence, method: str = "task_arithmetic", *, lam: float = 0.5,
                 density: float = 0.2):
    """Merged params (same structure as ``base``); see the module docstring for each method."""
    if method not in METHODS:
        raise MergeError(f"merge.method: unknown method {method!r}; choose one of {list(METHODS)}")
    if not models:
        raise MergeError("merge: give at least one model to merge")
    if not 0 < density <= 1:
        raise MergeError(f"merge.density: must be in (0, 1], got {density}")
    base_def = jax.tree.structure(base)
    for i, m in enumerate(models):
        if jax.tree.structure(m) != base_def:
            raise MergeError(f"merge: model {i} has a different parameter tree than the base; "
                             "all models must share one architecture")

    def one(b, *ts):
        for t in ts:
            if t.shape != b.shape:
                raise MergeError(f"merge: parameter shapes differ ({t.shape} vs base {b.shape});"
                                 " all models must share one architecture")
        if not jnp.issubdtype(b.dtype, jnp.floating):
            return b
        b32 = b.astype(jnp.float32)
        taus = [t.astype(jnp.float32) - b32 for t in ts]
        if method == "average":
            out = b32 + sum(taus) / len(taus)
        elif method == "task_arithmetic":
            out = b32 + lam * sum(taus)
        else:
            out = b32 + lam * _ties_combine(jnp.stack([_trim(t, density) for t in taus]))
        return out.astype(b.dtype)

    return jax.tree.map(one, base, *models)


def merge_checkpoints(base: str, models: Sequence[str], out: str | Path, method: str, *,
                      lam: float = 0.5, density: float = 0.2) -> Path:
    """Merge model checkpoints (mopd dirs or hf:DIR) and save the result as a mopd checkpoint.

    ``out`` is checked before anything is loaded: it may not be the base, one of the models,
    an existing model or a non-empty directory. The merge is written to a hidden sibling and
    renamed into place, so the base and models are never touched.
    """
    import json
    import shutil

    from mopd_jax.checkpoint import save_model
    from mopd_jax.loading import load_model
    from mopd_jax import sharding as shd
    from mopd_jax.outputs import atomic_dir, check_new_dir

    def path_of(src, flag):
        path = Path(src[3:] if src.startswith("hf:") else src)
        if not path.is_dir():
            raise FileNotFoundError(f"{flag} {src}: not found (expected a mopd model "
                                    "directory or hf:DIR)")
        return path

    def load(src, flag):
        kw = {"hf": src[3:]} if src.startswith("hf:") else {"checkpoint": src}
        return load_model(**kw, mesh=mesh, role="train"), path_of(src, flag)

    path_of(base, "--base")
    for m in models:
        path_of(m, "--models")
    out = check_new_dir(out, "--out", inputs=[base, *models])
    mesh = shd.make_mesh()
    (b, bpath), loaded = load(base, "--base"), [load(m, "--models") for m in models]
    for (m, path) in loaded:
        # Same architecture, family included; names and dtypes may differ.
        # How a model runs (kernels, remat) is not its architecture; the layer layout is
        # compared as scanned-or-not, the parameter trees must then line up.
        diff = [f.name for f in dataclasses.fields(b.cfg)
                if f.name not in ("name", "dtype", "param_dtype", "attention_impl", "remat",
                                  "moe_impl", "scan_layers")
                and getattr(m.cfg, f.name) != getattr(b.cfg, f.name)]
        if scans(m.cfg) != scans(b.cfg):
            raise MergeError(f"merge: {path} stores its layers {_layout(m.cfg)} but the base "
                             f"{bpath} {_layout(b.cfg)} (model.scan_layers); merge their Hugging "
                             "Face exports (`mopd convert --to hf`), which load alike")
        if diff:
            what = ", ".join(f"{f} {getattr(m.cfg, f)} vs {getattr(b.cfg, f)}" for f in diff[:3])
            raise MergeError(f"merge: {path} is a different architecture than the base {bpath} "
                             f"({what}); merge only models fine-tuned from the base")
    merged = merge_params(b.params, [m.params for m, _ in loaded], method, lam=lam,
                          density=density)
    primary = jax.process_index() == 0
    with atomic_dir(out, primary=primary, barrier=_barrier) as tmp:
        save_model(tmp, merged, b.cfg)
        if primary:
            for f in list(bpath.glob("tokenizer*")) + list(bpath.glob("char_tokenizer.json")):
                shutil.copy(f, tmp / f.name)
            (tmp / "merge.json").write_text(json.dumps(
                {"method": method, "lam": lam, "density": density, "base": str(base),
                 "models": [str(m) for m in models]}, indent=1))
    return out.absolute()


def _barrier() -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("mopd_merge_out")
