"""Training-run checkpoints: the whole train state plus JSON extras, saved async, resumed exactly.

A run directory holds one Orbax step directory per saved step: ``<step>/state`` (the array
pytree: params, optimizer state, counters, device RNG keys) and ``<step>/extra`` (JSON: data
iterator state, host RNG state, the resolved config). ``save`` returns once the arrays are
copied off the device, so the next (donating) train step may run while the files are written.

``restore`` reads onto the shardings of a target, so a run saved on one mesh resumes on another.
A latest step that is partial or corrupt (no commit marker, truncated or missing array files,
bad JSON) falls back to the newest step that restores, with a one-line warning; the bad step is
renamed ``<step>.corrupt-<time>`` (kept for inspection) so the resumed run can write that step
again. ``GracefulStop`` turns SIGTERM/SIGINT into a flag the loop checks after each step.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

STATE, EXTRA, HOST = "state", "extra", "host"  # host: optional numpy arrays (in-flight rollouts)
# Files a finalized step holds (orbax 0.12 writes commit_success.txt in both atomicity modes,
# before the rename on local disks; a bare or half-copied step directory lacks them).
_REQUIRED = ("commit_success.txt", "_CHECKPOINT_METADATA", f"{STATE}/_METADATA",
             f"{EXTRA}/metadata")


class RunCheckpointError(ValueError):
    """A run checkpoint directory is missing, or holds no step that restores onto the target."""


class _Corrupt(Exception):
    """One step directory is partial or corrupt (internal: triggers the fallback)."""


def abstract_like(state):
    """Pytree of ``jax.ShapeDtypeStruct`` with the live ``state``'s shapes, dtypes, shardings."""
    def one(path, x):
        if not isinstance(x, jax.Array):
            raise TypeError(f"state{jax.tree_util.keystr(path)}: {type(x).__name__} is not a "
                            "jax.Array; put it on device (jax.device_put) or into `extra`")
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return jax.tree_util.tree_map_with_path(one, state)


def _as_path(directory) -> epath.Path:
    s = os.fspath(directory)
    return epath.Path(s if "://" in s else os.path.abspath(s))


def _one_line(e: BaseException, limit: int = 160) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:limit]}{'...' if len(msg) > limit else ''}"


def _all_processes(ok: bool) -> bool:
    """``ok`` on every process (all hosts must agree on the step they resume from)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _flat(tree) -> dict:
    """{'a/b/0': leaf} with keys normalised the way orbax stores them (all strings)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_key_name(k) for k in path): leaf for path, leaf in leaves}


def _check_target(target):
    """Arrays become ShapeDtypeStructs; every leaf must carry a sharding that fits its shape."""
    def one(path, x):
        if isinstance(x, jax.Array):
            x = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        where = f"restore target{jax.tree_util.keystr(path)}"
        if not isinstance(x, jax.ShapeDtypeStruct) or x.sharding is None:
            raise RunCheckpointError(
                f"{where}: needs a jax.ShapeDtypeStruct with a sharding, got "
                f"{type(x).__name__}; build the target with abstract_like(state) or "
                "jax.ShapeDtypeStruct(shape, dtype, sharding=...)")
        try:
            x.sharding.shard_shape(x.shape)
        except ValueError as e:
            raise RunCheckpointError(f"{where}: sharding {x.sharding} does not fit shape "
                                     f"{x.shape} ({e})") from None
        return x
    return jax.tree_util.tree_map_with_path(one, target)


def _layer_layout(tree) -> str | None:
    """'scanned' (a ``blocks`` stack), 'unrolled' (``layers``) or None (no model in it)."""
    parts = {p for k in _flat(tree) for p in k.split("/")}
    return "scanned" if "blocks" in parts else "unrolled" if "layers" in parts else None


def _mismatch(saved_meta, target) -> str | None:
    """How the saved tree differs from the target (paths, shapes, dtypes), or None."""
    saved, want = _flat(saved_meta), _flat(target)
    missing, extra = sorted(want.keys() - saved.keys()), sorted(saved.keys() - want.keys())
    if missing or extra:
        return (f"target leaves not in the checkpoint: {missing[:3]}; checkpoint leaves not in "
                f"the target: {extra[:3]}")
    for k in sorted(want):
        s, w = saved[k], want[k]
        if jax.dtypes.issubdtype(w.dtype, jax.dtypes.prng_key):  # stored as its key data
            w = jax.eval_shape(jax.random.key_data, w)
        if tuple(s.shape) != tuple(w.shape) or str(s.dtype) != str(w.dtype):
            return f"{k}: saved {s.dtype}{list(s.shape)}, target {w.dtype}{list(w.shape)}"
    return None


class RunCheckpointer:
    """Async Orbax checkpoints of a run (train state + JSON extra) under one directory.

    Nothing is created on disk until the first ``save``. Use as a context manager, or call
    ``close()``, so the last async save finishes before the process exits.
    """

    def __init__(self, directory, *, max_to_keep: int | None = 3, async_save: bool = True):
        if max_to_keep is not None and max_to_keep < 1:
            raise RunCheckpointError(f"max_to_keep: must be >= 1 (or None to keep every "
                                     f"step), got {max_to_keep}")
        self.directory = _as_path(directory)
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True)
        self._mngr: ocp.CheckpointManager | None = None

    def _manager(self, create: bool) -> ocp.CheckpointManager | None:
        if self._mngr is None:
            if not create and not self.directory.exists():
                return None
            # Handlers named up front: a manager that has not saved yet can read metadata.
            self._mngr = ocp.CheckpointManager(
                self.directory, options=self._options,
                item_handlers={STATE: ocp.StandardCheckpointHandler(),
                               EXTRA: ocp.JsonCheckpointHandler(),
                               HOST: ocp.StandardCheckpointHandler()})
        return self._mngr

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    # ------------------------------------------------------------------------------- save
    def save(self, step: int, state, extra: dict | None = None, *, force: bool = False,
             host: dict | None = None) -> bool:
        """Start saving ``state`` and ``extra`` (and ``host``, a pytree of numpy arrays, when
        given: ``restore_host`` reads it) as ``step``; True if a save was started.

        Returns once device arrays are copied to host (async). A step not after the latest
        saved one is skipped unless ``force``; an existing step is never overwritten (False).
        ``extra`` is snapshotted now, so the caller may mutate it while the write runs.
        """
        step = int(step)
        try:
            extra = json.loads(json.dumps({} if extra is None else extra))
        except (TypeError, ValueError) as e:
            raise RunCheckpointError(f"save step {step}: extra is not JSON-serializable "
                                     f"({e}); convert numpy values with .tolist() or int()"
                                     ) from None
        mngr = self._manager(create=True)
        if step in mngr.all_steps():
            return False
        items = {STATE: ocp.args.StandardSave(state), EXTRA: ocp.args.JsonSave(extra)}
        if host:
            items[HOST] = ocp.args.StandardSave(host)
        return mngr.save(step, force=force, args=ocp.args.Composite(**items))

    def restore_host(self, step: int) -> dict | None:
        """The ``host`` arrays saved with ``step`` (numpy), or None if it has none."""
        if not (self.step_dir(step) / HOST).exists():
            return None
        mngr = self._manager(create=False)
        try:
            return mngr.restore(step, args=ocp.args.Composite(
                **{HOST: ocp.args.StandardRestore()}))[HOST]
        except Exception as e:  # tensorstore / orbax errors alike mean damaged files
            raise RunCheckpointError(f"{self.step_dir(step) / HOST}: corrupt or partial "
                                     f"({_one_line(e)}); resume from another step or start "
                                     "over") from None

    def wait(self) -> None:
        """Block until the in-flight async save (if any) is committed."""
        if self._mngr is not None:
            self._mngr.wait_until_finished()

    def close(self) -> None:
        if self._mngr is not None:
            self._mngr.close()
            self._mngr = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---------------------------------------------------------------------------- listing
    def all_steps(self) -> list[int]:
        """Saved steps whose directory carries orbax's commit marker, ascending."""
        mngr = self._manager(create=False)
        if mngr is None:
            return []
        return sorted(s for s in mngr.all_steps()
                      if (self.step_dir(s) / _REQUIRED[0]).exists())

    def latest_step(self) -> int | None:
        """Newest committed step (``restore`` may still fall back if its files are damaged)."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    # ---------------------------------------------------------------------------- restore
    def restore(self, target, step: int | None = None):
        """``(step, state, extra)`` restored onto ``target``'s shardings.

        ``target``: pytree of ``jax.ShapeDtypeStruct(shape, dtype, sharding=...)`` (see
        ``abstract_like``) or of live arrays, on any mesh. ``step=None`` takes the newest step
        that restores; an explicit ``step`` that is damaged raises instead of falling back.
        """
        if not self.directory.is_dir():
            raise RunCheckpointError(
                f"{self.directory}: no such run checkpoint directory; check the path, or start "
                "the run from scratch instead of resuming")
        target = _check_target(target)
        mngr = self._manager(create=False)
        mngr.wait_until_finished()
        mngr.reload()
        steps = sorted(mngr.all_steps(), reverse=True)
        if step is not None:
            if step not in steps:
                raise RunCheckpointError(f"{self.directory}: has no step {step}; saved steps: "
                                         f"{sorted(steps)}")
            try:
                return (step, *self._restore_step(mngr, step, target))
            except _Corrupt as e:
                raise RunCheckpointError(f"{self.step_dir(step)}: corrupt or partial ({e}); "
                                         "restore another step or omit step= to take the "
                                         "newest good one") from None
        if not steps:
            raise RunCheckpointError(f"{self.directory}: holds no checkpoints; start the run "
                                     "from scratch instead of resuming")
        bad = []
        for s in steps:
            try:
                state, extra = self._restore_step(mngr, s, target)
                ok, reason = True, ""
            except _Corrupt as e:
                ok, reason = False, str(e)
            if not _all_processes(ok):
                bad.append((s, reason or "failed to restore on another process"))
                continue
            self._set_aside(mngr, bad, s)
            return s, state, extra
        raise RunCheckpointError(
            f"{self.directory}: no step restores, all are corrupt or partial ("
            + "; ".join(f"step {s}: {r}" for s, r in bad)
            + "); restore from a copy of the run or start from scratch")

    def _restore_step(self, mngr, step: int, target):
        path = self.step_dir(step)
        missing = [name for name in _REQUIRED if not (path / name).exists()]
        if missing:
            raise _Corrupt(f"missing {', '.join(missing)}")
        try:
            saved_meta = mngr.item_metadata(step)[STATE]
        except Exception as e:  # orbax raises many types for unreadable metadata
            raise _Corrupt(f"unreadable metadata: {_one_line(e)}") from None
        diff = _mismatch(saved_meta, target)
        layout = _layer_layout(saved_meta), _layer_layout(target)
        if diff is not None and None not in layout and layout[0] != layout[1]:
            raise RunCheckpointError(
                f"{path}: saved with the layers {layout[0]} but this config runs them "
                f"{layout[1]}; resume with --set model.scan_layers="
                f"{'true' if layout[0] == 'scanned' else 'false'}")
        if diff is not None:
            raise RunCheckpointError(
                f"{path}: the saved state does not match the restore target ({diff}); the model "
                "or optimizer config changed since it was saved: resume with the run's "
                f"original config (in {path / EXTRA}) or use a new run directory")
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(
                **{STATE: ocp.args.StandardRestore(target), EXTRA: ocp.args.JsonRestore()}))
        except Exception as e:  # tensorstore / json / orbax errors alike mean damaged files
            raise _Corrupt(_one_line(e)) from None
        if not isinstance(restored[EXTRA], dict):
            raise _Corrupt(f"extra is {type(restored[EXTRA]).__name__}, not a JSON object")
        return restored[STATE], restored[EXTRA]

    def _set_aside(self, mngr, bad, restored_step: int) -> None:
        """Rename damaged newer steps out of orbax's view (so they can be saved again), warn."""
        if not bad:
            return
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for s, reason in bad:
            src = self.step_dir(s)
            dst = src.parent / f"{src.name}.corrupt-{stamp}"
            note = f"moved it to {dst.name}"
            if jax.process_index() == 0:
                try:
                    src.rename(dst)
                except OSError as e:
                    note = (f"could not move it aside ({_one_line(e, 80)}); delete it before "
                            f"the run reaches step {s} again")
            print(f"warning: run checkpoint {src} is corrupt or partial ({reason}); restored "
                  f"the previous good step {restored_step} instead and {note}",
                  file=sys.stderr, flush=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("mopd_run_checkpoint_set_aside")
        mngr.reload()


_LAST_SIGNAL = [signal.SIGINT]


def last_signal() -> int:
    """The signal that last stopped a run (SIGINT when none did): the CLI exits 128 + it."""
    return int(_LAST_SIGNAL[0])


class GracefulStop:
    """SIGTERM/SIGINT set ``requested`` instead of killing the run; handlers restored on exit.

    The loop checks ``requested`` after each step, then saves (force), waits for the save and
    returns. A second SIGINT restores the previous handler and raises KeyboardInterrupt (abort
    now). Outside the main thread Python cannot install handlers: it is then a plain flag.
    Multi-host: signals may reach hosts at different steps; branch on ``requested_anywhere()``
    so every process stops, and saves, at the same step.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.requested = False
        self.signal: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            previous = self._previous.pop(signal.SIGINT, None)
            signal.signal(signal.SIGINT, signal.default_int_handler if previous is None
                          else previous)
            raise KeyboardInterrupt
        self.requested, self.signal = True, signum
        _LAST_SIGNAL[0] = signum
        hint = "; press Ctrl-C again to abort now" if signal.SIGINT in self.signals else ""
        # os.write, not print: a handler may interrupt a print to the same stream.
        os.write(2, (f"received {signal.Signals(signum).name}: stopping after this step "
                     f"(checkpoint, then exit){hint}\n").encode())

    def requested_anywhere(self) -> bool:
        """``requested`` on any process; a collective, so call it at the same point on all."""
        return not _all_processes(not self.requested)
