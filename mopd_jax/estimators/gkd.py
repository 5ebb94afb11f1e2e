"""GKD divergences as MOPD estimators: the forward KL(teacher || student) ('FKL') and the
generalised Jensen-Shannon divergence at beta = 0.5 ('JSD'), both over the full vocabulary
from the teacher's hidden states (stacked per teacher like estimator C).

Metrics: ``kl`` is the divergence itself (the report's KL curves plot it), plus entropy,
resp_len, reward and grad_token_share.
"""

from __future__ import annotations

from mopd_jax.chunked import chunked_token_logprobs
from mopd_jax.estimators.base import Estimator, TeacherScores, chunk_kw, register
from mopd_jax.losses import gkd_loss


class _GKD(Estimator):
    needs = ("hidden_BTD", "w")
    stacked = ("w",)
    beta: float

    def score(self, cfg, teacher_h_BTD, teacher_w_DV, tokens_BT):
        # logp_BT only for the logged KL to the teacher (first-step check, rollout store)
        return TeacherScores(hidden_BTD=teacher_h_BTD, w=teacher_w_DV, logp_BT=(
            chunked_token_logprobs(teacher_h_BTD, teacher_w_DV, tokens_BT,
                                   temperature=cfg.teacher_temperature, **chunk_kw(cfg))))

    def loss(self, cfg, student_h_BTD, student_w_DV, teacher, batch):
        h, index_B = teacher.hidden_BTD, teacher.teacher_index_B
        if teacher.w.ndim == 3 and index_B is None:
            index_B = batch.domain_ids_B
        loss, metrics = gkd_loss(
            student_h_BTD, student_w_DV, h, teacher.w, batch.mask_BT,
            batch.domain_ids_B, beta=self.beta, num_domains=cfg.num_domains,
            teacher_index_B=index_B if teacher.w.ndim == 3 else None,
            aggregation=cfg.aggregation, temperature=cfg.teacher_temperature,
            **chunk_kw(cfg))
        metrics["kl"], metrics["kl/domain"] = metrics["divergence"], metrics["divergence/domain"]
        return loss, metrics


@register
class ForwardKL(_GKD):
    name = "FKL"
    beta = 0.0
    summary = "forward KL(teacher || student), full vocabulary (GKD beta = 0)"


@register
class JSD(_GKD):
    name = "JSD"
    beta = 0.5
    summary = "generalised JSD at beta = 0.5, full vocabulary (GKD)"
