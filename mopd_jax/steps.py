"""Jitted steps: teacher/student scoring and the student train step.

Params are arguments, never captured constants, so one compiled ``score`` serves every teacher
that shares the student's graph.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mopd_jax.batches import GRPOBatch, MOPDBatch, SFTBatch
from mopd_jax.chunked import chunked_token_logprobs


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature", "vocab_chunk",
                                             "seq_chunk"))
def token_logprobs_step(graphdef, params, tokens_BT, *, temperature: float = 1.0,
                        vocab_chunk: int = 8192, seq_chunk: int = 1024):
    """log p(x_t | x_<t) for t >= 1 ([B, T-1]) under softmax(logits / temperature), chunked."""
    model = nnx.merge(graphdef, params)
    hidden, _, _ = model(tokens_BT)
    return chunked_token_logprobs(hidden[:, :-1], model.lm_head_weight(), tokens_BT[:, 1:],
                                  temperature=temperature, vocab_chunk=vocab_chunk,
                                  seq_chunk=seq_chunk)


# ----------------------------------------------------------------------------- scoring
def _rules(mesh, role: str):
    """The role's activation sharding rules on ``mesh`` (nothing without a mesh)."""
    from mopd_jax.sharding import use_rules
    return use_rules(mesh, role) if mesh is not None else contextlib.nullcontext()


@functools.partial(jax.jit, static_argnames=("graphdef", "loss_cfg", "mesh"))
def score_step(graphdef, params, tokens_BT, *, loss_cfg, mesh=None):
    """What ``loss_cfg.estimator`` needs from a teacher for ``tokens_BT`` (shifted: position t
    scores token t+1). One compiled function for every teacher: params are arguments. With
    ``mesh``, activations follow the teacher role's sharding rules."""
    from mopd_jax.estimators import score_teacher

    with _rules(mesh, "teacher"):
        model = nnx.merge(graphdef, params)
        hidden, _, _ = model(tokens_BT[:, :-1])
        return score_teacher(loss_cfg, hidden, model.lm_head_weight(), tokens_BT[:, 1:])


# ----------------------------------------------------------------------------- training
def make_optimizer(ocfg) -> optax.GradientTransformation:
    """AdamW, linear warmup then cosine decay, global-norm clipping (``OptimizerConfig``)."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if ocfg.warmup_steps else ocfg.lr, peak_value=ocfg.lr,
        warmup_steps=ocfg.warmup_steps, decay_steps=max(ocfg.total_steps, ocfg.warmup_steps + 1),
        end_value=ocfg.lr * ocfg.min_lr_ratio)
    parts = [optax.clip_by_global_norm(ocfg.clip_norm)] if ocfg.clip_norm > 0 else []
    parts.append(optax.adamw(schedule, b1=ocfg.b1, b2=ocfg.b2, eps=ocfg.eps,
                             weight_decay=ocfg.weight_decay))
    return optax.chain(*parts)


def init_train_state(params, optimizer, mesh=None) -> dict:
    """{'params', 'opt_state', 'step', 'skipped'}; optimizer moments take the param shardings
    and scalars (counts) are replicated over ``mesh`` when one is given."""
    if mesh is None:
        opt_state = jax.jit(optimizer.init)(params)
    else:
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        # zeros_like(params) inside jit would otherwise come out replicated on every device.
        shardings = optax.tree_utils.tree_map_params(
            optimizer, lambda _, s: s, jax.eval_shape(optimizer.init, params),
            jax.tree.map(lambda x: x.sharding, params),
            transform_non_params=lambda _: replicated)
        opt_state = jax.jit(optimizer.init, out_shardings=shardings)(params)
    state = {"params": params, "opt_state": opt_state,
             "step": jnp.zeros((), jnp.int32), "skipped": jnp.zeros((), jnp.int32)}
    if mesh is None:
        return state
    # Everything as a NamedSharding on ``mesh``: a one-device mesh's counters would otherwise
    # keep a SingleDeviceSharding that the step's outputs do not have (a second compile).
    return jax.tree.map(lambda x: x if isinstance(x.sharding, jax.sharding.NamedSharding)
                        and len(x.sharding.device_set) == mesh.size
                        else jax.device_put(x, replicated), state)


def student_forward(model, batch):
    """The student's forward over ``tokens[:, :-1]``; a batch carrying the sampler's routing
    (``expert_ids_BTLk``) replays it: each MoE layer uses the recorded experts, weighted by its
    current router at those experts (so the router still learns; router replay, R3)."""
    tokens = batch.tokens_BT[:, :-1]
    ids = getattr(batch, "expert_ids_BTLk", None)
    if ids is None:
        return model(tokens)
    replay = {layer: ids[:, :-1, j].astype(jnp.int32)
              for j, layer in enumerate(model.moe_layers())}
    return model(tokens, expert_ids=replay)


def distill_objective(loss_cfg, aux_coef: float = 0.0):
    """Loss of the student on its rollouts (a ``MOPDBatch``) against precomputed teacher
    scores."""
    from mopd_jax.estimators import DistillBatch, distill_loss

    def objective(model, batch: MOPDBatch):
        tokens = batch.tokens_BT
        hidden, _, aux = student_forward(model, batch)
        sampler = batch.sampler_logp_BT
        db = DistillBatch(tokens_BT=tokens[:, 1:], mask_BT=batch.mask_BT[:, 1:],
                          domain_ids_B=batch.domain_B,
                          sampler_logp_BT=None if sampler is None else sampler[:, 1:],
                          orm_advantage_B=batch.orm_adv_B, reward_B=batch.reward_B)
        loss, metrics = distill_loss(loss_cfg, hidden, model.lm_head_weight(), batch.teacher,
                                     db)
        return loss + aux_coef * aux, {**metrics, "moe_aux": aux}
    return _weighted(objective, loss_cfg.aggregation)


def _weighted(objective, aggregation: str):
    """``objective`` with its loss's denominator on a batch (``losses.loss_denominator``)."""
    from mopd_jax.losses import loss_denominator
    objective.denominator = lambda batch: loss_denominator(batch.mask_BT[:, 1:], aggregation)
    return objective


def sft_objective(vocab_chunk: int = 8192, seq_chunk: int = 1024, aux_coef: float = 0.0,
                  num_domains: int = 1):
    """Cross-entropy on tokens where mask == 1 (an ``SFTBatch``)."""
    from mopd_jax.losses import sft_loss

    def objective(model, batch: SFTBatch):
        tokens = batch.tokens_BT
        hidden, _, aux = model(tokens[:, :-1])
        loss, metrics = sft_loss(hidden, model.lm_head_weight(), tokens[:, 1:],
                                 batch.mask_BT[:, 1:], batch.domain_B,
                                 num_domains=num_domains, vocab_chunk=vocab_chunk,
                                 seq_chunk=seq_chunk)
        return loss + aux_coef * aux, {**metrics, "moe_aux": aux}
    return _weighted(objective, "token_mean")


def grpo_objective(*, clip_low: float = 0.2, clip_high: float = 0.2, kl_coef: float = 0.0,
                   aggregation: str = "seq_mean", num_domains: int = 1,
                   vocab_chunk: int = 8192, seq_chunk: int = 1024, aux_coef: float = 0.0,
                   temperature: float = 1.0):
    """PPO-clip GRPO loss on rollouts, the policy's log-probs under softmax(logits / temperature)
    (the rollout temperature, so the ratio to the sampler's log-probs is 1 before the update).

    ``batch`` is a ``GRPOBatch``: the sampler's log-probs are the old policy (one update per
    batch), ``ref_logp_BT`` is needed when kl_coef > 0.
    """
    from mopd_jax.losses import grpo_loss

    def objective(model, batch: GRPOBatch):
        tokens = batch.tokens_BT
        hidden, _, aux = student_forward(model, batch)
        logp = chunked_token_logprobs(hidden, model.lm_head_weight(), tokens[:, 1:],
                                      temperature=temperature, vocab_chunk=vocab_chunk,
                                      seq_chunk=seq_chunk)
        ref = batch.ref_logp_BT
        loss, metrics = grpo_loss(logp, batch.sampler_logp_BT[:, 1:], batch.adv_B,
                                  batch.mask_BT[:, 1:], batch.domain_B,
                                  num_domains=num_domains, clip_low=clip_low,
                                  clip_high=clip_high, kl_coef=kl_coef,
                                  ref_logp_BT=None if ref is None else ref[:, 1:],
                                  aggregation=aggregation, reward_B=batch.reward_B)
        return loss + aux_coef * aux, {**metrics, "moe_aux": aux}
    return _weighted(objective, aggregation)


_SHARED_FIELDS = ("w",)  # per-teacher, not per-row: C's stacked lm_heads [M, D, V]


def _is_per_row(path, x) -> bool:
    """Whether a batch leaf has one entry per row (and splits into microbatches)."""
    name = getattr(path[-1], "name", getattr(path[-1], "key", None)) if path else None
    return x.ndim > 0 and name not in _SHARED_FIELDS


def _split_microbatches(batch, k: int):
    """[B, ...] -> [k, B/k, ...], strided: microbatch j holds rows j, j + k, j + 2k, ... so
    that each spans every batch shard (a contiguous split would put each on one shard).
    Leaves that are not per row (``_SHARED_FIELDS``, scalars) come back as None."""
    def split(path, x):
        if not _is_per_row(path, x):
            return None
        if x.shape[0] % k:
            raise ValueError(f"optimizer.microbatches={k} must divide the batch size "
                             f"{x.shape[0]}")
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)
    return jax.tree_util.tree_map_with_path(split, batch)


def _with_shared(mb, batch):
    """A microbatch with the batch's shared (not per-row) leaves put back."""
    return jax.tree.map(lambda m, x: x if m is None else m, mb, batch,
                        is_leaf=lambda v: v is None)


def make_train_step(graphdef, optimizer, objective, *, microbatches: int = 1,
                    state_shardings=None, batch_shardings=None, mesh=None, role="train"):
    """``train_step(state, batch) -> (state, metrics)``, jitted once, state donated.

    Gradients are accumulated in float32 (whatever the parameter dtype) over ``microbatches``
    strided slices of the batch, each weighted by its share of the loss's denominator
    (``objective.denominator(batch)``: rows with a response, or tokens; an equal share
    without one), so the step equals one over the whole batch whatever the padding rows or
    lengths in each slice. A step whose loss or gradients are not finite leaves params and
    optimizer state untouched and increments ``skipped``.
    """
    denominator = getattr(objective, "denominator", None)
    def loss_fn(params, batch):
        with _rules(mesh, role):
            return objective(nnx.merge(graphdef, params), batch)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, batch):
        params = state["params"]
        if microbatches == 1:
            (loss, metrics), grads = grad_fn(params, batch)
        else:
            f32 = lambda x: x.astype(jnp.float32) if jnp.issubdtype(  # noqa: E731
                x.dtype, jnp.floating) else x

            def body(acc, xs):
                mb, share = xs
                (l, m), g = grad_fn(params, _with_shared(mb, batch))
                return jax.tree.map(lambda a, b: a + share * f32(b) if jnp.issubdtype(
                    a.dtype, jnp.floating) else a + b, acc, (l, m, g)), None
            mbs = _split_microbatches(batch, microbatches)
            first = _with_shared(jax.tree.map(lambda x: x[0], mbs), batch)
            shapes = jax.eval_shape(grad_fn, params, first)
            acc_dtype = lambda d: jnp.float32 if jnp.issubdtype(d, jnp.floating) else d  # noqa
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, acc_dtype(s.dtype)),
                                 (shapes[0][0], shapes[0][1], shapes[1]))
            shares = jnp.full((microbatches,), 1.0 / microbatches, jnp.float32)
            if denominator is not None:
                d = jax.vmap(lambda mb: denominator(_with_shared(mb, batch)))(mbs)
                shares = jnp.where(d.sum() > 0, d / jnp.maximum(d.sum(), 1e-30), shares)
            (loss, metrics, grads), _ = jax.lax.scan(body, zeros, (mbs, shares))
            grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = optimizer.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(  # noqa: E731
            lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = {"params": keep(new_params, params),
                     "opt_state": keep(new_opt, state["opt_state"]),
                     "step": state["step"] + 1,
                     "skipped": state["skipped"] + (1 - finite.astype(jnp.int32))}
        metrics = {**metrics, "loss": loss, "grad_norm": grad_norm,
                   "skipped_steps": new_state["skipped"], "finite": finite}
        return new_state, metrics

    if state_shardings is None and mesh is not None:
        return _ExplicitShardings(step, mesh, role)
    kw = {}
    if state_shardings is not None:
        kw["in_shardings"] = (state_shardings, batch_shardings)
        kw["out_shardings"] = (state_shardings, None)
    return jax.jit(step, donate_argnums=(0,), **kw)


class _ExplicitShardings:
    """``step`` jitted with explicit in/out shardings taken from the first call's arguments:
    the state keeps the shardings it has, host batch arrays shard their leading axis over the
    role's batch axes (device arrays keep theirs), metrics come back replicated."""

    def __init__(self, step, mesh, role: str):
        self.step, self.mesh, self.role, self._jitted = step, mesh, role, {}

    def _for(self, state, batch):
        from mopd_jax.sharding import batch_sharding

        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

        devices = set(self.mesh.devices.flat)

        def of_batch(x):
            if isinstance(x, jax.Array) and x.sharding.device_set == devices:
                return x.sharding
            n = getattr(x, "ndim", 0)
            if n == 0:
                return replicated
            s = batch_sharding(self.mesh, n, self.role)
            try:
                s.shard_shape(x.shape)  # raises when the batch axes do not divide the rows
                return s
            except ValueError:
                return replicated

        s_state = state_shardings_of(state)
        s_batch = jax.tree.map(of_batch, batch)
        key = (jax.tree.structure(state), jax.tree.structure(batch),
               tuple(jax.tree.leaves(s_batch)))
        if key not in self._jitted:
            fn = jax.jit(self.step, donate_argnums=(0,), in_shardings=(s_state, s_batch),
                         out_shardings=(s_state, replicated))
            self._jitted[key] = (fn, s_batch)
        return self._jitted[key]

    def __call__(self, state, batch):
        fn, s_batch = self._for(state, batch)
        return fn(state, jax.device_put(batch, s_batch))

    def lower(self, state, batch):
        return self._for(state, batch)[0].lower(state, batch)


def state_shardings_of(state):
    """The shardings a live train state already has (for explicit jit in/out shardings)."""
    return jax.tree.map(lambda x: x.sharding, state)
