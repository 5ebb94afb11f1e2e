"""MOPD recipe: the student learns from the teacher of each prompt's domain, on its own samples.

One step, top to bottom (MOPD.md):
prompts (grain) -> student rollouts with the sampler's per-token log-probs mu -> route each
rollout to its domain's teacher (hard, per sample) -> teacher scores (one compiled score step
per estimator) -> outcome rewards (logged; alpha * A_ORM when samples_per_prompt >= 2) ->
distillation loss + train_step -> metrics, rollout store, checkpoint.
"""

from __future__ import annotations

import sys
import time

import jax
import numpy as np

from mopd_jax.batches import MOPDBatch
from mopd_jax.estimators import DistillLossConfig
from mopd_jax.losses import group_advantages_host
from mopd_jax.recipes import common
from mopd_jax.recipes.run_loop import train_loop
from mopd_jax.recipes.rollout_queue import Produced, RolloutQueue, sampler_copy
from mopd_jax.sampling import rollout
from mopd_jax.steps import distill_objective
from mopd_jax.teachers import SELF, TeacherError, load_teachers, short_name


def loss_config(run: common.Run) -> DistillLossConfig:
    return DistillLossConfig.from_mopd(run.cfg.mopd, run.domains,
                                       vocab_size=run.model_cfg.vocab_size,
                                       temperature=run.cfg.rollout.temperature)


def check_routing(run: common.Run) -> None:
    """Every training domain has a teacher (or a fallback); named teachers' domains exist."""
    m = run.cfg.mopd
    missing = sorted(d for d in run.train_records if d not in m.teachers)
    if missing and not m.fallback:
        raise TeacherError(f"mopd.teachers: no teacher for domain(s) {missing} and mopd.fallback "
                           f"is unset; add mopd.teachers.<domain>=CHECKPOINT or set "
                           f"mopd.fallback={SELF}")


def run_mopd(cfg, *, resume: bool = False, quiet: bool = False) -> common.Result:
    """MOPD for optimizer.total_steps steps; saves OUT/model."""
    common.check_untruncated(cfg)
    check_async(cfg)
    run = common.setup(cfg, resume=resume, quiet=quiet)
    m = cfg.mopd
    check_routing(run)
    run = common.init_student(run)
    pool = load_teachers(m.teachers, m.fallback, student=(run.graphdef, run.init_params,
                                                          run.model_cfg),
                         mesh=run.mesh_for("teachers"), placement=m.placement,
                         student_tokenizer=run.tokenizer,
                         score_rows=m.score_rows)
    loss_cfg = loss_config(run)
    n = m.samples_per_prompt
    if loss_cfg.orm_alpha != 0.0 and n < 2:
        raise TeacherError("mopd.orm_alpha needs mopd.samples_per_prompt >= 2 (a group "
                           "advantage needs at least two rollouts per prompt)")
    pipeline = common.make_pipeline(run, m.prompts_per_step)
    opt, state = common.new_train_state(run)
    step = common.compile_train_step(run, opt, distill_objective(
        loss_cfg, aux_coef=run.model_cfg.router_aux_loss_coef))
    store = common.open_store(run)

    k = cfg.run.max_staleness

    def produce(j, params, version):
        """Step j's rollouts, sampled by policy ``version`` (params on the sampler mesh)."""
        prompts = next(pipeline)
        t0 = time.perf_counter()
        rb = rollout(run.engine, params, prompts, n=n, sampling=common.sampling_params(cfg),
                     seed=common.step_seed(cfg, j))
        return Produced(j, version, rb, common.rewards_of(run, rb),
                        sample_s=time.perf_counter() - t0)

    queue = RolloutQueue(k, cfg.optimizer.total_steps, produce=produce, domains=run.domains,
                         to_sampler=(lambda p: sampler_copy(run.engine, p)) if k else
                         (lambda p: p))

    def step_fn(state, i, loop):
        item, sampler_params = queue.take(i, state["params"])
        rb, rewards = item.rb, item.rewards
        t0 = time.perf_counter()
        teacher = pool.score(rb.tokens, rb.domain, loss_cfg, lengths=rb.lengths)
        batch = MOPDBatch(
            tokens_BT=rb.tokens, mask_BT=rb.response_mask.astype(np.int32),
            domain_B=run.domain_ids(rb.domain), sampler_logp_BT=rb.logprobs, teacher=teacher,
            reward_B=rewards, expert_ids_BTLk=rb.expert_ids,
            orm_adv_B=group_advantages_host(rewards, n, normalize_std=True) if n >= 2 else None)
        for d in rb.domain:
            loop.count(d)
        host = loop.sample_metrics()
        host.update({"time/sample_s": item.sample_s, "time/score_s": time.perf_counter() - t0})
        if k:
            host.update({"async/staleness": float(i - item.version),
                         "async/policy_version": float(item.version)})
        # every estimator's teacher returns the sampled tokens' log-probs (C and the GKD ones
        # only for this log): the first step's KL stays in the loop's state
        if teacher.logp_BT is not None:
            pool.log_initial_kl(_teacher_kl(pool, rb, teacher.logp_BT), loop.initial_kl)
            host.update({f"mopd/initial_kl/{t}": kl for t, kl in loop.initial_kl.items()})
        state, metrics = step(state, batch)  # dispatched: the sampler works meanwhile
        queue.ahead(i, sampler_params)
        rows = None
        if store is not None:
            t_logp = None
            if teacher.logp_BT is not None:  # aligned with tokens: position t scores token t
                t_logp = np.pad(teacher.logp_BT, ((0, 0), (1, 0)), constant_values=np.nan)
            rows = dict(tokens=rb.tokens, prompt_len=rb.prompt_lengths, length=rb.lengths,
                        sampler_logp=rb.logprobs, teacher_logp=t_logp, reward=rewards,
                        domains=list(rb.domain), version=np.full(len(rb), item.version),
                        expert_ids=rb.expert_ids if cfg.run.store_routing else None)
        return state, metrics, host, rows

    state, loop = train_loop(run, state, step_fn, pipeline=pipeline,
                                    total_steps=cfg.optimizer.total_steps, resume=resume,
                                    prefix="mopd", store=store, carry=queue if k else None)
    if k and common.is_primary() and queue.staleness:
        hist = ", ".join(f"{lag}: {c}" for lag, c in sorted(queue.staleness.items()))
        print(f"async MOPD (run.max_staleness={k}): steps trained at each staleness {{{hist}}}",
              file=sys.stderr)
    return common.finish(run, state["params"], loop)


def check_async(cfg) -> None:
    """Staleness needs an estimator that corrects off-policy samples token by token; stored
    routing needs the engine to record it."""
    if cfg.run.store_routing and not cfg.mopd.router_replay:
        raise TeacherError("run.store_routing=true: the engine records the routing only with "
                           "mopd.router_replay=true; set it (MoE student) or drop "
                           "run.store_routing")
    k, est = cfg.run.max_staleness, cfg.mopd.estimator
    if k and jax.process_count() > 1:
        raise TeacherError(f"run.max_staleness={k}: asynchronous MOPD is single-process for "
                           "now (its in-flight rollouts are checkpointed by one process); use "
                           "run.max_staleness=0 for a multi-process run")
    if k and est != "A":
        raise TeacherError(f"run.max_staleness={k}: estimator {est} assumes on-policy samples "
                           "(its expectation is under the current student), so stale rollouts "
                           "would bias it; use mopd.estimator=A (its IcePop mask and IS ratio "
                           "use each rollout's own sampler log-probs) or run.max_staleness=0")


def _teacher_kl(pool, rb, teacher_logp_BT1) -> dict[str, float]:
    """Per-teacher mean per-token KL estimate (mu - teacher log-prob on response tokens)."""
    mask = rb.response_mask[:, 1:]
    diff = np.where(mask, rb.logprobs[:, 1:] - teacher_logp_BT1, 0.0)
    names = pool.route(rb.domain)
    out = {}
    for t in set(names):
        rows = np.asarray([i for i, x in enumerate(names) if x == t])
        out[short_name(t)] = float(diff[rows].sum() / max(mask[rows].sum(), 1))
    return out
