"""GRPO recipe: domain teachers (one run per domain), and the RL baselines' inner loop.

Each step: prompts -> ``group_size`` student rollouts per prompt -> outcome rewards -> group
advantages (Dr. GRPO: no std normalisation) -> dynamic sampling (groups whose rewards are all
equal are dropped and more prompts sampled, up to two extra rounds; rows left empty are masked)
-> PPO-clip train_step with the sampler's log-probs as the behaviour policy.
Every sampled rollout counts toward the sample budget, kept or not.
"""

from __future__ import annotations

import numpy as np

from mopd_jax import sharding as shd
from mopd_jax.batches import GRPOBatch
from mopd_jax.losses import group_advantages_host
from mopd_jax.recipes import common
from mopd_jax.sampling import rollout
from mopd_jax.steps import grpo_objective, token_logprobs_step

MAX_EXTRA_ROUNDS = 2


def collect_groups(run: common.Run, params, pipeline, step: int):
    """Sampled groups for one step: (rows dict [P*G, L], rewards, kept-group fraction, samples)."""
    cfg, g = run.cfg, run.cfg.grpo
    G, P = g.group_size, g.prompts_per_step
    engine = run.engine
    kept, rewards_all, samples = [], [], {}
    for round_ in range(1 + (MAX_EXTRA_ROUNDS if g.dynamic_sampling else 0)):
        prompts = next(pipeline)
        rb = rollout(engine, params, prompts, n=G, sampling=common.sampling_params(cfg),
                     seed=common.step_seed(cfg, step, round_))
        r = common.rewards_of(run, rb)
        rewards_all.append(r)
        for d in rb.domain:
            samples[d] = samples.get(d, 0) + 1
        adv = group_advantages_host(r, G, normalize_std=not g.dr_grpo)
        for p in range(len(prompts)):
            rows = slice(p * G, (p + 1) * G)
            if g.dynamic_sampling and np.all(r[rows] == r[rows][0]):
                continue
            kept.append((rb, rows, r[rows], adv[rows]))
        if len(kept) >= P or not g.dynamic_sampling:
            break
    kept = kept[:P]
    L = common.seq_len(cfg)
    B = P * G
    out = {"tokens": np.zeros((B, L), np.int32), "mask": np.zeros((B, L), np.int32),
           "old_logp": np.zeros((B, L), np.float32), "adv": np.zeros((B,), np.float32),
           "reward": np.zeros((B,), np.float32), "domain": np.zeros((B,), np.int32)}
    for k, (rb, rows, r, a) in enumerate(kept):
        dst = slice(k * G, (k + 1) * G)
        out["tokens"][dst] = rb.tokens[rows]
        out["mask"][dst] = rb.response_mask[rows]
        out["old_logp"][dst] = rb.logprobs[rows]
        out["adv"][dst], out["reward"][dst] = a, r
        out["domain"][dst] = run.domain_ids(rb.domain[rows])
    all_r = np.concatenate(rewards_all)
    batch = GRPOBatch(tokens_BT=out["tokens"], mask_BT=out["mask"], domain_B=out["domain"],
                      sampler_logp_BT=out["old_logp"], adv_B=out["adv"], reward_B=out["reward"])
    return batch, all_r, len(kept) / P, samples, rb


def run_grpo(cfg, *, resume: bool = False, quiet: bool = False) -> common.Result:
    """GRPO for optimizer.total_steps steps on the data mix; saves OUT/model."""
    run = common.init_student(common.setup(cfg, resume=resume, quiet=quiet))
    g = cfg.grpo
    pipeline = common.make_pipeline(run, g.prompts_per_step)
    opt, state = common.new_train_state(run)
    V = run.model_cfg.vocab_size
    step = common.compile_train_step(run, opt, grpo_objective(
        clip_low=g.clip_low, clip_high=g.clip_high, kl_coef=g.kl_coef,
        aggregation="token_sum" if g.dr_grpo else "seq_mean", num_domains=len(run.domains),
        vocab_chunk=min(8192, V), aux_coef=run.model_cfg.router_aux_loss_coef,
        temperature=cfg.rollout.temperature))
    store = common.open_store(run)

    def step_fn(state, i, loop):
        batch, rewards, kept, samples, _ = collect_groups(run, state["params"], pipeline, i)
        for d, n in samples.items():
            loop.count(d, n)
        if g.kl_coef > 0:
            batch = batch.replace(ref_logp_BT=_pad_left(shd.to_host(token_logprobs_step(
                run.graphdef, run.init_params, batch.tokens_BT,
                temperature=cfg.rollout.temperature, vocab_chunk=min(8192, V)))))
        state, metrics = step(state, batch)
        host = {"grpo/sample_reward": float(rewards.mean()), "grpo/kept_groups": kept,
                **loop.sample_metrics()}
        rows = None
        if store is not None:
            rows = dict(tokens=batch.tokens_BT, prompt_len=_prompt_len(batch),
                        length=batch.mask_BT.sum(1) + _prompt_len(batch),
                        sampler_logp=batch.sampler_logp_BT, reward=batch.reward_B,
                        domains=[run.domains[d] for d in batch.domain_B])
        return state, metrics, host, rows

    state, loop = common.train_loop(run, state, step_fn, pipeline=pipeline,
                                    total_steps=cfg.optimizer.total_steps, resume=resume,
                                    prefix="grpo", store=store)
    return common.finish(run, state["params"], loop)


def _pad_left(logp_BT1: np.ndarray) -> np.ndarray:
    """[B, T-1] log-probs of tokens 1.. -> [B, T] aligned with tokens (position 0 gets 0)."""
    return np.pad(logp_BT1, ((0, 0), (1, 0)))


def _prompt_len(batch) -> np.ndarray:
    m = batch.mask_BT
    first = np.argmax(m > 0, axis=1)
    return np.where(m.any(1), first, 0).astype(np.int32)


