"""Append-only on-disk store of rollouts (zarr v3 via tensorstore), safe to read while training.

Layout of a store directory::

    meta.json        {"version", "max_len", "num_rows", "last_step", "domains"}
    tokens/          int32   [N, L]   prompt then response tokens, 0 after ``length``
    prompt_len/      int32   [N]
    length/          int32   [N]      prompt + response length
    sampler_logp/    float32 [N, L]   sampler log-prob of tokens[r, t] (0 off the response)
    teacher_logp/    float32 [N, L]   teacher log-prob (NaN where absent)
    reward/          float32 [N]      (NaN where absent)
    step/            int32   [N]      non-decreasing
    domain_id/       int32   [N]      index into meta.json's ``domains``
    version/         int32   [N]      policy version that sampled the row (-1: not given;
                                      async MOPD trains step s on versions >= s - k)

Optional (written when ``append`` gets ``expert_ids``, e.g. ``run.store_routing``)::

    expert_ids/      uint8/int16 [N, L, L_moe * k]  the sampler's experts per token and MoE
                                      layer (router replay's record); meta.json's ``routing``
                                      holds [L_moe, k] and the dtype; read as [N, L, L_moe, k]

``meta.json`` is the only source of truth for how many rows exist. ``append`` writes the data
rows first and then replaces ``meta.json`` atomically, so a reader (which reads the count
first) never sees a partly-written row, and rows a crashed writer left beyond the count are
ignored and later overwritten. The domain names live in ``meta.json`` too, so they are
published together with the rows that use them. One writer per store.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import tensorstore as ts

_VERSION = 1
# name -> (dtype, is_2d, fill). Fill is what padding and rows never written read as.
_ARRAYS = {
    "tokens": ("int32", True, 0),
    "prompt_len": ("int32", False, 0),
    "length": ("int32", False, 0),
    "sampler_logp": ("float32", True, 0.0),
    "teacher_logp": ("float32", True, "NaN"),
    "reward": ("float32", False, "NaN"),
    "step": ("int32", False, 0),
    "domain_id": ("int32", False, 0),
    "version": ("int32", False, -1),
}
COLUMNS = ("tokens", "prompt_len", "length", "sampler_logp", "teacher_logp", "reward", "step",
           "domain", "version")
_CHUNK_BYTES = 4 << 20  # target bytes per [rows, L] chunk


class StoreError(ValueError):
    """A rollout store is missing, corrupt, or used inconsistently."""


def _chunk_rows(max_len: int) -> int:
    return int(max(1, min(1024, _CHUNK_BYTES // (4 * max_len))))


def _array_spec(path: Path, name: str, max_len: int | None = None) -> dict:
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / name)}}
    if max_len is not None:  # creating: give the metadata
        dtype, is_2d, fill = _ARRAYS[name]
        rows = _chunk_rows(max_len)
        spec["metadata"] = {
            "shape": [0, max_len] if is_2d else [0],
            "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {
                "chunk_shape": [rows, max_len] if is_2d else [rows]}},
            "fill_value": fill,
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                       {"name": "zstd", "configuration": {"level": 1}}],
        }
    return spec


def _routing_spec(path: Path, max_len: int | None = None, width: int = 0,
                  dtype: str = "uint8") -> dict:
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / "expert_ids")}}
    if max_len is not None:
        rows = max(1, min(1024, _CHUNK_BYTES // (max_len * width)))
        spec["metadata"] = {
            "shape": [0, max_len, width], "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {
                "chunk_shape": [rows, max_len, width]}},
            "fill_value": 0,
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                       {"name": "zstd", "configuration": {"level": 1}}],
        }
    return spec


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fit(a, shape, dtype, fill) -> np.ndarray:
    """Pad (with ``fill``) or truncate a [B, L'] array to [B, L]."""
    out = np.full(shape, fill, dtype)
    a = np.asarray(a, dtype)
    w = min(a.shape[1], shape[1])
    out[:, :w] = a[:, :w]
    return out


class RolloutStore:
    """One row per rollout, appended per training step; see the module docstring.

    ``mode``: ``"a"`` opens or creates, ``"w"`` creates afresh (deleting an existing store),
    ``"r"`` opens read-only (as ``RolloutStore.open``). Reopening in ``"a"`` mode continues
    after the last published row.
    """

    def __init__(self, path: str | Path, *, max_len: int | None = None, mode: str = "a"):
        if mode not in ("a", "w", "r"):
            raise StoreError(f"RolloutStore {path}: mode must be 'a', 'w' or 'r', got {mode!r}")
        self.path = Path(path)
        self.mode = mode
        self._meta_path = self.path / "meta.json"
        self._arrays: dict[str, ts.TensorStore] = {}
        if mode == "r" or (mode == "a" and self._meta_path.exists()):
            self._meta = self._load_meta()
            if max_len is not None and max_len != self._meta["max_len"]:
                raise StoreError(f"rollout store {self.path}: has max_len="
                                 f"{self._meta['max_len']}, asked for {max_len}; use the same "
                                 "max_len or a new store path")
            return
        if max_len is None or max_len < 1:
            raise StoreError(f"rollout store {self.path}: creating it needs max_len >= 1, "
                             f"got {max_len}")
        # No published rows: any array data already here is garbage from a crash or an
        # earlier store, so create the arrays afresh.
        self.path.mkdir(parents=True, exist_ok=True)
        self._meta_path.unlink(missing_ok=True)
        try:
            for name in _ARRAYS:
                self._arrays[name] = ts.open(_array_spec(self.path, name, max_len), create=True,
                                             delete_existing=True).result()
        except ValueError as e:
            raise StoreError(f"rollout store {self.path}: cannot create arrays: {e}") from e
        self._meta = {"version": _VERSION, "max_len": int(max_len), "num_rows": 0,
                      "last_step": None, "domains": []}
        _write_json_atomic(self._meta_path, self._meta)

    @classmethod
    def open(cls, path: str | Path) -> "RolloutStore":
        """Open an existing store read-only (safe while a writer appends)."""
        return cls(path, mode="r")

    # -- metadata ---------------------------------------------------------------------------

    def _load_meta(self) -> dict:
        if not self._meta_path.exists():
            raise StoreError(f"no rollout store at {self.path} ({self._meta_path.name} "
                             "missing); check the path, or create one with mode='a'")
        try:
            meta = json.loads(self._meta_path.read_text())
            ok = (meta.get("version") == _VERSION and isinstance(meta.get("max_len"), int)
                  and isinstance(meta.get("num_rows"), int) and meta["num_rows"] >= 0
                  and isinstance(meta.get("domains"), list))
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise StoreError(f"rollout store {self.path}: corrupt {self._meta_path.name}: "
                             f"{e}") from e
        if not ok:
            raise StoreError(f"rollout store {self.path}: corrupt {self._meta_path.name} "
                             f"(missing or bad version/max_len/num_rows/domains): {meta!r:.200}")
        return meta

    def _refresh(self) -> dict:
        if self.mode == "r":  # the writer is another process: re-read what it published
            self._meta = self._load_meta()
        return self._meta

    @property
    def max_len(self) -> int:
        return self._meta["max_len"]

    @property
    def num_rows(self) -> int:
        """Number of published (fully written) rows."""
        return self._refresh()["num_rows"]

    @property
    def domains(self) -> list[str]:
        """Domain names in id order."""
        return list(self._refresh()["domains"])

    def __len__(self) -> int:
        return self.num_rows

    def _array(self, name: str, rows: int) -> ts.TensorStore:
        """The array, reopened when a writer has grown it past our cached shape."""
        a = self._arrays.get(name)
        if a is None or a.shape[0] < rows:
            try:
                spec = (_routing_spec(self.path) if name == "expert_ids"
                        else _array_spec(self.path, name))
                a = ts.open(spec, open=True).result()
            except ValueError as e:
                raise StoreError(f"rollout store {self.path}: cannot open array {name!r}: "
                                 f"{e}") from e
            if a.shape[0] < rows:
                raise StoreError(f"rollout store {self.path}: array {name!r} has "
                                 f"{a.shape[0]} rows but meta.json publishes {rows}")
            self._arrays[name] = a
        return a

    # -- writing ----------------------------------------------------------------------------

    def append(self, step: int, tokens, prompt_len, length, sampler_logp, teacher_logp=None,
               reward=None, domains: Sequence[str] | None = None, version=None,
               expert_ids=None) -> None:
        """Append B rollouts of training step ``step`` and publish them.

        Per-token arrays are [B, L'] and are padded or truncated to ``max_len``; lengths are
        clipped to it. ``teacher_logp`` / ``reward`` default to NaN, ``domains`` to "default".
        Steps must not decrease: to rewrite history call ``truncate_to_step`` first.
        """
        if self.mode == "r":
            raise StoreError(f"rollout store {self.path}: opened read-only")
        tokens = np.asarray(tokens)
        if tokens.ndim != 2:
            raise StoreError(f"append: tokens must be [B, L], got shape {tokens.shape}")
        B, L = tokens.shape[0], self.max_len
        last = self._meta["last_step"]
        if last is not None and step < last:
            raise StoreError(f"rollout store {self.path}: append step {step} < last stored "
                             f"step {last}; call truncate_to_step({step - 1}) when resuming")
        domains = ["default"] * B if domains is None else [str(d) for d in domains]
        if len(domains) != B:
            raise StoreError(f"append: {len(domains)} domains for {B} rollouts")

        def vec(x, dtype, fill):
            v = np.full((B,), fill, dtype) if x is None else np.asarray(x, dtype).reshape(-1)
            if v.shape != (B,):
                raise StoreError(f"append: expected {B} values, got shape {np.shape(x)}")
            return v

        names = list(self._meta["domains"])
        ids = []
        for d in domains:
            if d not in names:
                names.append(d)
            ids.append(names.index(d))
        rows = {
            "tokens": _fit(tokens, (B, L), np.int32, 0),
            "prompt_len": np.minimum(vec(prompt_len, np.int32, 0), L),
            "length": np.minimum(vec(length, np.int32, 0), L),
            "sampler_logp": _fit(sampler_logp, (B, L), np.float32, 0.0),
            "teacher_logp": (np.full((B, L), np.nan, np.float32) if teacher_logp is None
                             else _fit(teacher_logp, (B, L), np.float32, np.nan)),
            "reward": vec(reward, np.float32, np.nan),
            "step": np.full((B,), step, np.int32),
            "domain_id": np.asarray(ids, np.int32),
            "version": vec(version, np.int32, -1),
        }
        meta = dict(self._meta)
        if expert_ids is not None or meta.get("routing"):
            rows["expert_ids"] = self._routing_rows(expert_ids, B, L, meta)
        start = self._meta["num_rows"]
        self._write_rows(start, rows)
        self._publish({**meta, "num_rows": start + B, "last_step": int(step),
                       "domains": names})

    def _routing_rows(self, expert_ids, B: int, L: int, meta: dict) -> np.ndarray:
        """[B, L, L_moe * k] rows of the routing array (created on first use; zeros for a
        batch without routing once the store has it)."""
        if expert_ids is not None:
            e = np.asarray(expert_ids)
            if e.ndim != 4 or e.shape[0] != B:
                raise StoreError(f"append: expert_ids must be [B={B}, L, L_moe, k], got "
                                 f"shape {e.shape}")
            shape, dtype = list(e.shape[2:]), str(e.dtype)
            if meta.get("routing") is None:
                if self._meta["num_rows"]:
                    raise StoreError(f"rollout store {self.path}: routing arrives after "
                                     "rows without it; store routing from the first step "
                                     "(run.store_routing) or not at all")
                self._arrays["expert_ids"] = ts.open(
                    _routing_spec(self.path, L, int(np.prod(shape)), dtype), create=True,
                    delete_existing=True).result()
                meta["routing"] = {"shape": shape, "dtype": dtype}
            elif meta["routing"]["shape"] != shape:
                raise StoreError(f"append: expert_ids [L_moe, k] = {shape}, the store holds "
                                 f"{meta['routing']['shape']}")
            flat = e.reshape(B, e.shape[1], -1)
        else:
            flat = np.zeros((B, 0, int(np.prod(meta["routing"]["shape"]))), np.uint8)
        out = np.zeros((B, L, flat.shape[2]), meta["routing"]["dtype"])
        w = min(L, flat.shape[1])
        out[:, :w] = flat[:, :w]
        return out

    def append_rollouts(self, step: int, batch, *, teacher_logp=None, reward=None) -> None:
        """Append a ``sampling.rollout.RolloutBatch`` (its tokens, lengths, logprobs, domain)."""
        self.append(step, batch.tokens, batch.prompt_lengths, batch.lengths, batch.logprobs,
                    teacher_logp, reward, batch.domain)

    def _write_rows(self, start: int, rows: dict[str, np.ndarray]) -> None:
        """Write rows [start, start + B) without publishing them (a reader cannot see them)."""
        stop = start + len(next(iter(rows.values())))
        futures = []
        for name, value in rows.items():
            a = self._arrays[name] if name in self._arrays else self._array(name, 0)
            # (``_array`` opens any array by name, the optional routing one included)
            if a.shape[0] < stop:
                a = a.resize(exclusive_max=[stop] + [None] * (a.rank - 1),
                             expand_only=True).result()
                self._arrays[name] = a
            futures.append(a[start:stop].write(value))
        for f in futures:
            f.result()

    def _publish(self, meta: dict) -> None:
        _write_json_atomic(self._meta_path, meta)
        self._meta = meta

    def truncate_to_step(self, step: int) -> int:
        """Drop rows with step > ``step`` (resume from an earlier checkpoint); returns rows kept.

        Only the published count shrinks; the dropped rows are overwritten by later appends.
        """
        if self.mode == "r":
            raise StoreError(f"rollout store {self.path}: opened read-only")
        n = self._meta["num_rows"]
        steps = self._read("step", 0, n)
        keep = int(np.searchsorted(steps, step, side="right"))  # steps are non-decreasing
        last = int(steps[keep - 1]) if keep else None
        if keep != n:
            self._publish({**self._meta, "num_rows": keep, "last_step": last})
        return keep

    # -- reading ----------------------------------------------------------------------------

    def _read(self, name: str, start: int, stop: int) -> np.ndarray:
        return self._array(name, stop)[start:stop].read().result()

    def read(self, start: int = 0, stop: int | None = None, *,
             columns: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Rows [start, stop) of published rows as numpy arrays; ``domain`` holds the names.

        Keys (or just ``columns``): tokens, prompt_len, length, sampler_logp, teacher_logp,
        reward, step, domain, version, and expert_ids [N, L, L_moe, k] when the store has
        routing.
        """
        meta = self._refresh()
        routing = meta.get("routing")
        known = COLUMNS + (("expert_ids",) if routing else ())
        columns = list(known if columns is None else columns)
        if unknown := set(columns) - set(known):
            raise StoreError(f"read: unknown columns {sorted(unknown)}; known: {known}")
        n = meta["num_rows"]
        stop = n if stop is None else stop
        start, stop = max(0, min(start, n)), max(0, min(stop, n))
        stop = max(start, stop)
        out = {c: self._read(c, start, stop) for c in columns if c != "domain"}
        if "expert_ids" in out:
            out["expert_ids"] = out["expert_ids"].reshape(
                out["expert_ids"].shape[:2] + tuple(routing["shape"]))
        if "domain" not in columns:
            return out
        names = np.asarray(meta["domains"] or [""], dtype=str)
        ids = self._read("domain_id", start, stop)
        if ids.size and (ids.min() < 0 or ids.max() >= len(meta["domains"])):
            raise StoreError(f"rollout store {self.path}: domain ids out of range of "
                             f"meta.json domains {meta['domains']}")
        out["domain"] = names[ids]
        return out

    def steps(self) -> np.ndarray:
        """Distinct training steps that have rows, ascending."""
        return np.unique(self._read("step", 0, self.num_rows))
