"""MOPD estimators as objects (see ``base``): A sampled-token, B teacher top-k, C exact KL.

``get(name)`` is the object; ``distill_loss`` / ``score_teacher`` ask it. To add one: a file
in this package that defines an ``@register``-ed ``Estimator`` and its import line below.
"""

from mopd_jax.estimators import exact, sampled, topk  # noqa: F401  (registration)
from mopd_jax.estimators import gkd  # noqa: F401
from mopd_jax.estimators.base import (REGISTRY, DistillBatch, DistillLossConfig, Estimator,
                                      EstimatorKnobs, TeacherScores)
from mopd_jax.estimators.sampled import pg_distill_loss

NAMES = tuple(REGISTRY)


def get(name: str) -> Estimator:
    if name not in REGISTRY:
        raise ValueError(f"estimator {name!r} is not one of {sorted(REGISTRY)}")
    return REGISTRY[name]


def score_teacher(cfg: DistillLossConfig, teacher_h_BTD, teacher_w_DV, tokens_BT):
    """The ``TeacherScores`` cfg.estimator needs, from one teacher's final hidden states."""
    return get(cfg.estimator).score(cfg, teacher_h_BTD, teacher_w_DV, tokens_BT)


def distill_loss(cfg: DistillLossConfig, student_h_BTD, student_w_DV, teacher: TeacherScores,
                 batch: DistillBatch):
    """The configured MOPD estimator on one batch of student rollouts -> (loss, metrics).

    Differentiable w.r.t. student_h_BTD and student_w_DV (call it inside jax.grad); the teacher
    is a constant.
    """
    est = get(cfg.estimator)
    est.check(teacher)
    return est.loss(cfg, student_h_BTD, student_w_DV, teacher, batch)


__all__ = ["NAMES", "REGISTRY", "DistillBatch", "DistillLossConfig", "Estimator",
           "EstimatorKnobs", "TeacherScores", "distill_loss", "get", "pg_distill_loss",
           "score_teacher"]
