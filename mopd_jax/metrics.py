"""Run logging: per-step scalars to ``metrics.jsonl`` and TensorBoard, config print (progress: progress.py).

``metrics.jsonl`` holds one JSON object per step, ``{"step": S, "mopd/kl/math": 0.12, ...}``,
each line flushed and fsynced; non-finite values are written as ``null``. TensorBoard event
files go to ``run_dir/tb/`` when the optional ``tensorboard`` extra (tensorboardX) is
installed (``tensorboard=None``, the default, means: when available).

A run resumed from the checkpoint at step S opens ``MetricsWriter(run_dir, resume_step=S)``:
lines after S are dropped first (and TensorBoard is told to purge them), so a killed and
resumed run ends with the same ``metrics.jsonl`` as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

METRICS_FILE = "metrics.jsonl"


def _scalar(key: str, value) -> float:
    """A Python float from a float / numpy / jax scalar (or size-1 array)."""
    a = np.asarray(value)
    if a.size != 1:
        raise ValueError(f"metric {key!r}: expected a scalar, got shape {a.shape}; expand "
                         "per-domain arrays with metrics.per_domain first")
    return float(a.reshape(()))


def _parse_lines(text: str, path: Path) -> list[dict]:
    """Parsed records; a partial last line (a crash mid-write) is dropped."""
    lines = text.split("\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # unterminated tail
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON: {e}") from e
    return out


def _dump(record: Mapping[str, Any]) -> str:
    return json.dumps(record, allow_nan=False) + "\n"


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All records of ``run_dir/metrics.jsonl`` in order; ``null`` values read back as NaN."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no metrics file at {path}")
    return [{k: (math.nan if v is None else v) for k, v in r.items()}
            for r in _parse_lines(path.read_text(), path)]


def _summary_writer_class():
    """tensorboardX's SummaryWriter without its optional ``import torch`` (2-4 s at start-up
    where torch happens to be installed; we only log scalars)."""
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # makes `import torch` inside tensorboardX raise ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def tensorboard_available() -> bool:
    """Whether tensorboardX (``pip install 'mopd-jax[tensorboard]'``) is importable."""
    import importlib.util
    return importlib.util.find_spec("tensorboardX") is not None


class MetricsWriter:
    """Appends per-step scalars to ``run_dir/metrics.jsonl`` and TensorBoard (``run_dir/tb``).

    ``resume_step``: drop records with step > resume_step before appending (atomic rewrite).
    ``tensorboard``: True (required), False (off) or None (when tensorboardX is installed).
    """

    def __init__(self, run_dir: str | Path, *, tensorboard: bool | None = None,
                 resume_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        if self.path.exists():
            records = _parse_lines(self.path.read_text(), self.path)
            if resume_step is not None:
                records = [r for r in records if r.get("step", -1) <= resume_step]
            self._rewrite(records)  # also drops a partial last line
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard is None:  # auto: TensorBoard files when the optional extra is installed
            tensorboard = tensorboard_available()
        if tensorboard:
            try:
                SummaryWriter = _summary_writer_class()
            except ImportError as e:
                raise ImportError("MetricsWriter(tensorboard=True) needs tensorboardX "
                                  "(pip install tensorboardX), or pass tensorboard=False") from e
            # purge_step makes TensorBoard discard the old files' events from that step on.
            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=purge)

    def _rewrite(self, records: list[dict]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        with open(tmp, "w") as f:
            f.writelines(_dump(r) for r in records)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Log scalars for ``step``; values may be floats, numpy or jax scalars."""
        values = {k: _scalar(k, v) for k, v in metrics.items()}
        record = {"step": int(step)}
        record.update({k: (v if math.isfinite(v) else None) for k, v in values.items()})
        self._file.write(_dump(record))
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, int(step))

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NullWriter:
    """A MetricsWriter that writes nothing: what processes other than 0 log to."""

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def per_domain(metrics: Mapping[str, Any], domains: Sequence[str]) -> dict[str, Any]:
    """Expand ``<name>/domain`` arrays of shape [M] into scalars ``<name>/<domain name>``.

    Other entries pass through unchanged. ``domains[i]`` names entry i.
    """
    out = {}
    for key, value in metrics.items():
        prefix, _, last = key.rpartition("/")
        if last != "domain" or not prefix:
            out[key] = value
            continue
        a = np.asarray(value)
        if a.shape != (len(domains),):
            raise ValueError(f"metric {key!r}: shape {a.shape} does not match "
                             f"{len(domains)} domains {list(domains)}")
        out.update({f"{prefix}/{d}": a[i] for i, d in enumerate(domains)})
    return out


def _flatten(obj, prefix: str = "") -> list[tuple[str, Any]]:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping) and obj:
        return [kv for k, v in obj.items() for kv in _flatten(v, f"{prefix}{k}.")]
    return [(prefix[:-1], obj)]


def format_config(cfg) -> str:
    """The resolved config as aligned ``section.field = value`` lines (the ``--set`` syntax).

    Takes a nested dict or a (nested) dataclass; values print as their ``repr``.
    """
    items = _flatten(cfg)
    width = max((len(k) for k, _ in items), default=0)
    return "\n".join(f"{k:<{width}} = {v!r}" for k, v in items)
