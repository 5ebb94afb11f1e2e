"""The run directory's own truth: nothing written before a run starts, the config on disk is the
run's, a resume with a changed trajectory is refused unless allowed (and then recorded).

``check_out_dir`` only looks (a failed start writes nothing); ``check_resume`` compares the
config of a run being resumed with the one it was started with (``config.yaml``) and refuses
changed fields that alter what the run computes (``validate.TRAJECTORY_FREE`` lists the ones
that do not) unless ``--allow-config-change``; ``start`` creates the directory and writes
``config.yaml`` (and ``config_changes.jsonl``) once the loop is about to run.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import os
import sys
from pathlib import Path

import yaml

from mopd_jax import config as cfgmod
from mopd_jax.validate import changes_text, config_changes

CHANGES_FILE = "config_changes.jsonl"
_ALLOW_CHANGE = contextvars.ContextVar("mopd_allow_config_change", default=False)


class RunDirError(ValueError):
    """run.out_dir cannot be used as asked (a file, unwritable, another run, a changed config)."""


class AlreadyFinished(Exception):
    """``--resume`` of a run that already ended: nothing to do (not an error)."""

    def __init__(self, out: Path, step: int | None):
        super().__init__(f"{out}: the run already finished (step {step}); nothing to do "
                         f"(model: {out / 'model'})")
        self.out, self.step = out, step


@contextlib.contextmanager
def allowing_config_change(allow: bool = True):
    """Within this block a resumed run may change trajectory fields (``--allow-config-change``)."""
    token = _ALLOW_CHANGE.set(allow)
    try:
        yield
    finally:
        _ALLOW_CHANGE.reset(token)


def check_out_dir(cfg, resume: bool) -> Path:
    """run.out_dir can hold this run; looks only, writes nothing."""
    out = Path(cfg.run.out_dir)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"run.out_dir: {out} is a file; choose a directory with --set "
                          "run.out_dir=DIR")
    from mopd_jax.outputs import _writable_parent
    _writable_parent(out / "_", "run.out_dir", RunDirError,  # out itself, or its ancestor
                     "choose a writable directory with --set run.out_dir=DIR")
    if not resume:
        ckpts = out / "checkpoints"
        if ckpts.is_dir() and any(ckpts.iterdir()):
            raise RunDirError(f"run.out_dir: {out} already holds a run; pass --resume to "
                              "continue it or choose another directory with --set "
                              "run.out_dir=DIR")
        if (out / "model" / "model.json").is_file():
            raise RunDirError(f"run.out_dir: {out} already holds a trained model ({out / 'model'}"
                              "); choose another directory with --set run.out_dir=DIR")
    return out


def saved_config(out: Path) -> dict | None:
    path = out / "config.yaml"
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def latest_checkpoint(out: Path) -> int | None:
    ckpts = out / "checkpoints"
    if not ckpts.is_dir():
        return None
    steps = [int(p.name) for p in ckpts.iterdir()
             if p.name.isdigit() and (p / "commit_success.txt").exists()]
    return max(steps) if steps else None


def check_resume(cfg, out: Path, resume: bool) -> tuple:
    """The trajectory changes a resume makes (allowed ones), or raise; () when not resuming."""
    if not resume:
        return ()
    step = latest_checkpoint(out)
    old = saved_config(out)
    if step is None or old is None:
        return ()
    changes = tuple(config_changes(old, cfgmod.to_dict(cfg)))
    if changes and not _ALLOW_CHANGE.get():
        names = ", ".join(k for k, _, _ in changes)
        raise RunDirError(f"--resume: {names} changed since {out} was started "
                          f"({changes_text(changes)[:300]}); a resumed run must keep its "
                          "trajectory: undo the change, start a new run directory, or pass "
                          "--allow-config-change (recorded in the run)")
    if not changes and (out / "model" / "model.json").is_file() and (out / "eval.json").is_file():
        raise AlreadyFinished(out, step)
    return changes


def start(cfg, out: Path, changes: tuple, step: int, primary: bool) -> None:
    """Create the run directory (write probe per process), write config.yaml, record changes."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        import jax
        probe = out / f".write_probe{jax.process_index()}"  # processes may share out_dir
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise RunDirError(f"run.out_dir: cannot write to {out} ({e.strerror}); choose a "
                          "writable directory with --set run.out_dir=DIR") from None
    if not primary:
        return
    tmp = out / ".config.yaml.partial"
    tmp.write_text(cfgmod.dump_yaml(cfg))
    os.replace(tmp, out / "config.yaml")
    if changes:
        record = {"step": step, "time": datetime.datetime.now().isoformat(timespec="seconds"),
                  "changes": [{"field": k, "old": a, "new": b} for k, a, b in changes]}
        with open(out / CHANGES_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"config changed at step {step} (--allow-config-change): {changes_text(changes)}"
              f"; recorded in {out / CHANGES_FILE}", file=sys.stderr)


class LazyStore:
    """A RolloutStore created on first use, so a run that fails before its first step leaves
    no ``rollouts/`` behind."""

    def __init__(self, path: Path, max_len: int):
        self.path, self.max_len, self._store = path, max_len, None

    def _get(self):
        if self._store is None:
            from mopd_jax.rollout_store import RolloutStore
            self._store = RolloutStore(self.path, max_len=self.max_len)
        return self._store

    def create(self) -> None:
        """Create the (empty) store now: the loop starts, so it exists even if no step keeps a
        rollout (readers such as offpolicy.source=store find an empty store, not none)."""
        self._get()

    def append(self, **kw):
        return self._get().append(**kw)

    def truncate_to_step(self, step: int) -> int:
        return self._get().truncate_to_step(step)

    def __getattr__(self, name):
        return getattr(self._get(), name)
