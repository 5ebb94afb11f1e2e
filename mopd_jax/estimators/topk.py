"""Estimator B: reverse KL over the teacher's top-k ids, with the tail correction."""

from __future__ import annotations

import jax.numpy as jnp

from mopd_jax.chunked import (PAD_LOGIT, chunked_token_logprobs, chunked_topk, entropy_term,
                              gather_term, topk_kl_term, vocab_reduce)
from mopd_jax.estimators.base import (Estimator, TeacherScores, band, chunk_kw, finish, register,
                                      sg, tempered)


@register
class TeacherTopK(Estimator):
    name = "B"
    needs = ("logp_BT", "topk_ids_BTk", "topk_logp_BTk")
    summary = "teacher top-k reverse KL with the tail correction"

    def score(self, cfg, teacher_h_BTD, teacher_w_DV, tokens_BT):
        kw = dict(temperature=cfg.teacher_temperature, **chunk_kw(cfg))
        logp_BT = chunked_token_logprobs(teacher_h_BTD, teacher_w_DV, tokens_BT, **kw)
        ids_BTk, logp_BTk = chunked_topk(teacher_h_BTD, teacher_w_DV, cfg.topk, **kw)
        return TeacherScores(logp_BT=logp_BT, topk_ids_BTk=ids_BTk, topk_logp_BTk=logp_BTk)

    def loss(self, cfg, student_h_BTD, student_w_DV, teacher, batch):
        B, T, _ = student_h_BTD.shape
        h_ND = tempered(cfg, student_h_BTD).reshape(B * T, -1)

        def fn(t, aux):
            tok, ids, tlogp = aux
            return topk_kl_term(t, ids, tlogp), entropy_term(t), gather_term(t, tok)[0][:, 0]

        # A -inf teacher log-prob (a padded top-k slot) would turn 0 * inf into NaN gradients.
        t_logp_Nk = jnp.maximum(teacher.topk_logp_BTk.astype(jnp.float32), PAD_LOGIT)
        aux = (batch.tokens_BT.reshape(B * T, 1), teacher.topk_ids_BTk.reshape(B * T, -1),
               t_logp_Nk.reshape(B * T, -1))
        loss_N, ent_N, lp_N = vocab_reduce(fn, h_ND, student_w_DV, aux, **chunk_kw(cfg))[1]
        loss_BT, lp_BT = loss_N.reshape(B, T), sg(lp_N.reshape(B, T))
        log_ratio_BT = sg(teacher.logp_BT.astype(jnp.float32)) - lp_BT
        _, inside_BT = band(lp_BT, batch.sampler_logp_BT, cfg)
        return finish(cfg, batch, loss_BT, jnp.ones_like(loss_BT), log_ratio_BT,
                      jnp.clip(log_ratio_BT, -cfg.a_max, cfg.a_max), inside_BT,
                      ent_N.reshape(B, T), -log_ratio_BT)
