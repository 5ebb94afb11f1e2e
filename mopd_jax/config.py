"""Typed, frozen configs loaded from YAML with ``--set path.to.field=value`` overrides.

Every section is a frozen dataclass whose fields carry a docstring (the string right after the
field). Unknown keys, wrong types and out-of-range values raise ``ConfigError`` naming the
dotted field and the fix. ``model:`` accepts ``preset: NAME`` (defaults from a named preset) or
``hf: DIR`` (read a Hugging Face ``config.json``), then any ModelConfig field as an override.
"""

from __future__ import annotations

import ast
import difflib
import dataclasses
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from models.config import ModelConfig, ModelConfigError, preset
from mopd_jax.sharding import MeshConfig, MeshError


class ConfigError(ValueError):
    """A user-fixable configuration problem; the message names the field and the fix."""


def _check(ok: bool, field: str, msg: str):
    if not ok:
        raise ConfigError(f"{field}: {msg}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Where a run writes and how it is seeded."""

    name: str = "run"
    """Run name, used in logs."""
    out_dir: str = "runs/default"
    """Directory for checkpoints, metrics and reports."""
    seed: int = 0
    """Seed of parameter init, data order and sampling."""


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup, cosine decay and global-norm clipping."""

    lr: float = 1e-5
    """Peak learning rate."""
    warmup_steps: int = 0
    """Linear warmup steps from 0 to ``lr``."""
    total_steps: int = 1000
    """Steps of the cosine schedule (decays to ``lr * min_lr_ratio``)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr``."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""
    b1: float = 0.9
    """Adam beta1."""
    b2: float = 0.999
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    clip_norm: float = 1.0
    """Global gradient-norm clip; 0 disables it."""
    microbatches: int = 1
    """Gradient accumulation: the batch is split into this many sequential microbatches."""

    def __post_init__(self):
        _check(self.lr > 0, "optimizer.lr", "must be > 0")
        _check(self.warmup_steps >= 0, "optimizer.warmup_steps", "must be >= 0")
        _check(self.total_steps >= 1, "optimizer.total_steps", "must be >= 1")
        _check(0 <= self.min_lr_ratio <= 1, "optimizer.min_lr_ratio", "must be in [0, 1]")
        _check(self.microbatches >= 1, "optimizer.microbatches", "must be >= 1")
        _check(self.clip_norm >= 0, "optimizer.clip_norm", "must be >= 0 (0 disables)")


@dataclasses.dataclass(frozen=True)
class Config:
    """Top-level config: one section per concern."""

    run: RunConfig = RunConfig()
    """Output directory, name and seed."""
    model: ModelConfig = dataclasses.field(default_factory=lambda: preset("tiny"))
    """Student architecture (``preset:``/``hf:`` plus field overrides)."""
    mesh: MeshConfig = MeshConfig()
    """Device mesh axis sizes."""
    optimizer: OptimizerConfig = OptimizerConfig()
    """Optimizer and schedule."""


# ----------------------------------------------------------------------------- building
def field_docs(cls) -> dict[str, str]:
    """The docstring written under each dataclass field."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body
    docs = {}
    for a, b in zip(body, body[1:]):
        if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name)
                and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)
                and isinstance(b.value.value, str)):
            docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{path}: must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {k: _coerce(v, vt, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    return value


def _model_from_dict(d: dict, path: str) -> ModelConfig:
    d = dict(d)
    base = None
    if "hf" in d:
        from models.hf import config_from_hf  # local: only needed for hf-backed configs
        base = config_from_hf(d.pop("hf"))
    if "preset" in d:
        name = d.pop("preset")
        try:
            base = preset(name)
        except ModelConfigError as e:
            raise ConfigError(str(e).replace("model.", f"{path}.", 1)) from None
    fields = build(ModelConfig, d, path, partial=True)
    base = base or ModelConfig()
    try:
        return base.replace(**fields)
    except ModelConfigError as e:
        raise ConfigError(str(e).replace("model.", f"{path}.", 1)) from None


def build(cls, data: Any, path: str = "", partial: bool = False):
    """Instantiate dataclass ``cls`` from a mapping, recursively, with path-named errors."""
    if data is None:
        data = {}
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {data!r}")
    if cls is ModelConfig and not partial:
        return _model_from_dict(data, path or "model")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        fpath = f"{path}.{key}" if path else key
        if key not in names:
            close = difflib.get_close_matches(str(key), sorted(names), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{fpath}: unknown key{hint}; valid keys: {sorted(names)}")
        kwargs[key] = _coerce(value, hints[key], fpath)
    if partial:
        return kwargs
    try:
        return cls(**kwargs)
    except (ModelConfigError, MeshError) as e:
        raise ConfigError(str(e)) from None
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path or cls.__name__}: {e}") from None


def parse_overrides(pairs: list[str]) -> dict:
    """``['a.b=1', 'c=x']`` -> nested dict; values parsed as YAML scalars/lists."""
    out: dict = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--set {pair}: expected path.to.field=value")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {pair}: {p} is set twice as a value and a section")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k),
                                                                             dict) else v
    return out


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found; pass an existing YAML file "
                          "(see configs/ for examples)")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e}); fix the syntax at the reported line")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                cls=Config):
    """Config from an optional YAML file plus ``--set`` overrides, validated."""
    data = load_yaml(path) if path else {}
    data = deep_merge(data, parse_overrides(overrides or []))
    return build(cls, data)


def to_dict(cfg) -> dict:
    """Plain-data view of a config (for printing, YAML and checkpoints)."""
    def conv(x):
        if dataclasses.is_dataclass(x):
            return {f.name: conv(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, (list, tuple)):
            return [conv(v) for v in x]
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        return x
    return conv(cfg)


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
