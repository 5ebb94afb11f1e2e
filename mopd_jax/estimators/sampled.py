"""Estimator A: the sampled-token policy gradient (the paper's headline estimator)."""

from __future__ import annotations

import jax.numpy as jnp

from mopd_jax.chunked import chunked_token_logprobs, entropy_term, gather_term, vocab_reduce
from mopd_jax.estimators.base import (Estimator, TeacherScores, band, chunk_kw, finish, register,
                                      sg, tempered)


def pg_distill_loss(cfg, student_logp_BT, teacher_logp_BT, batch, *, entropy_BT=None,
                    alpha_B=None):
    """-sum c m w A_hat log pi_s(y), gradient only through student_logp_BT.

    A_hat = clip(sg[teacher - student], +-a_max) + alpha * A_orm (alpha_B defaults to
    cfg.orm_alpha of each sequence's domain; the term is added when the batch has A_orm), and
    w = sg[pi_s/mu] inside [is_low, is_high], else 0. With A_hat = teacher - student the
    expected gradient is E_y[(log pi_s - log pi_T)(y) grad log pi_s(y)] = grad KL(pi_s||pi_T).
    """
    lp_BT = student_logp_BT.astype(jnp.float32)
    log_ratio_BT = sg(teacher_logp_BT.astype(jnp.float32) - lp_BT)
    adv_BT = jnp.clip(log_ratio_BT, -cfg.a_max, cfg.a_max)
    if batch.orm_advantage_B is not None:
        alpha_B = cfg.alpha_M[batch.domain_ids_B] if alpha_B is None else alpha_B
        adv_BT = adv_BT + (alpha_B * batch.orm_advantage_B.astype(jnp.float32))[:, None]
    w_BT, inside_BT = band(lp_BT, batch.sampler_logp_BT, cfg)
    loss_BT = -(w_BT * adv_BT) * lp_BT
    return finish(cfg, batch, loss_BT, -(w_BT * adv_BT), log_ratio_BT, adv_BT, inside_BT,
                  entropy_BT, -log_ratio_BT)


@register
class SampledToken(Estimator):
    name = "A"
    needs = ("logp_BT",)
    summary = "sampled-token policy gradient with the IcePop mask"

    def score(self, cfg, teacher_h_BTD, teacher_w_DV, tokens_BT):
        return TeacherScores(logp_BT=chunked_token_logprobs(
            teacher_h_BTD, teacher_w_DV, tokens_BT, temperature=cfg.teacher_temperature,
            **chunk_kw(cfg)))

    def loss(self, cfg, student_h_BTD, student_w_DV, teacher, batch):
        B, T, _ = student_h_BTD.shape
        h_ND = tempered(cfg, student_h_BTD).reshape(B * T, -1)
        fn = lambda t, tok: (gather_term(t, tok)[0][:, 0], entropy_term(t))  # noqa: E731
        lp_N, ent_N = vocab_reduce(fn, h_ND, student_w_DV, batch.tokens_BT.reshape(B * T, 1),
                                   **chunk_kw(cfg))[1]
        return pg_distill_loss(cfg, lp_N.reshape(B, T), teacher.logp_BT, batch,
                               entropy_BT=ent_N.reshape(B, T))
