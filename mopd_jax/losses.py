"""Losses as pure array functions: the aggregation and metrics every loss shares, GKD
divergences, SFT and GRPO. The MOPD estimators (A, B, C, ...) are objects in
``mopd_jax.estimators`` built on ``aggregate`` here.

Shape suffixes follow the one glossary in ``models/config.py``. `tokens_BT[b, t]` is the token
that `h_BTD[b, t]` predicts (the caller shifts), and `mask_BT` is 1 on the response tokens that
train. Nothing here builds a [B, T, V] array: the vocabulary work goes through `chunked`.

Every loss returns (loss, metrics); metrics are stop-gradient fp32 arrays. Token metrics come as
a scalar `name` over all response tokens plus a [M] vector `name/domain`, with the same names
for every estimator:

  kl                reverse-KL estimate: mean of log pi_s(y) - log pi_T(y) at the sampled
                    tokens (A, B), the exact full-vocabulary value (C)
  abs_adv           mean |A_hat| (B, C: the clipped log-ratio A would use)
  is_masked_frac    fraction outside the IcePop band (only A masks them; B, C just report it)
  entropy           student entropy (from the estimator's own chunked pass, or `entropy_BT`)
  resp_len          response tokens per sequence
  grad_token_share  each domain's share of sum_t |c_t dl_t/dlog pi_s(y_t)| (c: aggregation
                    weight); B and C have no per-token scalar there and use |c_t|
  reward            outcome reward per sequence, when the batch carries one

plus `loss/domain` (additive per-domain parts of the loss) and `domain_scale/domain`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mopd_jax.chunked import entropy_term, gather_term, jsd_term, teacher_operand, vocab_reduce

AGGREGATIONS = ("seq_mean", "token_mean", "token_sum")
sg = jax.lax.stop_gradient


# ---------------------------------------------------------------------------------------------
# Aggregation, domain weights and metrics shared by every loss.


def token_weights(mask_BT, aggregation: str) -> jax.Array:
    """c_BT such that loss = sum c * l for 'seq_mean', 'token_mean' or 'token_sum'.

    Rows without a response token (GRPO's padding rows when dynamic sampling kept fewer
    groups than asked) are not sequences: they leave every denominator, so the loss and its
    gradient do not depend on how many there are. 'token_sum' divides by the constant
    (rows with a response) * T instead of any length: Dr. GRPO's aggregation.
    """
    m_BT = mask_BT.astype(jnp.float32)
    len_B1 = m_BT.sum(-1, keepdims=True)
    rows = jnp.maximum((len_B1 > 0).sum(), 1).astype(jnp.float32)
    if aggregation == "seq_mean":
        return m_BT / jnp.maximum(len_B1, 1.0) / rows
    if aggregation == "token_mean":
        return m_BT / jnp.maximum(m_BT.sum(), 1.0)
    if aggregation == "token_sum":
        return m_BT / (rows * m_BT.shape[-1])
    raise ValueError(f"aggregation {aggregation!r} not in {AGGREGATIONS}")


def loss_denominator(mask_BT, aggregation: str) -> jax.Array:
    """What ``token_weights`` divides by (rows with a response, tokens, or rows * T): it adds
    up over a batch's parts, so microbatch losses weighted by their share of it sum to the
    loss of the whole batch (``steps.make_train_step``)."""
    m_BT = mask_BT.astype(jnp.float32)
    rows = (m_BT.sum(-1) > 0).sum().astype(jnp.float32)
    if aggregation == "seq_mean":
        return rows
    if aggregation == "token_mean":
        return m_BT.sum()
    if aggregation == "token_sum":
        return rows * m_BT.shape[-1]
    raise ValueError(f"aggregation {aggregation!r} not in {AGGREGATIONS}")


def dn_rescale_weights(log_ratio_BT, mask_BT, domain_ids_B, num_domains, clip=(0.25, 4.0)):
    """DN-MOPD w_d = clip(sigma_all / sigma_d, *clip), sigma the std over response tokens.

    The log-ratio (teacher minus student at sampled tokens) is stop-gradient. A domain with no
    tokens gets 1; one with sigma_d = 0 gets the upper bound (or 1 if sigma_all is 0 too).
    """
    m_BT = mask_BT.astype(jnp.float32)
    r_BT = jnp.where(m_BT > 0, sg(log_ratio_BT).astype(jnp.float32), 0.0)
    onehot_BM = jax.nn.one_hot(domain_ids_B, num_domains)
    n_all, n_M = m_BT.sum(), m_BT.sum(-1) @ onehot_BM
    mean_all = (m_BT * r_BT).sum() / jnp.maximum(n_all, 1.0)
    var_all = (m_BT * (r_BT - mean_all) ** 2).sum() / jnp.maximum(n_all, 1.0)
    mean_M = ((m_BT * r_BT).sum(-1) @ onehot_BM) / jnp.maximum(n_M, 1.0)
    dev_BT = r_BT - (onehot_BM @ mean_M)[:, None]
    var_M = ((m_BT * dev_BT**2).sum(-1) @ onehot_BM) / jnp.maximum(n_M, 1.0)
    sigma_all, sigma_M = jnp.sqrt(var_all), jnp.sqrt(var_M)
    ratio_M = jnp.where(sigma_M > 0, sigma_all / jnp.where(sigma_M > 0, sigma_M, 1.0),
                        jnp.where(sigma_all > 0, clip[1], 1.0))
    return jnp.where(n_M > 0, jnp.clip(ratio_M, *clip), 1.0)


class PerToken(NamedTuple):
    """Per-token pieces a loss hands to the shared aggregation and metrics."""

    loss_BT: jax.Array  # l_t, differentiable
    grad_BT: jax.Array  # dl_t / dlog pi_s(y_t), for grad_token_share (1 where there is none)
    metrics_BT: dict  # name -> [B, T] values averaged over response tokens


def aggregate(per_token: PerToken, mask_BT, domain_ids_B, *, num_domains, aggregation,
              scale_M=None, seq_metrics_B=None):
    """loss = sum_bt c_bt * scale[d_b] * l_bt, with the per-domain metrics of the module doc.

    Without scale_M the loss ignores domain_ids_B, which then only sorts the metrics (ids
    outside [0, num_domains) are left out of the /domain vectors, never out of the loss).
    """
    M = num_domains
    if domain_ids_B is None:
        domain_ids_B = jnp.zeros(mask_BT.shape[:1], jnp.int32)
    c_BT = token_weights(mask_BT, aggregation)
    if scale_M is None:
        scale_M = jnp.ones((M,), jnp.float32)
    else:
        c_BT = c_BT * jnp.take(scale_M, domain_ids_B, mode="clip")[:, None]
    m_BT = mask_BT.astype(jnp.float32)
    on_BT = m_BT > 0  # `where`, not a product: non-response positions may hold inf or NaN

    def masked(x_BT):
        return jnp.where(on_BT, x_BT.astype(jnp.float32), 0.0)

    onehot_BM = jax.nn.one_hot(domain_ids_B, M)
    part_BT = c_BT * masked(per_token.loss_BT)
    g_M = jnp.abs(c_BT * masked(sg(per_token.grad_BT))).sum(-1) @ onehot_BM
    share_M = g_M / jnp.maximum(g_M.sum(), jnp.finfo(jnp.float32).tiny)
    metrics = {"loss/domain": part_BT.sum(-1) @ onehot_BM, "domain_scale/domain": scale_M,
               "grad_token_share": share_M.sum(), "grad_token_share/domain": share_M}

    n_M = m_BT.sum(-1) @ onehot_BM
    for name, x_BT in per_token.metrics_BT.items():
        s_B = masked(x_BT).sum(-1)
        metrics[name] = s_B.sum() / jnp.maximum(n_M.sum(), 1.0)
        metrics[name + "/domain"] = (s_B @ onehot_BM) / jnp.maximum(n_M, 1.0)
    # sequence metrics (length, reward) over rows with a response: padding rows are not
    # sequences and must not show up as a phantom domain with reward 0
    real_B = (m_BT.sum(-1) > 0).astype(jnp.float32)
    real_BM = onehot_BM * real_B[:, None]
    seqs_M = real_BM.sum(0)
    seq_metrics_B = {"resp_len": m_BT.sum(-1), **(seq_metrics_B or {})}
    for name, x_B in seq_metrics_B.items():
        if x_B is not None:
            x_B = jnp.where(real_B > 0, x_B.astype(jnp.float32), 0.0)
            metrics[name] = x_B.sum() / jnp.maximum(real_B.sum(), 1.0)
            metrics[name + "/domain"] = (x_B @ real_BM) / jnp.maximum(seqs_M, 1.0)
    return part_BT.sum(), jax.tree.map(sg, metrics)


# ---------------------------------------------------------------------------------------------
# GKD divergences and SFT, sharing the chunked machinery.


def gkd_loss(student_h_BTD, student_w_DV, teacher_h_BTD, teacher_w, mask_BT, domain_ids_B=None,
             *, beta: float, num_domains=1, teacher_index_B=None, aggregation="token_mean",
             temperature=1.0, vocab_chunk=8192, seq_chunk=1024):
    """Generalised JSD(beta) distillation (GKD): beta=0 KL(teacher||student), beta=1 reverse KL.

    Convention of the GKD paper and TRL, see `chunked.jsd_term`. teacher_w may be [M, D, V]
    routed by teacher_index_B. ``temperature`` T divides the student's *and* the teacher's
    logits (the distribution the rollouts were sampled from, MOPD.md).
    Metrics: divergence, entropy, resp_len, grad_token_share.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"gkd_loss: beta={beta} must be in [0, 1]")
    if not temperature > 0:
        raise ValueError(f"gkd_loss: temperature={temperature} must be > 0")
    B, T, _ = student_h_BTD.shape
    h_ND = student_h_BTD.reshape(B * T, -1)
    if temperature != 1.0:  # (h / T) @ W = logits / T
        h_ND = h_ND / jnp.asarray(temperature, h_ND.dtype)
    fn = lambda t, aux: (jsd_term(t, beta), entropy_term(t))  # noqa: E731
    div_N, ent_N = vocab_reduce(
        fn, h_ND, student_w_DV, None,
        teacher_operand(teacher_h_BTD, teacher_w, teacher_index_B),
        teacher_temperature=temperature, vocab_chunk=vocab_chunk, seq_chunk=seq_chunk)[1]
    div_BT = div_N.reshape(B, T)
    metrics_BT = {"divergence": sg(div_BT), "entropy": ent_N.reshape(B, T)}
    return aggregate(PerToken(div_BT, jnp.ones_like(div_BT), metrics_BT), mask_BT, domain_ids_B,
                     num_domains=num_domains, aggregation=aggregation)


def forward_kl_loss(student_h_BTD, student_w_DV, teacher_h_BTD, teacher_w, mask_BT,
                    domain_ids_B=None, **kw):
    """KL(teacher || student) per token, aggregated: `gkd_loss` with beta=0."""
    return gkd_loss(student_h_BTD, student_w_DV, teacher_h_BTD, teacher_w, mask_BT, domain_ids_B,
                    beta=0.0, **kw)


def sft_loss(h_BTD, w_DV, tokens_BT, mask_BT, domain_ids_B=None, *, num_domains=1,
             aggregation="token_mean", vocab_chunk=8192, seq_chunk=1024):
    """Supervised cross-entropy -log p(token) on mask_BT tokens. Metrics: nll, entropy, ...."""
    B, T, _ = h_BTD.shape
    fn = lambda t, tok: (gather_term(t, tok)[0][:, 0], entropy_term(t))  # noqa: E731
    lp_N, ent_N = vocab_reduce(fn, h_BTD.reshape(B * T, -1), w_DV, tokens_BT.reshape(B * T, 1),
                               vocab_chunk=vocab_chunk, seq_chunk=seq_chunk)[1]
    nll_BT = -lp_N.reshape(B, T)
    metrics_BT = {"nll": sg(nll_BT), "entropy": ent_N.reshape(B, T)}
    return aggregate(PerToken(nll_BT, jnp.ones_like(nll_BT), metrics_BT), mask_BT, domain_ids_B,
                     num_domains=num_domains, aggregation=aggregation)


# ---------------------------------------------------------------------------------------------
# GRPO.


def group_advantages(rewards_B, group_size: int, *, normalize_std=True, eps=1e-6):
    """GRPO outcome advantage: reward minus its group's mean, over the group's std if asked.

    A group's G rollouts are contiguous (B = prompts * G). The std is the unbiased sample std
    (as in TRL and verl); a group whose rewards are all equal gets exactly 0. normalize_std=False
    is Dr. GRPO (pair it with aggregation='token_sum', which has no length normalisation).
    """
    B = rewards_B.shape[0]
    if group_size < 1 or B % group_size:
        raise ValueError(f"group_size={group_size} must divide the batch of {B} rollouts")
    if normalize_std and group_size < 2:
        raise ValueError("group_size must be >= 2 to normalise by the group std")
    r_PG = rewards_B.astype(jnp.float32).reshape(-1, group_size)
    adv_PG = r_PG - r_PG.mean(-1, keepdims=True)
    if normalize_std:
        adv_PG = adv_PG / (r_PG.std(-1, ddof=1, keepdims=True) + eps)
    return adv_PG.reshape(B)


def group_advantages_host(rewards_B: np.ndarray, group_size: int, *,
                          normalize_std: bool = True, eps: float = 1e-6) -> np.ndarray:
    """``group_advantages`` on the host in numpy (the recipes' batches are built there)."""
    r_PG = np.asarray(rewards_B).reshape(-1, group_size).astype(np.float32)
    adv_PG = r_PG - r_PG.mean(-1, keepdims=True)
    if normalize_std:
        adv_PG = adv_PG / (r_PG.std(-1, ddof=1, keepdims=True) + eps)
    return adv_PG.reshape(-1)


def grpo_loss(logp_BT, old_logp_BT, advantages_B, mask_BT, domain_ids_B=None, *, num_domains=1,
              clip_low=0.2, clip_high=0.2, ref_logp_BT=None, kl_coef=0.0,
              aggregation="seq_mean", entropy_BT=None, reward_B=None):
    """PPO-clip ratio loss with per-sequence advantages, plus kl_coef * k3 KL to a reference.

    ratio = pi/pi_old is clipped to [1 - clip_low, 1 + clip_high]; k3 = e^d - d - 1 with
    d = log pi_ref - log pi. Metrics: clip_frac, kl_ref, abs_adv, entropy, resp_len, reward,
    grad_token_share (the per-token weight is dl/dlog pi).
    """
    lp_BT = logp_BT.astype(jnp.float32)
    ratio_BT = jnp.exp(lp_BT - sg(old_logp_BT.astype(jnp.float32)))
    adv_BT = jnp.broadcast_to(advantages_B.astype(jnp.float32)[:, None], lp_BT.shape)
    unclipped_BT = ratio_BT * adv_BT
    clipped_BT = jnp.clip(ratio_BT, 1.0 - clip_low, 1.0 + clip_high) * adv_BT
    is_clipped_BT = sg(clipped_BT < unclipped_BT)
    loss_BT = -jnp.minimum(unclipped_BT, clipped_BT)
    grad_BT = jnp.where(is_clipped_BT, 0.0, -unclipped_BT)
    metrics_BT = {"clip_frac": is_clipped_BT.astype(jnp.float32), "abs_adv": jnp.abs(adv_BT)}
    if ref_logp_BT is not None:
        d_BT = sg(ref_logp_BT.astype(jnp.float32)) - lp_BT
        k3_BT = jnp.exp(d_BT) - d_BT - 1.0
        loss_BT = loss_BT + kl_coef * k3_BT
        grad_BT = grad_BT + kl_coef * (1.0 - jnp.exp(d_BT))
        metrics_BT["kl_ref"] = k3_BT
    if entropy_BT is not None:
        metrics_BT["entropy"] = entropy_BT
    return aggregate(PerToken(loss_BT, grad_BT, metrics_BT), mask_BT, domain_ids_B,
                     num_domains=num_domains, aggregation=aggregation,
                     seq_metrics_B={"reward": reward_B})
