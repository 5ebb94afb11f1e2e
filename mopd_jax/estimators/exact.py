"""Estimator C: the exact full-vocabulary reverse KL against the teacher's hidden states."""

from __future__ import annotations

import jax.numpy as jnp

from mopd_jax.chunked import (chunked_token_logprobs, entropy_term, gather_term,
                              reverse_kl_term, teacher_operand, vocab_reduce)
from mopd_jax.estimators.base import (Estimator, TeacherScores, band, chunk_kw, finish, register,
                                      sg, tempered)


def teacher_operand_of(teacher, batch):
    """The teacher side of a full-vocabulary pass: hidden states and the lm_head, [D, V] or
    stacked [M, D, V] and indexed per row (by ``teacher_index_B``, else the domain)."""
    index_B = teacher.teacher_index_B
    if teacher.w.ndim == 3 and index_B is None:
        index_B = batch.domain_ids_B
    return teacher_operand(teacher.hidden_BTD, teacher.w,
                           index_B if teacher.w.ndim == 3 else None)


@register
class ExactKL(Estimator):
    name = "C"
    needs = ("hidden_BTD", "w")
    stacked = ("w",)
    summary = "exact full-vocabulary reverse KL"

    def score(self, cfg, teacher_h_BTD, teacher_w_DV, tokens_BT):
        # The loss needs only the hidden states and head; the sampled tokens' log-probs (one
        # more chunked head pass) are for the logged KL to the teacher: the first-step
        # foreign-teacher check and the rollout store that `mopd inspect` reads.
        return TeacherScores(hidden_BTD=teacher_h_BTD, w=teacher_w_DV, logp_BT=(
            chunked_token_logprobs(teacher_h_BTD, teacher_w_DV, tokens_BT,
                                   temperature=cfg.teacher_temperature, **chunk_kw(cfg))))

    def loss(self, cfg, student_h_BTD, student_w_DV, teacher, batch):
        B, T, _ = student_h_BTD.shape
        h_ND = tempered(cfg, student_h_BTD).reshape(B * T, -1)

        def fn(t, tok):
            return (reverse_kl_term(t), entropy_term(t), gather_term(t, tok)[0][:, 0],
                    gather_term(t, tok, t.teacher_logp_nc)[0][:, 0])

        loss_N, ent_N, lp_N, t_lp_N = vocab_reduce(
            fn, h_ND, student_w_DV, batch.tokens_BT.reshape(B * T, 1),
            teacher_operand_of(teacher, batch), teacher_temperature=cfg.teacher_temperature,
            **chunk_kw(cfg))[1]
        loss_BT, lp_BT = loss_N.reshape(B, T), sg(lp_N.reshape(B, T))
        log_ratio_BT = sg(t_lp_N.reshape(B, T)) - lp_BT
        _, inside_BT = band(lp_BT, batch.sampler_logp_BT, cfg)
        return finish(cfg, batch, loss_BT, jnp.ones_like(loss_BT), log_ratio_BT,
                      jnp.clip(log_ratio_BT, -cfg.a_max, cfg.a_max), inside_BT,
                      ent_N.reshape(B, T), sg(loss_BT))
