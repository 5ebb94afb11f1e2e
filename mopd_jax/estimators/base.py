"""What every MOPD estimator is, the registry, and the loss configuration they share.

An estimator is one object: what it asks of a teacher (``needs``: fields of
``TeacherScores``), how a teacher scores for it (``score``), its loss and metrics (``loss``),
and which of its teacher fields the pool stacks per teacher instead of scattering per row
(``stacked``: estimator C's lm_head [M, D, V]). Teachers, the MOPD loss and compile-check ask
the object; adding one is a file in this package plus its line in ``__init__``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from mopd_jax.losses import AGGREGATIONS, PerToken, aggregate, dn_rescale_weights

sg = jax.lax.stop_gradient
REGISTRY: dict[str, "Estimator"] = {}


class TeacherScores(NamedTuple):
    """What each sequence's teacher returned; which fields depends on the estimator."""

    logp_BT: jax.Array | None = None  # teacher log-prob of tokens_BT (A, B: loss; all: KL log)
    topk_ids_BTk: jax.Array | None = None  # B
    topk_logp_BTk: jax.Array | None = None  # B: unnormalised over the top-k
    hidden_BTD: jax.Array | None = None  # C: teacher final hidden states
    w: jax.Array | None = None  # C: lm_head [D, V], or [M, D, V] stacked per teacher
    teacher_index_B: jax.Array | None = None  # C with [M, D, V]: row of w; default domain_ids_B


class DistillBatch(NamedTuple):
    """Student rollouts for one distillation step (a pytree, so it passes through jit)."""

    tokens_BT: jax.Array  # int: the sampled token that h_BTD[b, t] predicts
    mask_BT: jax.Array  # 1 on response tokens that train; prompt/tool tokens 0
    domain_ids_B: jax.Array  # int in [0, M) (traced, so not checked)
    sampler_logp_BT: jax.Array | None = None  # mu: rollout engine log-prob; None = trainer's
    orm_advantage_B: jax.Array | None = None  # GRPO group advantage for A's alpha term
    reward_B: jax.Array | None = None  # outcome reward, logged only


class Estimator:
    """Base of the estimator objects (see the module doc)."""

    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]]
    stacked: ClassVar[tuple[str, ...]] = ()
    summary: ClassVar[str] = ""

    def score(self, cfg: "DistillLossConfig", teacher_h_BTD, teacher_w_DV, tokens_BT
              ) -> TeacherScores:
        """What this estimator needs, from one teacher's final hidden states."""
        raise NotImplementedError

    def loss(self, cfg: "DistillLossConfig", student_h_BTD, student_w_DV,
             teacher: TeacherScores, batch: DistillBatch):
        """(loss, metrics), differentiable w.r.t. the student's hidden states and head."""
        raise NotImplementedError

    def check(self, teacher: TeacherScores) -> None:
        missing = [f for f in self.needs if getattr(teacher, f) is None]
        if missing:
            raise ValueError(f"estimator {self.name} needs TeacherScores.{', .'.join(missing)};"
                             " build it with the estimator's score()")


def register(cls: type[Estimator]) -> type[Estimator]:
    """Class decorator: one instance of ``cls`` under ``cls.name``."""
    if cls.name in REGISTRY:
        raise ValueError(f"estimator {cls.name!r} is already registered")
    REGISTRY[cls.name] = cls()
    return cls


@dataclasses.dataclass(frozen=True)
class EstimatorKnobs:
    """The estimator's knobs, declared once: ``mopd:`` in YAML (MOPDConfig) and the loss
    (DistillLossConfig) both inherit them, with these checks."""

    estimator: str = "A"
    """Which estimator (``mopd_jax.estimators.REGISTRY``): 'A' sampled-token policy
    gradient, 'B' teacher top-k with correction, 'C' exact full-vocabulary reverse KL; 'FKL'
    and 'JSD' the GKD divergences."""
    a_max: float = 5.0
    """A: the advantage log pi_T(y) - log pi_s(y) is clipped to [-a_max, a_max]."""
    is_low: float = 0.2
    """A: IcePop band low edge; tokens with pi_s(y)/mu(y) below it get weight 0."""
    is_high: float = 5.0
    """A: IcePop band high edge; tokens with pi_s(y)/mu(y) above it get weight 0."""
    topk: int = 64
    """B: teacher ids per token."""
    aggregation: str = "seq_mean"
    """'seq_mean' (1/|y| per sequence, then mean: the paper), 'token_mean', or 'token_sum'."""
    dn_rescale: bool = False
    """DN-MOPD: also scale domain d by clip(sigma_all / sigma_d, *dn_clip)."""

    def _check_knobs(self, where: str):
        def check(ok, field, msg):
            if not ok:
                raise ValueError(f"{where}.{field}: {msg}")

        check(self.estimator in REGISTRY, "estimator",
              f"{self.estimator!r} is not one of {sorted(REGISTRY)}")
        check(self.aggregation in AGGREGATIONS, "aggregation",
              f"{self.aggregation!r} is not one of {list(AGGREGATIONS)}")
        check(self.a_max > 0, "a_max", "must be > 0")
        check(0 <= self.is_low <= 1 <= self.is_high, "is_low/is_high",
              "need 0 <= is_low <= 1 <= is_high")
        check(self.topk >= 1, "topk", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class DistillLossConfig(EstimatorKnobs):
    """How the student is pulled toward its domain's teacher (MOPD.md, "The objective"):
    the knobs plus what a run derives (domains, per-domain tuples, temperature, tiles).
    Build it from a run's MOPD config with ``from_mopd`` (by code, never by hand)."""

    orm_alpha: float | tuple[float, ...] = 0.0
    """A: alpha_d on the GRPO outcome advantage; one float for all domains or one per domain."""
    num_domains: int = 1
    """M: number of domains (= teachers); sizes the per-domain metrics and weights."""
    domain_weights: tuple[float, ...] = ()
    """Loss weight per domain; empty means all 1."""
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
        self._check_knobs("DistillLossConfig")
        M = self.num_domains

        def check(ok, field, msg):
            if not ok:
                raise ValueError(f"DistillLossConfig.{field}: {msg}")

        check(M >= 1, "num_domains", "must be >= 1")
        check(len(self.domain_weights) in (0, M), "domain_weights", f"give {M} weights or none")
        check(isinstance(self.orm_alpha, (int, float)) or len(self.orm_alpha) == M, "orm_alpha",
              f"give one float or {M} values")
        check(0 < self.dn_clip[0] <= self.dn_clip[1], "dn_clip", "need 0 < low <= high")
        check(self.teacher_temperature > 0, "teacher_temperature", "must be > 0")
        check(min(self.vocab_chunk, self.seq_chunk) >= 1, "vocab_chunk/seq_chunk", "must be >= 1")

    @classmethod
    def from_mopd(cls, mopd: EstimatorKnobs, domains, *, vocab_size: int,
                  temperature: float) -> "DistillLossConfig":
        """The loss of a run: ``mopd``'s knobs as they are, its per-domain maps as tuples in
        ``domains`` order, the top-k and vocabulary tile capped at the vocabulary."""
        knobs = {f.name: getattr(mopd, f.name) for f in dataclasses.fields(EstimatorKnobs)}
        knobs["topk"] = min(knobs["topk"], vocab_size)
        alpha = getattr(mopd, "orm_alpha", {}) or {}
        weights = getattr(mopd, "domain_weights", {}) or {}
        return cls(**knobs, num_domains=len(domains),
                   orm_alpha=tuple(alpha.get(d, 0.0) for d in domains) if alpha else 0.0,
                   domain_weights=tuple(weights.get(d, 1.0) for d in domains)
                   if weights else (), teacher_temperature=temperature,
                   vocab_chunk=min(8192, vocab_size))

    @property
    def alpha_M(self) -> jax.Array:
        """alpha_d per domain, [M]."""
        return jnp.broadcast_to(jnp.asarray(self.orm_alpha, jnp.float32), (self.num_domains,))

    @property
    def scale_M(self) -> jax.Array:
        """Static per-domain loss weights, [M]."""
        return jnp.asarray(self.domain_weights or (1.0,) * self.num_domains, jnp.float32)


# ----------------------------------------------------------------- shared by A, B and C
def band(student_logp_BT, sampler_logp_BT, cfg):
    """(IcePop weight pi_s/mu inside [is_low, is_high] else 0, in-band mask), stop-gradient."""
    if sampler_logp_BT is None:
        return jnp.ones_like(student_logp_BT), jnp.ones(student_logp_BT.shape, bool)
    ratio_BT = jnp.exp(sg(student_logp_BT - sampler_logp_BT.astype(jnp.float32)))
    inside_BT = (ratio_BT >= cfg.is_low) & (ratio_BT <= cfg.is_high)
    return jnp.where(inside_BT, ratio_BT, 0.0), inside_BT


def finish(cfg, batch, loss_BT, grad_BT, log_ratio_BT, adv_BT, inside_BT, entropy_BT, kl_BT):
    """Aggregate a reverse-KL estimator's per-token loss with the metrics of ``losses``."""
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


def tempered(cfg, student_h_BTD):
    """(h / T) @ W = logits / T: the distribution the rollouts were sampled from."""
    if cfg.teacher_temperature == 1.0:
        return student_h_BTD
    return student_h_BTD / jnp.asarray(cfg.teacher_temperature, student_h_BTD.dtype)


def chunk_kw(cfg) -> dict:
    return dict(vocab_chunk=cfg.vocab_chunk, seq_chunk=cfg.seq_chunk)
