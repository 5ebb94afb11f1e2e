"""Teacher pool: hard per-sample routing by domain and batched teacher scoring.

Every rollout goes to the teacher of its prompt's domain (no averaging). A domain without a
teacher goes to ``fallback`` when one is set, else it is an error. ``'self'`` names the frozen
initial student (pi_0), MiMo's anti-regression anchor. Teachers share the student's graph, so
one compiled ``score_step`` serves all of them; rows are grouped per teacher and padded to a
power-of-two row bucket so a handful of shapes cover every batch.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Mapping

import jax
import numpy as np

from mopd_jax import sharding as shd
from mopd_jax import estimators
from mopd_jax.estimators import DistillLossConfig, TeacherScores
from mopd_jax.steps import score_step

SELF = "self"
FOREIGN_KL = 0.1  # per-token KL above this at the start suggests a teacher of another origin


class TeacherError(ValueError):
    """A teacher is missing, incompatible with the student, or a domain has no teacher."""


@dataclasses.dataclass
class Teacher:
    name: str  # checkpoint path or 'self'
    graphdef: object
    params: object  # on the mesh ('resident') or numpy on the host ('host')
    vocab_size: int


def _source_kwargs(src: str) -> dict:
    return {"hf": src[3:]} if src.startswith("hf:") else {"checkpoint": src}


def load_teachers(routes: Mapping[str, str], fallback: str, *, student, mesh,
                  placement: str = "resident", student_tokenizer=None,
                  score_rows: int = 0) -> "TeacherPool":
    """Load every distinct teacher named in ``routes`` / ``fallback``; check vocabularies.

    ``student`` is ``(graphdef, params, cfg)`` of pi_0; 'self' reuses those params (frozen).
    """
    from pathlib import Path

    from mopd_jax.loading import load_model

    s_graphdef, s_params, s_cfg = student
    names = sorted(set(routes.values()) | ({fallback} if fallback else set()))
    teachers = {}
    for name in names:
        if name == SELF:  # pi_0 itself; onto the teachers' own devices when they have some
            on_mesh = mesh is None or next(iter(jax.tree.leaves(s_params))).sharding.device_set \
                == set(mesh.devices.flat)
            params = s_params if on_mesh else shd.reshard(s_params, mesh, "teacher")
            teachers[name] = Teacher(SELF, s_graphdef, params, s_cfg.vocab_size)
            continue
        path = name[3:] if name.startswith("hf:") else name
        if not Path(path).is_dir():
            domains = sorted(d for d, t in routes.items() if t == name) or ["fallback"]
            raise TeacherError(f"mopd.teachers: checkpoint {path!r} for {', '.join(domains)} not "
                               "found; train it first (recipe grpo) or fix the path")
        from models.config import RUNTIME_FIELDS  # run as the student runs (kernels, scan)
        runtime = {k: getattr(s_cfg, k) for k in RUNTIME_FIELDS}
        loaded = load_model(mesh=mesh, role="teacher", runtime=runtime, **_source_kwargs(name))
        if loaded.cfg.vocab_size != s_cfg.vocab_size:
            raise TeacherError(f"teacher {name}: vocabulary size {loaded.cfg.vocab_size} != "
                               f"student {s_cfg.vocab_size}; teachers and student must share a "
                               "tokenizer (same base model)")
        if (student_tokenizer is not None and loaded.tokenizer is not None
                and _fingerprint(loaded.tokenizer) != _fingerprint(student_tokenizer)):
            raise TeacherError(f"teacher {name}: its tokenizer differs from the student's; "
                               "teachers and student must share a tokenizer (same base model)")
        params = loaded.params
        if placement == "host":
            params = shd.to_host(params)  # whole on every host, also when sharded across hosts
        teachers[name] = Teacher(name, loaded.graphdef, params, loaded.cfg.vocab_size)
    return TeacherPool(dict(routes), fallback or None, teachers, mesh=mesh, placement=placement,
                       score_rows=score_rows)


def short_name(name: str) -> str:
    """A teacher's name for logs: 'self', or its run directory (``runs/x/teacher_add/model`` ->
    ``teacher_add``)."""
    from pathlib import Path
    if name == SELF:
        return SELF
    p = Path(name[3:] if name.startswith("hf:") else name)
    return p.parent.name if p.name == "model" and p.parent.name else p.name


def _fingerprint(tok) -> str:
    probe = "0123456789 abcdefghijklmnopqrstuvwxyz+=:-?.,"
    return repr(tok.encode(probe))


def _bucket(n: int, minimum: int = 8) -> int:
    b = minimum
    while b < n:
        b *= 2
    return b


class TeacherPool:
    """Domain -> teacher routing and scoring (see module docstring)."""

    def __init__(self, routes: dict[str, str], fallback: str | None,
                 teachers: dict[str, Teacher], *, mesh=None, placement: str = "resident",
                 score_rows: int = 0):
        self.routes, self.fallback, self.teachers = routes, fallback, teachers
        self.mesh, self.placement, self.score_rows = mesh, placement, score_rows

    def route(self, domains) -> list[str]:
        """The teacher name of each sample (hard routing by its domain)."""
        out = []
        for d in domains:
            t = self.routes.get(d, self.fallback)
            if t is None:
                raise TeacherError(f"domain {d!r} has no teacher and mopd.fallback is unset; add "
                                   f"mopd.teachers.{d}=CHECKPOINT or set mopd.fallback=self "
                                   f"(teachers exist for {sorted(self.routes)})")
            out.append(t)
        return out

    def _params_of(self, t: Teacher):
        if self.placement == "host" and t.name != SELF:
            return shd.reshard(t.params, self.mesh, "teacher") if self.mesh is not None \
                else jax.device_put(t.params)
        return t.params

    def score(self, tokens_BT: np.ndarray, domains, loss_cfg: DistillLossConfig,
              lengths=None) -> TeacherScores:
        """Teacher scores of every row from its own domain's teacher (numpy, targets t+1).

        Batched per teacher with buckets: its rows go in calls of ``score_rows`` rows
        (``mopd.score_rows``; 0 = one call of all its rows, padded to a power of two >= 8) and,
        when ``lengths`` (each row's prompt + response length) is given, its columns are cut
        to a power of two (>= 16) covering its longest row, so short rollouts are not scored
        at the full row width and only one compiled shape per length bucket exists.
        Positions past a row's length hold zeros (they are masked in every loss).
        Fields the estimator marks ``stacked`` (C's ``w``) come stacked per teacher [M, ...]
        with ``teacher_index_B`` naming each row's teacher; C's teacher hidden states stay on
        device (sharded like the batch), the small per-token fields come to the host.
        """
        names = self.route(domains)
        B, T = tokens_BT.shape
        order = sorted(set(names))
        stacked = estimators.get(loss_cfg.estimator).stacked  # one per teacher, not per row
        parts: dict[str, object] = {}
        per_teacher: dict[str, list] = {f: [] for f in stacked}
        for name in order:
            t = self.teachers[name]
            rows = np.asarray([i for i, n in enumerate(names) if n == name])
            width = T if lengths is None else min(T, _bucket(int(np.max(lengths[rows])), 16))
            params = self._params_of(t)
            chunk = self.score_rows or _bucket(len(rows))
            for c0 in range(0, len(rows), chunk):
                part = rows[c0:c0 + chunk]
                padded = np.zeros((chunk, width), tokens_BT.dtype)
                padded[:len(part)] = tokens_BT[part, :width]
                out = score_step(t.graphdef, params, padded, loss_cfg=loss_cfg, mesh=self.mesh)
                for field, value in out._asdict().items():
                    if field in stacked:
                        if c0 == 0:
                            per_teacher[field].append(value)
                        continue
                    if value is None or field == "teacher_index_B":
                        continue
                    full = (B, value.shape[1] + T - width, *value.shape[2:])  # T or T-1
                    if field == "hidden_BTD":  # [B, T, D]: stays on device
                        buf = parts.get(field)
                        if buf is None:
                            buf = jax.numpy.zeros(full, value.dtype)
                            if self.mesh is not None:
                                buf = jax.device_put(buf, shd.batch_sharding(self.mesh, 3,
                                                                             "teacher"))
                        parts[field] = buf.at[part, :value.shape[1]].set(value[:len(part)])
                        continue
                    value = shd.to_host(value)
                    buf = parts.setdefault(field, np.zeros(full, value.dtype))
                    buf[part, :value.shape[1]] = value[:len(part)]
        scores = TeacherScores(**parts)
        if stacked:
            import jax.numpy as jnp
            index = np.asarray([order.index(n) for n in names], np.int32)
            scores = scores._replace(teacher_index_B=index,
                                     **{f: jnp.stack(v) for f, v in per_teacher.items()})
        return scores

    @staticmethod
    def log_initial_kl(kl_by_teacher: Mapping[str, float], record: dict[str, float]) -> None:
        """Record each teacher's first-step per-token KL in ``record`` (the run's loop state,
        checkpointed); warn when it looks foreign."""
        for name, kl in kl_by_teacher.items():
            if name in record:
                continue
            record[name] = kl
            if kl > FOREIGN_KL:
                print(f"warning: teacher {name}: initial per-token KL to the student is {kl:.3f} "
                      f"(> {FOREIGN_KL}); teachers from another base model break MOPD (paper: "
                      "0.04 healthy, 0.19 broken)", file=sys.stderr)
