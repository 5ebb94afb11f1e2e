"""GRPO: group advantages, the PPO-clip loss, Dr. GRPO, padding rows (out of the loss, its
gradient and the metrics), and dynamic sampling (which groups are kept, only the missing
prompts redrawn, every drawn rollout counted, padding rows never stored)."""

import dataclasses
import functools
import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mopd_jax import losses
from mopd_jax.recipes.grpo import pack_groups, select_groups, store_rows

ATOL = 100 * float(jnp.finfo(jnp.float32).eps)


def close(a, b, atol=ATOL):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=atol)



def test_group_advantages_by_hand():
    r = jnp.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # second group constant
    adv = jax.jit(lambda r: losses.group_advantages(r, 4))(r)
    g = np.array([1.0, 0.0, 0.0, 1.0])
    close(adv[:4], (g - g.mean()) / (g.std(ddof=1) + 1e-6))
    np.testing.assert_array_equal(adv[4:], 0.0)
    close(losses.group_advantages(r, 4, normalize_std=False)[:4], g - g.mean())


def test_ppo_clip_and_k3_kl():
    ratio = jnp.array([1.5, 0.5, 1.5, 1.1])
    old = jnp.log(jnp.full((1, 4), 0.5))
    logp = old + jnp.log(ratio)[None]
    adv, mask = jnp.array([1.0]), jnp.ones((1, 4))

    @functools.partial(jax.jit, static_argnames=("clip_high", "kl_coef"))
    def f(lp, adv, **kw):
        return jax.value_and_grad(lambda lp: losses.grpo_loss(
            lp, old, adv, mask, aggregation="token_mean", **kw), has_aux=True)(lp)

    (loss, metrics), g = f(logp, adv)
    # A > 0: ratio above 1 + 0.2 is clipped (no gradient); ratio below 1 - 0.2 is not.
    close(g[0], -jnp.array([0.0, 0.5, 0.0, 1.1]) / 4)
    close(loss, -jnp.minimum(ratio, jnp.clip(ratio, 0.8, 1.2)).mean())
    close(metrics["clip_frac"], 0.5)
    _, g_neg = f(logp, -adv)
    close(g_neg[0], jnp.array([1.5, 0.0, 1.5, 1.1]) / 4)  # A < 0: low side clips instead
    _, g_hi = f(logp, adv, clip_high=0.6)
    close(g_hi[0], -ratio / 4)  # clip_high widens only the upper side
    ref = logp + 0.3
    (l_kl, m_kl), g_kl = f(logp, adv, ref_logp_BT=ref, kl_coef=0.1)
    close(m_kl["kl_ref"], math.exp(0.3) - 0.3 - 1)
    close(g_kl - g, 0.1 * (1 - math.exp(0.3)) / 4)
    close(l_kl, loss + 0.1 * (math.exp(0.3) - 0.3 - 1))
    close(f(logp, adv, ref_logp_BT=logp, kl_coef=0.1)[0][0], loss)


def test_dr_grpo_has_no_length_normalisation():
    lp = jnp.log(jnp.full((2, 4), 0.5))
    mask = jnp.array([[1.0, 0, 0, 0], [1, 1, 1, 1]])
    adv = losses.group_advantages(jnp.array([1.0, 0.0]), 2, normalize_std=False)
    loss, _ = losses.grpo_loss(lp, lp, adv, mask, aggregation="token_sum")
    close(loss, -(0.5 * 1 + -0.5 * 4) / 8)  # ratio 1: sum_t -A over all tokens / (B*T)




# --- padding rows ------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("aggregation",))
def _grpo_grad(logp, old, adv, mask, domain, reward, *, aggregation):
    return jax.value_and_grad(lambda lp: losses.grpo_loss(
        lp, old, adv, mask, domain, num_domains=3, aggregation=aggregation, clip_high=0.28,
        reward_B=reward), has_aux=True)(logp)


@pytest.mark.parametrize("aggregation", ["seq_mean", "token_sum", "token_mean"])
def test_padding_rows_change_neither_the_gradient_nor_the_metrics(aggregation):
    """The same 4 real rows (domains 1, 2) with 0, 2 or 6 padding rows (no response token,
    advantage 0, reward 0, domain 0) behind them: same loss, gradient and metrics."""
    rng = np.random.default_rng(0)
    T = 6
    lens = np.array([2, 5, 3, 4])
    mask = (np.arange(T)[None] >= 1) & (np.arange(T)[None] < 1 + lens[:, None])
    old = np.log(rng.uniform(0.2, 0.9, (4, T))).astype(np.float32)
    logp = (old + 0.3 * rng.normal(size=(4, T))).astype(np.float32)
    adv = np.array([1.0, -0.5, 0.8, -1.3], np.float32)
    reward, domain = np.array([1.0, 0.0, 1.0, 0.5], np.float32), np.array([1, 2, 1, 2])
    ref = None
    for pad in (0, 2, 6):
        def padded(x, fill=0):
            return np.concatenate([x, np.full((pad, *x.shape[1:]), fill, x.dtype)])
        (loss, m), g = _grpo_grad(padded(logp), padded(old), padded(adv),
                                  padded(mask.astype(np.float32)), padded(domain),
                                  padded(reward), aggregation=aggregation)
        assert np.all(np.asarray(g)[4:] == 0.0)
        got = (loss, np.asarray(g)[:4], m["reward"], m["reward/domain"], m["resp_len"],
               m["resp_len/domain"], m["abs_adv"], m["clip_frac"])
        if ref is None:
            ref = got
            close(m["reward"], reward.mean())
            close(m["resp_len"], lens.mean())
            close(m["reward/domain"], [0.0, 1.0, 0.25])  # nothing in domain 0
        else:
            for a, b in zip(got, ref):
                close(a, b)
    assert float(ref[0]) != 0.0


# --- dynamic sampling --------------------------------------------------------------------------

G, L = 2, 5


@dataclasses.dataclass
class FakeRollouts:
    """What select/pack/store read of a RolloutBatch: prompt ids live in the tokens."""

    tokens: np.ndarray
    response_mask: np.ndarray
    logprobs: np.ndarray
    domain: list
    expert_ids: np.ndarray | None = None  # router replay's record: [R, L, L_moe, k]


def fake_draw(plan, routed=False):
    """draw(n, round) over a fixed plan: per round, one (prompt id, domain, rewards) per
    prompt; asserts that exactly the missing number of prompts is asked for."""
    calls = []

    def draw(n, round_):
        prompts = plan[round_]
        assert n == len(prompts), (n, round_)
        calls.append(n)
        rows = [(pid, d, r) for pid, d, rs in prompts for r in rs]
        tokens = np.array([[pid, 7, 7, 0, 0] for pid, _, _ in rows], np.int32)
        mask = np.array([[0, 1, 1, 0, 0]] * len(rows), bool)
        ids = (np.broadcast_to(tokens[:, :, None, None], (*tokens.shape, 2, 2)).astype(np.uint8)
               if routed else None)  # each row's experts name its prompt id
        rb = FakeRollouts(tokens, mask, np.where(mask, -0.5, 0.0).astype(np.float32),
                          [d for _, d, _ in rows], ids)
        return rb, np.array([r for _, _, r in rows], np.float32)
    return draw, calls


def test_dynamic_sampling_redraws_only_the_missing_groups():
    plan = [[(10, "add", (1, 0)), (11, "add", (1, 1)), (12, "sort", (0, 1)),
             (13, "sort", (0, 0))],                       # round 0: 2 of 4 groups vary
            [(20, "add", (0, 0)), (21, "sort", (1, 0))],  # round 1: the 2 missing, 1 kept
            [(30, "add", (1, 1))]]                        # round 2: the last one, dropped
    draw, calls = fake_draw(plan)
    groups = select_groups(draw, 4, G, dynamic=True, rounds=2)
    assert calls == groups.drawn == [4, 2, 1]
    assert [int(rb.tokens[rows][0, 0]) for rb, rows, _ in groups.kept] == [10, 12, 21]
    assert groups.samples == {"add": 8, "sort": 6}  # (4 + 2 + 1) prompts x G, kept or not
    assert len(groups.rewards) == 14

    domains = ("add", "sort")
    batch, real = pack_groups(groups, 4, G, L, lambda names: np.asarray(
        [domains.index(d) for d in names], np.int32), normalize_std=False)
    assert real == 3 * G and batch.tokens_BT.shape == (4 * G, L)
    np.testing.assert_array_equal(batch.tokens_BT[:real, 0], [10, 10, 12, 12, 21, 21])
    np.testing.assert_array_equal(batch.adv_B[:real], [0.5, -0.5, -0.5, 0.5, 0.5, -0.5])
    assert not batch.mask_BT[real:].any() and not batch.adv_B[real:].any()

    rows = store_rows(SimpleNamespace(domains=domains), batch, real)
    assert len(rows["tokens"]) == real == len(rows["reward"])  # no padding row stored
    assert rows["domains"] == ["add", "add", "sort", "sort", "sort", "sort"]
    np.testing.assert_array_equal(rows["prompt_len"], 1)
    np.testing.assert_array_equal(rows["length"], 3)
    np.testing.assert_array_equal(rows["reward"], [1, 0, 0, 1, 1, 0])


def test_router_replay_packs_each_kept_group_with_its_own_routing():
    plan = [[(10, "add", (1, 0)), (11, "add", (1, 1)), (12, "add", (0, 0))],
            [(20, "add", (0, 1)), (21, "add", (1, 1))]]  # 1 + 1 kept, the third is padding
    draw, _ = fake_draw(plan, routed=True)
    groups = select_groups(draw, 3, G, dynamic=True, rounds=1)
    batch, real = pack_groups(groups, 3, G, L, lambda names: np.zeros(len(names), np.int32),
                              normalize_std=False)
    assert batch.expert_ids_BTLk.shape == (3 * G, L, 2, 2)
    np.testing.assert_array_equal(batch.expert_ids_BTLk[:real, 0, 0, 0], [10, 10, 20, 20])
    assert not batch.expert_ids_BTLk[real:].any()


def test_dynamic_sampling_stops_once_full_and_off_keeps_every_group():
    plan = [[(10, "add", (1, 0)), (11, "add", (1, 1))], [(20, "add", (0, 1))]]
    draw, calls = fake_draw(plan)
    groups = select_groups(draw, 2, G, dynamic=True, rounds=5)
    assert calls == [2, 1] and len(groups.kept) == 2  # full after round 1: no round 2
    draw, calls = fake_draw(plan)
    groups = select_groups(draw, 2, G, dynamic=False, rounds=5)
    assert calls == [2] and len(groups.kept) == 2 and groups.samples == {"add": 4}
