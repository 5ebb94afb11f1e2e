"""MOPD losses: distillation estimators A, B, C, GKD divergences, SFT and GRPO, with metrics.

Glossary of shape suffixes: B batch (sequences), T time, D model dim, V vocab, K top-k count,
G group size (rollouts per prompt), M domains (one teacher each). `tokens_BT[b, t]` is the token
that `h_BTD[b, t]` predicts (the caller shifts), and `mask_BT` is 1 on the response tokens that
train. Nothing here builds a [B, T, V] array: the vocabulary work goes through `chunked`.

Every loss returns (loss, metrics); metrics are stop-gradient fp32 arrays. Token metrics come as
a scalar `name` over all response tokens plus a [M] vector `name/domain`, with the same names
for every estimator:

  kl                reverse-KL estimate: mean of log pi_s(y) - log pi_T(y) at the sampled
                    tokens (A, B), the exact full-vocabulary value (C)
  abs_adv           mean |A_hat| (B, C: the clipped log-ratio A would use)
  is_masked_frac    fraction outside the IcePop band (only A masks them; B, C just report it)
  entropy           student entropy (A via `distill_loss`, or given as `entropy_BT`)
  resp_len          response tokens per sequence
  grad_token_share  each domain's share of sum_t |c_t dl_t/dlog pi_s(y_t)| (c: aggregation
                    weight); B and C have no per-token scalar there and use |c_t|
  reward            outcome reward per sequence, when the batch carries one

plus `loss/domain` (additive per-domain parts of the loss) and `domain_scale/domain`.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mopd_jax.chunked import (
    PAD_LOGIT,
    chunked_token_logprobs,
    chunked_topk,
    entropy_term,
    gather_term,
    jsd_term,
    reverse_kl_term,
    teacher_operand,
    topk_kl_term,
    vocab_reduce,
)

AGGREGATIONS = ("seq_mean", "token_mean", "token_sum")
ESTIMATORS = ("A", "B", "C")
sg = jax.lax.stop_gradient


@dataclasses.dataclass(frozen=True)
class DistillLossConfig:
    """How the student is pulled toward its domain's teacher (MOPD.md, "The objective")."""

    estimator: str = "A"
    """'A' sampled-token policy gradient, 'B' teacher top-k with correction, 'C' exact KL."""
    a_max: float = 5.0
    """A: the advantage log pi_T(y) - log pi_s(y) is clipped to [-a_max, a_max]."""
    is_low: float = 0.2
    """A: IcePop band low edge; tokens with pi_s(y)/mu(y) below it get weight 0."""
    is_high: float = 5.0
    """A: IcePop band high edge; tokens with pi_s(y)/mu(y) above it get weight 0."""
    orm_alpha: float | tuple[float, ...] = 0.0
    """A: alpha_d on the GRPO outcome advantage; one float for all domains or one per domain."""
    topk: int = 64
    """B: teacher ids per token."""
    aggregation: str = "seq_mean"
    """'seq_mean' (1/|y| per sequence, then mean: the paper), 'token_mean', or 'token_sum'."""
    num_domains: int = 1
    """M: number of domains (= teachers); sizes the per-domain metrics and weights."""
    domain_weights: tuple[float, ...] = ()
    """Loss weight per domain; empty means all 1."""
    dn_rescale: bool = False
    """DN-MOPD: also scale domain d by clip(sigma_all / sigma_d, *dn_clip)."""
    dn_clip: tuple[float, float] = (0.25, 4.0)
    """Bounds of the DN-MOPD scale."""
    teacher_temperature: float = 1.0
    """Sampling temperature T: teacher *and* student logits are divided by it, so the student
    side (its log-probs, the IS ratio against the sampler's log softmax(z/T), the KL) is the
    distribution the rollouts were drawn from."""
    vocab_chunk: int = 8192
    """Vocabulary columns per tile of the chunked log-softmax."""
    seq_chunk: int = 1024
    """Tokens (of the flattened B*T) per tile of the chunked log-softmax."""

    def __post_init__(self):
        for name in ("orm_alpha", "domain_weights", "dn_clip"):  # YAML hands over lists
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        M = self.num_domains

        def check(ok, field, msg):
            if not ok:
                raise ValueError(f"DistillLossConfig.{field}: {msg}")

        check(self.estimator in ESTIMATORS, "estimator", f"{self.estimator!r} not in {ESTIMATORS}")
        check(self.aggregation in AGGREGATIONS, "aggregation",
              f"{self.aggregation!r} not in {AGGREGATIONS}")
        check(self.a_max > 0, "a_max", "must be > 0")
        check(0 <= self.is_low <= 1 <= self.is_high, "is_low/is_high", "need 0 <= low <= 1 <= high")
        check(self.topk >= 1, "topk", "must be >= 1")
        check(M >= 1, "num_domains", "must be >= 1")
        check(len(self.domain_weights) in (0, M), "domain_weights", f"give {M} weights or none")
        check(isinstance(self.orm_alpha, (int, float)) or len(self.orm_alpha) == M, "orm_alpha",
              f"give one float or {M} values")
        check(0 < self.dn_clip[0] <= self.dn_clip[1], "dn_clip", "need 0 < low <= high")
        check(self.teacher_temperature > 0, "teacher_temperature", "must be > 0")
        check(min(self.vocab_chunk, self.seq_chunk) >= 1, "vocab_chunk/seq_chunk", "must be >= 1")

    @property
    def alpha_M(self) -> jax.Array:
        """alpha_d per domain, [M]."""
        return jnp.broadcast_to(jnp.asarray(self.orm_alpha, jnp.float32), (self.num_domains,))

    @property
    def scale_M(self) -> jax.Array:
        """Static per-domain loss weights, [M]."""
        return jnp.asarray(self.domain_weights or (1.0,) * self.num_domains, jnp.float32)


class DistillBatch(NamedTuple):
    """Student rollouts for one distillation step (a pytree, so it passes through jit)."""

    tokens_BT: jax.Array  # int: the sampled token that h_BTD[b, t] predicts
    mask_BT: jax.Array  # 1 on response tokens that train; prompt/tool tokens 0
    domain_ids_B: jax.Array  # int in [0, M) (traced, so not checked)
    sampler_logp_BT: jax.Array | None = None  # mu: rollout engine log-prob; None = trainer's
    orm_advantage_B: jax.Array | None = None  # GRPO group advantage for A's alpha term
    reward_B: jax.Array | None = None  # outcome reward, logged only


class TeacherScores(NamedTuple):
    """What each sequence's teacher returned; which fields depends on the estimator."""

    logp_BT: jax.Array | None = None  # A, B: teacher log-prob of tokens_BT
    topk_ids_BTK: jax.Array | None = None  # B
    topk_logp_BTK: jax.Array | None = None  # B: unnormalised over the top-k
    hidden_BTD: jax.Array | None = None  # C: teacher final hidden states
    w: jax.Array | None = None  # C: lm_head [D, V], or [M, D, V] stacked per teacher
    teacher_index_B: jax.Array | None = None  # C with [M, D, V]: row of w; default domain_ids_B


_NEEDS = {"A": ("logp_BT",), "B": ("logp_BT", "topk_ids_BTK", "topk_logp_BTK"),
          "C": ("hidden_BTD", "w")}


def score_teacher(cfg: DistillLossConfig, teacher_h_BTD, teacher_w_DV, tokens_BT):
    """The `TeacherScores` cfg.estimator needs, from one teacher's final hidden states."""
    if cfg.estimator == "C":
        return TeacherScores(hidden_BTD=teacher_h_BTD, w=teacher_w_DV)
    kw = dict(temperature=cfg.teacher_temperature, vocab_chunk=cfg.vocab_chunk,
              seq_chunk=cfg.seq_chunk)
    logp_BT = chunked_token_logprobs(teacher_h_BTD, teacher_w_DV, tokens_BT, **kw)
    if cfg.estimator == "A":
        return TeacherScores(logp_BT=logp_BT)
    ids_BTK, logp_BTK = chunked_topk(teacher_h_BTD, teacher_w_DV, cfg.topk, **kw)
    return TeacherScores(logp_BT=logp_BT, topk_ids_BTK=ids_BTK, topk_logp_BTK=logp_BTK)


# ---------------------------------------------------------------------------------------------
# Aggregation, domain weights and metrics shared by every loss.


def token_weights(mask_BT, aggregation: str) -> jax.Array:
    """c_BT such that loss = sum c * l for 'seq_mean', 'token_mean' or 'token_sum'.

    'token_sum' divides by the constant B*T instead of any length: Dr. GRPO's aggregation.
    """
    m_BT = mask_BT.astype(jnp.float32)
    if aggregation == "seq_mean":
        return m_BT / jnp.maximum(m_BT.sum(-1, keepdims=True), 1.0) / m_BT.shape[0]
    if aggregation == "token_mean":
        return m_BT / jnp.maximum(m_BT.sum(), 1.0)
    if aggregation == "token_sum":
        return m_BT / m_BT.size
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
    seqs_M = onehot_BM.sum(0)
    seq_metrics_B = {"resp_len": m_BT.sum(-1), **(seq_metrics_B or {})}
    for name, x_B in seq_metrics_B.items():
        if x_B is not None:
            x_B = x_B.astype(jnp.float32)
            metrics[name] = x_B.mean()
            metrics[name + "/domain"] = (x_B @ onehot_BM) / jnp.maximum(seqs_M, 1.0)
    return part_BT.sum(), jax.tree.map(sg, metrics)


# ---------------------------------------------------------------------------------------------
# MOPD estimators.


def _band(student_logp_BT, sampler_logp_BT, cfg):
    """(IcePop weight pi_s/mu inside [is_low, is_high] else 0, in-band mask), stop-gradient."""
    if sampler_logp_BT is None:
        return jnp.ones_like(student_logp_BT), jnp.ones(student_logp_BT.shape, bool)
    ratio_BT = jnp.exp(sg(student_logp_BT - sampler_logp_BT.astype(jnp.float32)))
    inside_BT = (ratio_BT >= cfg.is_low) & (ratio_BT <= cfg.is_high)
    return jnp.where(inside_BT, ratio_BT, 0.0), inside_BT


def _finish(cfg, batch, loss_BT, grad_BT, log_ratio_BT, adv_BT, inside_BT, entropy_BT, kl_BT):
    scale_M = cfg.scale_M
    if cfg.dn_rescale:
        scale_M = scale_M * dn_rescale_weights(log_ratio_BT, batch.mask_BT, batch.domain_ids_B,
                                               cfg.num_domains, cfg.dn_clip)
    metrics_BT = {"kl": kl_BT, "abs_adv": jnp.abs(adv_BT),
                  "is_masked_frac": (~inside_BT).astype(jnp.float32)}
    if entropy_BT is not None:
        metrics_BT["entropy"] = entropy_BT
    return aggregate(PerToken(loss_BT, grad_BT, metrics_BT), batch.mask_BT, batch.domain_ids_B,
                     num_domains=cfg.num_domains, aggregation=cfg.aggregation, scale_M=scale_M,
                     seq_metrics_B={"reward": batch.reward_B})


def pg_distill_loss(cfg: DistillLossConfig, student_logp_BT, teacher_logp_BT, batch: DistillBatch,
                    *, entropy_BT=None, alpha_B=None):
    """Estimator A: -sum c m w A_hat log pi_s(y), gradient only through student_logp_BT.

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
    w_BT, inside_BT = _band(lp_BT, batch.sampler_logp_BT, cfg)
    loss_BT = -(w_BT * adv_BT) * lp_BT
    return _finish(cfg, batch, loss_BT, -(w_BT * adv_BT), log_ratio_BT, adv_BT, inside_BT,
                   entropy_BT, -log_ratio_BT)


def distill_loss(cfg: DistillLossConfig, student_h_BTD, student_w_DV, teacher: TeacherScores,
                 batch: DistillBatch):
    """The configured MOPD estimator on one batch of student rollouts -> (loss, metrics).

    Differentiable w.r.t. student_h_BTD and student_w_DV (call it inside jax.grad); the teacher
    is a constant. B and C get entropy and the sampled-token log-probs from their own chunked pass.
    """
    missing = [f for f in _NEEDS[cfg.estimator] if getattr(teacher, f) is None]
    if missing:
        raise ValueError(f"estimator {cfg.estimator} needs TeacherScores.{', .'.join(missing)}; "
                         "build it with score_teacher(cfg, ...)")
    B, T, _ = student_h_BTD.shape
    if cfg.teacher_temperature != 1.0:  # (h / T) @ W = logits / T: the sampled distribution
        student_h_BTD = student_h_BTD / jnp.asarray(cfg.teacher_temperature,
                                                    student_h_BTD.dtype)
    h_ND, tok_N1 = student_h_BTD.reshape(B * T, -1), batch.tokens_BT.reshape(B * T, 1)
    kw = dict(vocab_chunk=cfg.vocab_chunk, seq_chunk=cfg.seq_chunk)

    def at_token(t, tok_n1, logp_nc=None):
        return gather_term(t, tok_n1, logp_nc)[0][:, 0]

    if cfg.estimator == "A":
        fn = lambda t, tok: (at_token(t, tok), entropy_term(t))  # noqa: E731
        lp_N, ent_N = vocab_reduce(fn, h_ND, student_w_DV, tok_N1, **kw)[1]
        return pg_distill_loss(cfg, lp_N.reshape(B, T), teacher.logp_BT, batch,
                               entropy_BT=ent_N.reshape(B, T))

    if cfg.estimator == "B":
        def fn(t, aux):
            tok, ids, tlogp = aux
            return topk_kl_term(t, ids, tlogp), entropy_term(t), at_token(t, tok)

        # A -inf teacher log-prob (a padded top-k slot) would turn 0 * inf into NaN gradients.
        t_logp_NK = jnp.maximum(teacher.topk_logp_BTK.astype(jnp.float32), PAD_LOGIT)
        aux = (tok_N1, teacher.topk_ids_BTK.reshape(B * T, -1), t_logp_NK.reshape(B * T, -1))
        loss_N, ent_N, lp_N = vocab_reduce(fn, h_ND, student_w_DV, aux, **kw)[1]
        t_lp_BT = teacher.logp_BT.astype(jnp.float32)
    else:
        def fn(t, tok):
            return (reverse_kl_term(t), entropy_term(t), at_token(t, tok),
                    at_token(t, tok, t.teacher_logp_nc))

        index_B = teacher.teacher_index_B
        if teacher.w.ndim == 3 and index_B is None:
            index_B = batch.domain_ids_B
        operand = teacher_operand(teacher.hidden_BTD, teacher.w,
                                  index_B if teacher.w.ndim == 3 else None)
        loss_N, ent_N, lp_N, t_lp_N = vocab_reduce(
            fn, h_ND, student_w_DV, tok_N1, operand,
            teacher_temperature=cfg.teacher_temperature, **kw)[1]
        t_lp_BT = t_lp_N.reshape(B, T)
    loss_BT, lp_BT = loss_N.reshape(B, T), sg(lp_N.reshape(B, T))
    log_ratio_BT = sg(t_lp_BT) - lp_BT
    _, inside_BT = _band(lp_BT, batch.sampler_logp_BT, cfg)
    kl_BT = sg(loss_BT) if cfg.estimator == "C" else -log_ratio_BT
    return _finish(cfg, batch, loss_BT, jnp.ones_like(loss_BT), log_ratio_BT,
                   jnp.clip(log_ratio_BT, -cfg.a_max, cfg.a_max), inside_BT,
                   ent_N.reshape(B, T), kl_BT)


# ---------------------------------------------------------------------------------------------
# GKD divergences and SFT, sharing the chunked machinery.


def gkd_loss(student_h_BTD, student_w_DV, teacher_h_BTD, teacher_w, mask_BT, domain_ids_B=None,
             *, beta: float, num_domains=1, teacher_index_B=None, aggregation="token_mean",
             teacher_temperature=1.0, vocab_chunk=8192, seq_chunk=1024):
    """Generalised JSD(beta) distillation (GKD): beta=0 KL(teacher||student), beta=1 reverse KL.

    Convention of the GKD paper and TRL, see `chunked.jsd_term`. teacher_w may be [M, D, V]
    routed by teacher_index_B. Metrics: divergence, entropy, resp_len, grad_token_share.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"gkd_loss: beta={beta} must be in [0, 1]")
    B, T, _ = student_h_BTD.shape
    fn = lambda t, aux: (jsd_term(t, beta), entropy_term(t))  # noqa: E731
    div_N, ent_N = vocab_reduce(
        fn, student_h_BTD.reshape(B * T, -1), student_w_DV, None,
        teacher_operand(teacher_h_BTD, teacher_w, teacher_index_B),
        teacher_temperature=teacher_temperature, vocab_chunk=vocab_chunk, seq_chunk=seq_chunk)[1]
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
