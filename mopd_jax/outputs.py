"""Outputs no command may clobber: checks before any work, and directories written atomically.

Every verb that writes a model or a file names it up front: ``check_new_dir`` / ``check_new_file``
refuse, before anything is loaded or computed, an output that is one of the command's inputs,
an existing model, a non-empty directory or a file where a directory is wanted (and the reverse).
``atomic_dir`` writes a model directory into a hidden sibling and renames it into place, so an
interrupted write never leaves a half-made model under the real name; ``write_new_file`` does
the same for one file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from mopd_jax.errors import UsageError


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _inside(a: Path, b: Path) -> bool:
    """``a`` is ``b`` or lies below it."""
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


def _writable_parent(path: Path, flag: str, error=UsageError,
                     fix: str = "choose another path") -> None:
    """``path`` can be created: its nearest existing ancestor is a writable directory."""
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise error(f"{flag} {path}: {parent} is a file, not a directory; {fix}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise error(f"{flag} {path}: {parent} is not writable; {fix}")


def check_new_dir(path: str | os.PathLike, flag: str, inputs=()) -> Path:
    """``path`` may become a new model directory: not an input, not inside one, not a file,
    not an existing model, not a non-empty directory; its parent is writable."""
    path = Path(path)
    for src in inputs:
        src = Path(str(src)[3:] if str(src).startswith("hf:") else src)
        if not src.exists():
            continue
        model = src.is_dir() and any((src / f).is_file() for f in ("model.json", "config.json"))
        if _inside(src, path) or (model and _inside(path, src)):
            raise UsageError(f"{flag} {path}: is (or contains, or lies inside) the input {src}; "
                             "write to a new directory (inputs are never overwritten)")
    if path.is_file() or (path.exists() and not path.is_dir()):
        raise UsageError(f"{flag} {path}: is a file; give a new directory path")
    if path.is_dir():
        if (path / "model.json").is_file() or (path / "config.json").is_file():
            raise UsageError(f"{flag} {path}: already holds a model; remove it or choose "
                             "another directory (models are never overwritten)")
        if any(path.iterdir()):
            raise UsageError(f"{flag} {path}: exists and is not empty; remove it or choose "
                             "another directory")
    _writable_parent(path, flag)
    return path


def check_new_file(path: str | os.PathLike, flag: str, inputs=()) -> Path:
    """``path`` may become a new file: not an input, not an existing file or directory."""
    path = Path(path)
    for src in inputs:
        src = Path(str(src)[3:] if str(src).startswith("hf:") else src)
        if src.exists() and (_same(path, src) or (src.is_dir() and _inside(path, src)
                                                   and (src / "model.json").is_file())):
            raise UsageError(f"{flag} {path}: is the input {src}; write to a new file")
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a directory; give a file path, e.g. "
                         f"{path / 'scores.json'}")
    if path.exists():
        raise UsageError(f"{flag} {path}: already exists; remove it or choose another file "
                         "(files are never overwritten)")
    _writable_parent(path, flag)
    return path


def _partial(path: Path) -> Path:
    return path.parent / f".{path.name}.partial"


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, replace_own: bool = False, primary: bool = True,
               barrier=None):
    """Yield a hidden sibling of ``path`` to write into; on success rename it to ``path``.

    The sibling's name is the same on every process (multi-host writers share it); only the
    ``primary`` process renames, after ``barrier()``. ``replace_own``: ``path`` is this run's
    own earlier output and may be replaced (it is renamed away first, then deleted). On an
    error the partial directory is removed and nothing appears under ``path``.
    """
    path = Path(path).absolute()
    tmp = _partial(path)
    if primary and tmp.exists():
        shutil.rmtree(tmp)  # left by an interrupted earlier write of the same output
    if barrier is not None:
        barrier()
    try:
        yield tmp
        if barrier is not None:
            barrier()
    except BaseException:
        if primary:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if primary:
        old = None
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()  # an empty directory the user made for the output
        if path.exists():
            if not replace_own:
                shutil.rmtree(tmp, ignore_errors=True)
                raise UsageError(f"{path}: appeared while it was being written; nothing was "
                                 "overwritten (the new copy was discarded)")
            old = path.parent / f".{path.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
        os.rename(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    if barrier is not None:
        barrier()


def write_new_file(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to a hidden sibling, then link it into place (fails if ``path`` exists)."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.partial{os.getpid()}"
    tmp.write_text(text)
    try:
        os.link(tmp, path)  # atomic, and refuses an existing path
    except FileExistsError:
        raise UsageError(f"{path}: already exists; remove it or choose another file") from None
    except OSError:  # file systems without hard links
        if path.exists():
            raise UsageError(f"{path}: already exists; remove it or choose another file"
                             ) from None
        os.replace(tmp, path)
        return path
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
