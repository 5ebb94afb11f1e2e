"""GRPO recipe: domain teachers (one run per domain), and the RL baselines' inner loop.

Each step: prompts -> ``group_size`` student rollouts per prompt -> outcome rewards -> group
advantages (Dr. GRPO: no std normalisation) -> dynamic sampling -> PPO-clip train_step with
the sampler's log-probs as the behaviour policy.

Dynamic sampling (``grpo.dynamic_sampling``): a group whose rewards are all equal carries no
signal and is dropped; the next round draws only as many new prompts as groups are missing,
for at most ``grpo.resample_rounds`` rounds. Groups still missing then are padding rows
(no response tokens): they leave the loss's denominators (``losses.token_weights``), are not
written to the rollout store and are not in the reward, length or domain metrics. Every
sampled rollout counts toward the sample budget, kept or not.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mopd_jax import sharding as shd
from mopd_jax.batches import GRPOBatch
from mopd_jax.losses import group_advantages_host
from mopd_jax.recipes import common
from mopd_jax.recipes.run_loop import train_loop
from mopd_jax.sampling import rollout
from mopd_jax.steps import grpo_objective, token_logprobs_step


@dataclasses.dataclass
class Groups:
    """One step's prompt groups after dynamic sampling."""

    kept: list  # (rollout batch, row slice, rewards [G]) per kept group, in batch order
    rewards: np.ndarray  # every drawn rollout's reward (kept or not)
    samples: dict[str, int]  # drawn rollouts per domain (what the budget counts)
    drawn: list[int]  # prompts drawn per round: P, then only the missing ones


def select_groups(draw, P: int, G: int, *, dynamic: bool, rounds: int) -> Groups:
    """Fill up to ``P`` groups of ``G`` rollouts. ``draw(n, round) -> (rb, rewards [n * G])``
    samples ``n`` new prompts; round 0 draws ``P``, each later round only the groups still
    missing (at most ``rounds`` extra rounds, and none without dynamic sampling)."""
    out = Groups([], [], {}, [])
    for round_ in range(1 + (rounds if dynamic else 0)):
        need = P - len(out.kept)
        rb, r = draw(need, round_)
        out.drawn.append(need)
        out.rewards.append(np.asarray(r, np.float32))
        for d in rb.domain:
            out.samples[d] = out.samples.get(d, 0) + 1
        for p in range(need):
            rows = slice(p * G, (p + 1) * G)
            if dynamic and np.all(r[rows] == r[rows][0]):
                continue
            out.kept.append((rb, rows, np.asarray(r[rows], np.float32)))
        if len(out.kept) == P or not dynamic:
            break
    out.rewards = np.concatenate(out.rewards)
    return out


def pack_groups(groups: Groups, P: int, G: int, L: int, domain_ids, *,
                normalize_std: bool) -> tuple[GRPOBatch, int]:
    """The fixed-shape [P * G, L] batch (one compiled step) and its number of real rows; the
    rows past them are padding (mask 0, advantage 0, reward 0)."""
    B = P * G
    out = {"tokens": np.zeros((B, L), np.int32), "mask": np.zeros((B, L), np.int32),
           "old_logp": np.zeros((B, L), np.float32), "adv": np.zeros((B,), np.float32),
           "reward": np.zeros((B,), np.float32), "domain": np.zeros((B,), np.int32)}
    routed = [rb.expert_ids for rb, _, _ in groups.kept if rb.expert_ids is not None]
    if routed:  # router replay: the sampler's experts (padding rows: expert 0, masked out)
        out["expert_ids"] = np.zeros((B, L, *routed[0].shape[2:]), routed[0].dtype)
    for k, (rb, rows, r) in enumerate(groups.kept):
        dst = slice(k * G, (k + 1) * G)
        if routed:
            out["expert_ids"][dst] = rb.expert_ids[rows]
        out["tokens"][dst] = rb.tokens[rows]
        out["mask"][dst] = rb.response_mask[rows]
        out["old_logp"][dst] = rb.logprobs[rows]
        out["adv"][dst] = group_advantages_host(r, G, normalize_std=normalize_std)
        out["reward"][dst] = r
        out["domain"][dst] = domain_ids(rb.domain[rows])
    batch = GRPOBatch(tokens_BT=out["tokens"], mask_BT=out["mask"], domain_B=out["domain"],
                      sampler_logp_BT=out["old_logp"], adv_B=out["adv"], reward_B=out["reward"],
                      expert_ids_BTLk=out.get("expert_ids"))
    return batch, len(groups.kept) * G


def collect_groups(run: common.Run, params, pipeline, step: int):
    """One step's batch: (GRPOBatch, real rows, Groups)."""
    cfg, g = run.cfg, run.cfg.grpo

    def draw(n, round_):
        rb = rollout(run.engine, params, pipeline.take(n), n=g.group_size,
                     sampling=common.sampling_params(cfg),
                     seed=common.step_seed(cfg, step, round_))
        return rb, common.rewards_of(run, rb)

    groups = select_groups(draw, g.prompts_per_step, g.group_size,
                           dynamic=g.dynamic_sampling, rounds=g.resample_rounds)
    batch, real = pack_groups(groups, g.prompts_per_step, g.group_size, common.seq_len(cfg),
                              run.domain_ids, normalize_std=not g.dr_grpo)
    return batch, real, groups


def store_rows(run: common.Run, batch: GRPOBatch, real: int) -> dict:
    """The rollout store's rows of a step: the real rows only, never the padding."""
    plen = _prompt_len(batch)[:real]
    return dict(tokens=batch.tokens_BT[:real], prompt_len=plen,
                length=batch.mask_BT[:real].sum(1) + plen,
                sampler_logp=batch.sampler_logp_BT[:real], reward=batch.reward_B[:real],
                domains=[run.domains[d] for d in batch.domain_B[:real]])


def run_grpo(cfg, *, resume: bool = False, quiet: bool = False) -> common.Result:
    """GRPO for optimizer.total_steps steps on the data mix; saves OUT/model."""
    common.check_untruncated(cfg)
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
        batch, real, groups = collect_groups(run, state["params"], pipeline, i)
        for d, n in groups.samples.items():
            loop.count(d, n)
        if g.kl_coef > 0:
            batch = batch.replace(ref_logp_BT=_pad_left(shd.to_host(token_logprobs_step(
                run.graphdef, run.init_params, batch.tokens_BT,
                temperature=cfg.rollout.temperature, vocab_chunk=min(8192, V)))))
        state, metrics = step(state, batch)
        P = g.prompts_per_step
        host = {"grpo/sample_reward": float(groups.rewards.mean()),
                "grpo/kept_groups": real / (P * g.group_size),
                "grpo/first_round_kept": (min(len(groups.kept), P) if len(groups.drawn) == 1
                                          else P - groups.drawn[1]) / P,
                "grpo/rounds": len(groups.drawn), **loop.sample_metrics()}
        rows = store_rows(run, batch, real) if store is not None and real else None
        return state, metrics, host, rows

    state, loop = train_loop(run, state, step_fn, pipeline=pipeline,
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


