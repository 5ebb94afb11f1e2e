"""Orbax checkpoints of model params, restorable onto any mesh and role layout.

A model checkpoint directory holds ``model.json`` (the resolved ModelConfig) and ``params/``
(an Orbax PyTree checkpoint of the pure param dict). Restoring builds the abstract state with
the target shardings first, so each device reads only its own shards.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from models.config import ModelConfig
from models.decoder import layer_groups, scans
import models
from mopd_jax import sharding as shd


class CheckpointError(ValueError):
    """A checkpoint directory is missing, partial or corrupt."""


def abstract_model(cfg: ModelConfig):
    """(graphdef, abstract State) of the model without allocating parameters."""
    return nnx.split(nnx.eval_shape(lambda: models.build(cfg, nnx.Rngs(0))))


def abstract_with_shardings(abs_state, mesh, role: str):
    """Pure dict of ShapeDtypeStructs carrying the target NamedShardings."""
    shardings = nnx.to_pure_dict(shd.param_shardings(abs_state, mesh, role))
    return jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                        nnx.to_pure_dict(abs_state), shardings)


def save_model(directory: str | Path, state, cfg: ModelConfig) -> Path:
    """Write ``model.json`` and an Orbax ``params/`` checkpoint; returns the directory."""
    out = Path(directory).absolute()
    out.mkdir(parents=True, exist_ok=True)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(out / "params", nnx.to_pure_dict(state), force=True)
    ckptr.wait_until_finished()
    if jax.process_index() == 0:
        (out / "model.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    return out


def read_model_config(directory: str | Path) -> ModelConfig:
    path = Path(directory) / "model.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; {directory} is not a mopd model checkpoint "
                              "(expected model.json and params/; use --hf for Hugging Face "
                              "directories)")
    try:
        d = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path}: corrupt ({e}); re-create it with `mopd convert`")
    for k in ("layer_types", "mlp_only_layers"):
        if d.get(k) is not None:
            d[k] = tuple(d[k])
    return ModelConfig(**d)


def _saved_top_keys(params_dir: Path) -> set:
    try:
        meta = ocp.StandardCheckpointer().metadata(params_dir)
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        return set(tree.keys()) if hasattr(tree, "keys") else set()
    except Exception:  # unreadable metadata: the restore below reports it
        return set()


def stack_layers(unrolled: dict, cfg: ModelConfig, target):
    """An unrolled model's pure-dict params (``layers``: {i: ...}) in the scanned layout
    (``blocks``: {g: [n, ...]}) on ``target``'s shardings (pure dict or nnx State of
    ShapeDtypeStructs)."""
    out = {k: v for k, v in unrolled.items() if k != "layers"}
    layers = {int(i): v for i, v in unrolled["layers"].items()}
    want = (target if isinstance(target, dict) else nnx.to_pure_dict(target))["blocks"]
    out["blocks"] = {}
    for g, (first, n) in enumerate(layer_groups(cfg)):
        stacked = jax.tree.map(lambda *xs: jax.numpy.stack(xs),
                               *[layers[first + j] for j in range(n)])
        out["blocks"][g] = jax.tree.map(lambda x, w: jax.device_put(x, w.sharding), stacked,
                                        want[g])
    return out


def unstack_layers(scanned: dict, scanned_cfg: ModelConfig, target):
    """The inverse of ``stack_layers``: ``blocks`` stacks back to ``layers`` {i: ...}."""
    out = {k: v for k, v in scanned.items() if k != "blocks"}
    want = (target if isinstance(target, dict) else nnx.to_pure_dict(target))["layers"]
    out["layers"] = {}
    for g, (first, n) in enumerate(layer_groups(scanned_cfg)):
        block = scanned["blocks"][g] if g in scanned["blocks"] else scanned["blocks"][str(g)]
        for j in range(n):
            out["layers"][first + j] = jax.tree.map(
                lambda x, w, j=j: jax.device_put(x[j], w.sharding), block, want[first + j])
    return out


def load_model_params(directory: str | Path, mesh, role: str = "train",
                      runtime: dict | None = None):
    """(cfg, graphdef, state) restored from ``directory`` onto ``mesh`` in ``role``'s layout;
    ``runtime`` fields (``models.config.RUNTIME_FIELDS``) override the saved config's, and the
    layers are re-laid (scanned <-> unrolled) when that changes the layout."""
    directory = Path(directory).absolute()
    cfg = read_model_config(directory)
    if runtime:
        cfg = dataclasses.replace(cfg, **runtime)
    graphdef, abs_state = abstract_model(cfg)
    target = abstract_with_shardings(abs_state, mesh, role)
    if not (directory / "params").is_dir():
        raise CheckpointError(f"{directory / 'params'}: missing; the checkpoint is partial")
    saved = _saved_top_keys(directory / "params")
    relay = None  # the saved layout differs: restore in it, then stack or unstack the layers
    if scans(cfg) and "layers" in saved:  # saved unrolled (or before the layer scan)
        relay = dataclasses.replace(cfg, scan_layers=False)
    elif not scans(cfg) and "blocks" in saved:
        relay = dataclasses.replace(cfg, scan_layers=True)
    if relay is not None:
        _, abs_saved = abstract_model(relay)
        target = abstract_with_shardings(abs_saved, mesh, role)
    try:
        restored = ocp.StandardCheckpointer().restore(directory / "params", target)
        if relay is not None:
            want = abstract_with_shardings(abs_state, mesh, role)
            restored = (stack_layers(restored, cfg, want) if scans(cfg)
                        else unstack_layers(restored, relay, want))
    except Exception as e:  # orbax raises many types for partial/corrupt data
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
        raise CheckpointError(f"{directory / 'params'}: cannot restore ({type(e).__name__}: "
                              f"{first[:160]}); the checkpoint is corrupt or from another "
                              "model: re-create it with `mopd convert`") from None
    nnx.replace_by_pure_dict(abs_state, restored)
    return cfg, graphdef, abs_state
