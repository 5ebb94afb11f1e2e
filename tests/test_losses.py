"""Losses: chunked == naive full softmax, estimator properties, weighting, metrics (GRPO:
test_grpo.py)."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mopd_jax import chunked, losses
from mopd_jax import estimators
from mopd_jax.estimators import DistillBatch, DistillLossConfig, TeacherScores

DTYPE = jnp.float32
EPS = float(jnp.finfo(DTYPE).eps)
ATOL = 100 * EPS  # values
GTOL = 1000 * EPS  # gradients

B, T, D, V = 3, 5, 8, 23
N = B * T
CHUNKS = dict(vocab_chunk=5, seq_chunk=4)  # divide neither V=23 nor N=15
WHOLE = dict(vocab_chunk=V, seq_chunk=N)


def close(a, b, atol=ATOL):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=atol)


@functools.cache
def problem(seed=0):
    ks = jax.random.split(jax.random.key(seed), 7)
    h = jax.random.normal(ks[0], (B, T, D), DTYPE)
    w = 0.7 * jax.random.normal(ks[1], (D, V), DTYPE)
    th = h + 0.5 * jax.random.normal(ks[2], (B, T, D), DTYPE)
    tw = w + 0.5 * jax.random.normal(ks[3], (D, V), DTYPE)
    tokens = jax.random.randint(ks[4], (B, T), 0, V)
    lens = jnp.array([4, 1, 2])  # one prompt token, then responses of unequal length
    t = jnp.arange(T)[None]
    mask = ((t >= 1) & (t < 1 + lens[:, None])).astype(DTYPE)
    logp = jnp.take_along_axis(naive_logp(h, w), tokens[..., None], -1)[..., 0]
    batch = DistillBatch(tokens, mask, jnp.array([0, 1, 1]),
                         sampler_logp_BT=logp + 0.1 * jax.random.normal(ks[5], (B, T)),
                         reward_B=jnp.array([1.0, 0.0, 1.0]))
    return h, w, th, tw, batch


def naive_logp(h, w, temperature=1.0):
    return jax.nn.log_softmax(h @ w / temperature, axis=-1)


def seq_mean(x_BT, mask_BT):
    return ((x_BT * mask_BT).sum(-1) / mask_BT.sum(-1)).mean()


# --- chunked primitives -----------------------------------------------------------------------


@pytest.mark.parametrize("chunks", [CHUNKS, dict(vocab_chunk=1, seq_chunk=1)])
def test_primitives_match_full_softmax(chunks):
    h, w, _, _, batch = problem()
    ids = jnp.stack([batch.tokens_BT, (batch.tokens_BT + 7) % V], -1)

    def chunked_fns(h, w):
        return (chunked.chunked_logsumexp(h.reshape(N, D), w, **chunks),
                chunked.chunked_gather_logprobs(h, w, ids, temperature=0.7, **chunks),
                chunked.chunked_entropy(h, w, **chunks))

    def naive_fns(h, w):
        lp = naive_logp(h, w)
        return (jax.nn.logsumexp(h.reshape(N, D) @ w, -1),
                jnp.take_along_axis(naive_logp(h, w, 0.7), ids, -1),
                -(jnp.exp(lp) * lp).sum(-1))

    for got, want in zip(jax.jit(chunked_fns)(h, w), naive_fns(h, w)):
        close(got, want)
    probe = lambda fns: lambda h, w: sum((jnp.sin(o) * o).sum() for o in fns(h, w))  # noqa: E731
    for got, want in zip(jax.jit(jax.grad(probe(chunked_fns), (0, 1)))(h, w),
                         jax.jit(jax.grad(probe(naive_fns), (0, 1)))(h, w)):
        close(got, want, GTOL)
    top_ids, top_lp = jax.jit(lambda h, w: chunked.chunked_topk(h, w, 6, **chunks))(h, w)
    want_lp, want_ids = jax.lax.top_k(naive_logp(h, w), 6)
    np.testing.assert_array_equal(top_ids, want_ids)
    close(top_lp, want_lp)


def test_token_logprobs_with_temperature():
    h, w, _, _, batch = problem()
    got = chunked.chunked_token_logprobs(h, w, batch.tokens_BT, temperature=1.7, **CHUNKS)
    want = jnp.take_along_axis(naive_logp(h, w, 1.7), batch.tokens_BT[..., None], -1)[..., 0]
    close(got, want)


def test_bf16_inputs_get_fp32_softmax_math():
    h, w, _, _, batch = problem()
    h16, w16 = h.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    f = lambda h, w: chunked.chunked_token_logprobs(h, w, batch.tokens_BT, **CHUNKS)  # noqa: E731
    logp, grads = jax.jit(lambda h, w: (f(h, w), jax.grad(lambda *a: f(*a).sum(), (0, 1))(h, w)))(
        h16, w16)
    upcast = naive_logp(h16.astype(DTYPE), w16.astype(DTYPE))
    close(logp, jnp.take_along_axis(upcast, batch.tokens_BT[..., None], -1)[..., 0])
    assert logp.dtype == DTYPE and [g.dtype for g in grads] == [jnp.bfloat16] * 2


def test_backward_never_holds_a_tokens_by_vocab_array():
    """Compile-only: XLA's temp buffer stays far below one [N, V] fp32 array."""
    n, v = 128, 4096
    h, w = jnp.ones((1, n, 8)), jnp.ones((8, v))
    f = lambda h, w: chunked.chunked_reverse_kl(  # noqa: E731
        h, w, h, w, vocab_chunk=512, seq_chunk=32).sum()
    stats = jax.jit(jax.grad(f, (0, 1))).lower(h, w).compile().memory_analysis()
    assert stats is not None, "XLA:CPU reports memory_analysis; the tests run on CPU"
    assert stats.temp_size_in_bytes < n * v * 4 / 4


def test_sharded_tokens_and_vocab_stay_sharded():
    """Strided chunks on a 2x4 mesh: no all-gather of h or w, same values as unsharded."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    spec = jax.sharding.PartitionSpec
    ks = jax.random.split(jax.random.key(7), 2)
    h, w = jax.random.normal(ks[0], (2, 8, 8)), jax.random.normal(ks[1], (8, 64))
    f = jax.jit(jax.value_and_grad(lambda h, w: chunked.chunked_reverse_kl(
        h, w, 0.5 * h, w, vocab_chunk=16, seq_chunk=8).sum(), (0, 1)))
    h_sharded = jax.device_put(h, jax.NamedSharding(mesh, spec("data")))
    w_sharded = jax.device_put(w, jax.NamedSharding(mesh, spec(None, "model")))
    assert "all-gather" not in f.lower(h_sharded, w_sharded).compile().as_text()
    for got, want in zip(jax.tree.leaves(f(h_sharded, w_sharded)), jax.tree.leaves(f(h, w))):
        close(got, want, GTOL)


# --- shared compiled losses (one compile per configuration for the whole file) ----------------


def config(estimator, chunks=CHUNKS):
    return DistillLossConfig(estimator=estimator, num_domains=2, topk=4, teacher_temperature=1.3,
                             **chunks)


score = jax.jit(estimators.score_teacher, static_argnums=0)


@functools.partial(jax.jit, static_argnums=0)
def distill(cfg, h, w, teacher, batch):
    """((loss, metrics), (dloss/dh, dloss/dw)) of `distill_loss`."""
    return jax.value_and_grad(lambda h, w: estimators.distill_loss(cfg, h, w, teacher, batch),
                              (0, 1), has_aux=True)(h, w)


@functools.partial(jax.jit, static_argnames=("beta", "vocab_chunk", "seq_chunk"))
def gkd(h, w, th, tw, mask, *, beta, vocab_chunk, seq_chunk):
    """((loss, metrics), grads) of `gkd_loss`."""
    return jax.value_and_grad(
        lambda h, w: losses.gkd_loss(h, w, th, tw, mask, beta=beta, vocab_chunk=vocab_chunk,
                                     seq_chunk=seq_chunk), (0, 1), has_aux=True)(h, w)


@functools.partial(jax.jit, static_argnames=("vocab_chunk", "seq_chunk"))
def sft(h, w, tokens, mask, *, vocab_chunk, seq_chunk):
    return jax.value_and_grad(
        lambda h, w: losses.sft_loss(h, w, tokens, mask, vocab_chunk=vocab_chunk,
                                     seq_chunk=seq_chunk), (0, 1), has_aux=True)(h, w)


def run_loss(name, h, w, th, tw, batch, chunks=CHUNKS):
    """(loss, metrics, grads) of one named loss."""
    if name in "ABC":
        cfg = config(name, chunks)
        (loss, metrics), grads = distill(cfg, h, w, score(cfg, th, tw, batch.tokens_BT), batch)
    elif name == "sft":
        (loss, metrics), grads = sft(h, w, batch.tokens_BT, batch.mask_BT, **chunks)
    else:
        beta = {"forward_kl": 0.0, "jsd": 0.4, "reverse_kl": 1.0}[name]
        (loss, metrics), grads = gkd(h, w, th, tw, batch.mask_BT, beta=beta, **chunks)
    return loss, metrics, grads


# --- estimator C and the full-vocabulary divergences --------------------------------------------


def reverse_kl_BT(a, b):
    return (jnp.exp(a) * (a - b)).sum(-1)


def test_exact_reverse_kl_matches_naive_value_and_gradient():
    h, w, th, tw, batch = problem()
    loss, metrics, grads = run_loss("C", h, w, th, tw, batch)

    def naive(h, w):
        return seq_mean(reverse_kl_BT(naive_logp(h, w, 1.3), naive_logp(th, tw, 1.3)),
                        batch.mask_BT)

    close(loss, naive(h, w))
    for got, want in zip(grads, jax.jit(jax.grad(naive, (0, 1)))(h, w)):
        close(got, want, GTOL)
    kl_BT = reverse_kl_BT(naive_logp(h, w, 1.3), naive_logp(th, tw, 1.3))  # metric: token mean
    close(metrics["kl"], (kl_BT * batch.mask_BT).sum() / batch.mask_BT.sum())


@pytest.mark.parametrize("name", ["A", "B"])
def test_sampled_and_topk_estimators_match_their_definitions(name):
    h, w, th, tw, batch = problem()
    loss, _, grads = run_loss(name, h, w, th, tw, batch)
    t_all = naive_logp(th, tw, 1.3)
    tok = batch.tokens_BT[..., None]

    def naive(h, w):
        s_all = naive_logp(h, w, 1.3)  # the student too is at the sampling temperature
        s = jnp.take_along_axis(s_all, tok, -1)[..., 0]
        if name == "A":
            adv = jnp.clip(jnp.take_along_axis(t_all, tok, -1)[..., 0] - s, -5.0, 5.0)
            ratio = jnp.exp(s - batch.sampler_logp_BT)
            w_is = jnp.where((ratio >= 0.2) & (ratio <= 5.0), ratio, 0.0)
            per_tok = -jax.lax.stop_gradient(w_is * adv) * s
        else:
            t_top, ids = jax.lax.top_k(t_all, 4)
            s_top = jnp.take_along_axis(s_all, ids, -1)
            per_tok = (jnp.exp(s_top) * (s_top - t_top) - jnp.exp(s_top) + jnp.exp(t_top)).sum(-1)
        return seq_mean(per_tok, batch.mask_BT)

    close(loss, naive(h, w))
    for got, want in zip(grads, jax.jit(jax.grad(naive, (0, 1)))(h, w)):
        close(got, want, GTOL)


@pytest.mark.parametrize("name", ["forward_kl", "jsd", "reverse_kl"])
def test_gkd_divergences_match_naive(name):
    h, w, th, tw, batch = problem()
    loss, _, grads = run_loss(name, h, w, th, tw, batch)
    beta = {"forward_kl": 0.0, "jsd": 0.4, "reverse_kl": 1.0}[name]

    def naive(h, w):
        a, b = naive_logp(h, w), naive_logp(th, tw)
        if beta == 0.0:
            d = jnp.exp(b) * (b - a)
        elif beta == 1.0:
            d = jnp.exp(a) * (a - b)
        else:
            m = jnp.log(beta * jnp.exp(b) + (1 - beta) * jnp.exp(a))
            d = beta * jnp.exp(b) * (b - m) + (1 - beta) * jnp.exp(a) * (a - m)
        return (d.sum(-1) * batch.mask_BT).sum() / batch.mask_BT.sum()

    close(loss, naive(h, w))
    for got, want in zip(grads, jax.jit(jax.grad(naive, (0, 1)))(h, w)):
        close(got, want, GTOL)


def test_stacked_teacher_heads_route_per_sequence():
    h, w, th, tw, batch = problem()
    tw_MDV = jnp.stack([tw, -tw])
    teacher = TeacherScores(hidden_BTD=th, w=tw_MDV)  # routed by batch.domain_ids_B
    (loss, _), _ = distill(config("C"), h, w, teacher, batch)
    b = jnp.einsum("btd,bdv->btv", th, tw_MDV[batch.domain_ids_B]) / 1.3
    close(loss, seq_mean(reverse_kl_BT(naive_logp(h, w, 1.3), jax.nn.log_softmax(b, -1)),
                         batch.mask_BT))


# --- chunked == unchunked for every loss -----------------------------------------------------


@pytest.mark.parametrize("name", ["A", "B", "C", "forward_kl", "jsd", "sft"])
def test_chunked_equals_unchunked(name):
    h, w, th, tw, batch = problem()
    loss_c, _, grads_c = run_loss(name, h, w, th, tw, batch, CHUNKS)
    loss_w, _, grads_w = run_loss(name, h, w, th, tw, batch, WHOLE)
    close(loss_c, loss_w)
    for got, want in zip(grads_c, grads_w):
        close(got, want, GTOL)


# --- estimator A: unbiased gradient of the reverse KL -----------------------------------------


@pytest.mark.parametrize("off_policy", [False, True])
def test_sampled_token_gradient_is_unbiased_for_reverse_kl(off_policy):
    v, reps = 6, 8
    ks = jax.random.split(jax.random.key(3), 4)
    theta = jax.random.normal(ks[0], (v,))
    teacher_lp = jax.nn.log_softmax(jax.random.normal(ks[1], (v,)))
    # An off-policy sampler stays near the trainer, as a rollout engine does; IcePop band open.
    sampler_lp = jax.nn.log_softmax(theta + 0.3 * jax.random.normal(ks[2], (v,)) * off_policy)
    cfg = DistillLossConfig(a_max=1e3, is_low=0.0, is_high=1e9)

    def sample_loss(theta, y):  # one sequence of one token
        lp = jax.nn.log_softmax(theta)[y]
        batch = DistillBatch(jnp.full((1, 1), y), jnp.ones((1, 1)), jnp.zeros((1,), jnp.int32),
                             sampler_logp_BT=jnp.full((1, 1), sampler_lp[y]))
        return estimators.pg_distill_loss(cfg, lp.reshape(1, 1), teacher_lp[y].reshape(1, 1),
                                      batch)[0]

    ys = jax.random.categorical(ks[3], sampler_lp, shape=(reps, 4000))
    g_RNV = jax.jit(jax.vmap(jax.vmap(jax.grad(sample_loss), (None, 0)), (None, 0)))(theta, ys)
    exact = jax.grad(lambda t: (jnp.exp(jax.nn.log_softmax(t)) *
                                (jax.nn.log_softmax(t) - teacher_lp)).sum())(theta)

    def err(n):
        return jnp.linalg.norm(g_RNV[:, :n].mean(1) - exact, axis=-1)

    sigma = jnp.sqrt(((g_RNV - g_RNV.mean((0, 1))) ** 2).sum(-1).mean())
    assert err(4000).mean() < err(250).mean() / 2
    assert jnp.all(err(4000) < 4 * sigma / math.sqrt(4000))
    # The sign: -A_hat log pi with A_hat = teacher - student descends the KL, not ascends it.
    assert jnp.linalg.norm(g_RNV.mean((0, 1)) + exact) > 10 * err(4000).max()


# --- estimator B ------------------------------------------------------------------------------


def _free_student(logits_V):
    """h = 1, w = logits: the student distribution is softmax(logits) with logits trainable."""
    return jnp.ones((1, 1, 1)), logits_V[None, :]


def test_topk_value_is_not_renormalised():
    p_s = jnp.array([0.4, 0.3, 0.2, 0.1])
    ids, p_t = jnp.array([0, 1]), jnp.array([0.5, 0.2])
    h, w = _free_student(jnp.log(p_s))
    got = chunked.chunked_topk_kl(h, w, ids.reshape(1, 1, 2), jnp.log(p_t).reshape(1, 1, 2),
                                  vocab_chunk=3)
    want = (0.4 * math.log(0.4 / 0.5) - 0.4 + 0.5) + (0.3 * math.log(0.3 / 0.2) - 0.3 + 0.2)
    close(got[0, 0], want)
    renormalised = sum(q * math.log(q / r) for q, r in zip((4 / 7, 3 / 7), (5 / 7, 2 / 7)))
    assert abs(want - renormalised) > 0.01


def test_topk_minimiser_on_teacher_support_is_the_teacher():
    v, k = 11, 4
    p_t = jax.nn.softmax(jax.random.normal(jax.random.key(5), (v,)))  # top-4 hold ~80%
    lp_t, ids = jax.lax.top_k(jnp.log(p_t), k)

    def loss(logits):
        h, w = _free_student(logits)
        return chunked.chunked_topk_kl(h, w, ids.reshape(1, 1, k), lp_t.reshape(1, 1, k),
                                       vocab_chunk=4)[0, 0]

    step = lambda _, x: x - 3.0 * jax.grad(loss)(x)  # noqa: E731
    logits = jax.jit(lambda x: jax.lax.fori_loop(0, 3000, step, x))(jnp.zeros(v))
    p_s = jax.nn.softmax(logits)
    np.testing.assert_allclose(p_s[ids], p_t[ids], atol=1e-4)
    assert jnp.abs(p_s[ids] - p_t[ids] / p_t[ids].sum()).max() > 0.05  # not the renormalised one


# --- student == teacher -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["A", "B", "C", "forward_kl", "jsd"])
def test_student_equal_to_teacher_gives_zero_loss_and_gradient(name):
    h, w, _, _, batch = problem()
    # A, B, C divide student and teacher logits by the sampling temperature (1.3) alike.
    loss, _, grads = run_loss(name, h, w, h, w, batch)
    close(loss, 0.0)
    for g in grads:
        close(g, jnp.zeros_like(g), GTOL)


@pytest.mark.parametrize("name", ["A", "B", "C"])
def test_student_side_is_at_the_sampling_temperature(name):
    """The sampler logs log softmax(z / T): on the same weights every IS ratio is exactly 1."""
    h, w, th, tw, batch = problem()
    mu = jnp.take_along_axis(naive_logp(h, w, 1.3), batch.tokens_BT[..., None], -1)[..., 0]
    cfg = dataclasses.replace(config(name), is_low=0.999, is_high=1.001)
    (_, metrics), _ = distill(cfg, h, w, score(cfg, th, tw, batch.tokens_BT),
                              batch._replace(sampler_logp_BT=mu))
    close(metrics["is_masked_frac"], 0.0)


# --- estimator A's mask, clip and advantage -----------------------------------------------------


@functools.partial(jax.jit, static_argnums=0)
def _a_grad(cfg, student, teacher, batch, **kw):
    """(loss, metrics, dloss/dstudent_logp) of estimator A on explicit log-probs."""
    f = lambda s: estimators.pg_distill_loss(cfg, s, teacher, batch, **kw)  # noqa: E731
    (loss, metrics), g = jax.value_and_grad(f, has_aux=True)(student)
    return loss, metrics, g


def _flat_batch(n, **kw):
    return DistillBatch(jnp.zeros((1, n), jnp.int32), jnp.ones((1, n)), jnp.zeros((1,), jnp.int32),
                        **kw)


def test_icepop_mask_zeroes_exactly_the_out_of_band_tokens():
    ratios = jnp.array([0.1, 0.19, 0.21, 1.0, 4.9, 4.99, 5.1, 30.0])  # band [0.2, 5]
    student = jnp.log(jnp.linspace(0.05, 0.4, 8))[None]
    batch = _flat_batch(8, sampler_logp_BT=student - jnp.log(ratios))
    cfg = DistillLossConfig(aggregation="token_mean")
    _, metrics, g = _a_grad(cfg, student, student - 1.0, batch)  # A_hat = -1 everywhere
    inside = (ratios >= 0.2) & (ratios <= 5.0)
    close(g[0], jnp.where(inside, ratios / 8, 0.0))  # d/dlogp of -w*A_hat*logp/8 = w/8
    close(metrics["is_masked_frac"], 1 - inside.mean())


def test_advantage_clip_and_orm_term():
    student = jnp.log(jnp.full((2, 3), 0.2))
    teacher = student + jnp.array([[9.0, -9.0, 1.0], [0.5, -20.0, 0.0]])
    orm = jnp.array([1.5, -2.0])
    batch = DistillBatch(jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 3)), jnp.array([0, 1]),
                         orm_advantage_B=orm)
    cfg = DistillLossConfig(a_max=2.0, num_domains=2, orm_alpha=(0.5, 0.25),
                            aggregation="token_mean")
    _, metrics, g = _a_grad(cfg, student, teacher, batch)
    clipped = jnp.clip(teacher - student, -2.0, 2.0)
    adv = clipped + jnp.array([0.5 * 1.5, 0.25 * -2.0])[:, None]
    close(g, -adv / 6)
    close(metrics["abs_adv"], jnp.abs(adv).mean())
    _, _, g_no_orm = _a_grad(cfg, student, teacher, batch._replace(orm_advantage_B=None))
    close(g_no_orm, -clipped / 6)
    _, _, g_alpha = _a_grad(cfg, student, teacher, batch, alpha_B=jnp.array([1.0, 1.0]))
    close(g_alpha, -(clipped + orm[:, None]) / 6)


# --- aggregation, domain weights, DN-MOPD, gradient share ---------------------------------------


def _domain_batch():
    """Four sequences in two domains, response lengths 1, 3, 2, 4, A_hat known per token."""
    mask = (jnp.arange(4)[None] < jnp.array([1, 3, 2, 4])[:, None]).astype(DTYPE)
    student = jnp.log(jnp.full((4, 4), 0.25))
    adv = jnp.array([[1.0, 0, 0, 0], [0.5, -0.5, 2.0, 0], [-1.0, 3.0, 0, 0], [0.2, 0.1, -0.3, 1.0]])
    batch = DistillBatch(jnp.zeros((4, 4), jnp.int32), mask, jnp.array([0, 1, 0, 1]))
    return student, student + adv, adv, batch


def test_seq_mean_and_token_mean_differ_as_defined():
    student, teacher, adv, batch = _domain_batch()
    m = batch.mask_BT
    per_tok = -adv * student  # w = 1
    for agg, want in [("seq_mean", seq_mean(per_tok, m)),
                      ("token_mean", (per_tok * m).sum() / m.sum()),
                      ("token_sum", (per_tok * m).sum() / m.size)]:
        cfg = DistillLossConfig(num_domains=2, aggregation=agg)
        loss, _, _ = _a_grad(cfg, student, teacher, batch)
        close(loss, want)
    assert abs(seq_mean(per_tok, m) - (per_tok * m).sum() / m.sum()) > 0.1


def test_domain_weights_scale_each_domains_contribution():
    student, teacher, _, batch = _domain_batch()
    plain = DistillLossConfig(num_domains=2)
    weighted = DistillLossConfig(num_domains=2, domain_weights=(2.0, 0.5))
    loss0, m0, _ = _a_grad(plain, student, teacher, batch)
    loss1, m1, _ = _a_grad(weighted, student, teacher, batch)
    close(m1["loss/domain"], m0["loss/domain"] * jnp.array([2.0, 0.5]))
    close(loss1, (m0["loss/domain"] * jnp.array([2.0, 0.5])).sum())
    close(loss0, m0["loss/domain"].sum())


def test_dn_rescale_matches_hand_computation():
    student, teacher, adv, batch = _domain_batch()
    r, m, d = np.asarray(adv), np.asarray(batch.mask_BT) > 0, np.array([0, 1, 0, 1])
    sigma_all = r[m].std()
    sigma = [r[m & (d[:, None] == k)].std() for k in range(2)]
    want = np.clip(sigma_all / np.array(sigma), 0.25, 4.0)
    cfg = DistillLossConfig(num_domains=2, dn_rescale=True, domain_weights=(1.0, 3.0))
    loss, metrics, _ = _a_grad(cfg, student, teacher, batch)
    close(metrics["domain_scale/domain"], want * np.array([1.0, 3.0]))
    _, plain, _ = _a_grad(DistillLossConfig(num_domains=2), student, teacher, batch)
    close(loss, (plain["loss/domain"] * want * np.array([1.0, 3.0])).sum())
    # Domain 0 spread wide, domain 1 narrow: sigma_all/sigma_d ~ 0.6 and ~60, clipped both sides.
    spread = adv * jnp.array([10.0, 0.01, 10.0, 0.01])[:, None]
    clipped = losses.dn_rescale_weights(spread, batch.mask_BT, batch.domain_ids_B, 2, (0.7, 4.0))
    close(clipped, jnp.array([0.7, 4.0]))


def test_grad_token_share_sums_to_one_and_matches_hand_count():
    student, teacher, adv, batch = _domain_batch()
    m, d = batch.mask_BT, batch.domain_ids_B
    _, metrics, _ = _a_grad(DistillLossConfig(num_domains=2, aggregation="token_mean"),
                            student, teacher, batch)
    per_dom = jnp.array([(jnp.abs(adv) * m)[d == k].sum() for k in range(2)])
    close(metrics["grad_token_share/domain"], per_dom / per_dom.sum())
    close(metrics["grad_token_share"], 1.0)
    close(metrics["resp_len/domain"], jnp.array([1.5, 3.5]))
    # B and C have no per-token scalar, so the share is the aggregation weight: under seq_mean
    # each sequence weighs 1/B whatever its length; domain 1 holds 2 of the 3 sequences.
    _, metrics, _ = run_loss("C", *problem())
    close(metrics["grad_token_share/domain"], jnp.array([1 / 3, 2 / 3]))


# --- metrics and jit ----------------------------------------------------------------------------


def test_every_estimator_jits_and_logs_the_same_metrics():
    h, w, th, tw, batch = problem()  # `distill` and `score` are jitted; the batch has rewards
    keys = None
    for est in "ABC":
        loss, metrics, grads = run_loss(est, h, w, th, tw, batch)
        assert jnp.isfinite(loss) and all(jnp.isfinite(g).all() for g in grads)
        for name in ("kl", "abs_adv", "is_masked_frac", "entropy", "resp_len",
                     "grad_token_share", "reward"):
            assert metrics[name].shape == () and metrics[name + "/domain"].shape == (2,)
        keys = keys or set(metrics)
        assert set(metrics) == keys
    close(metrics["reward/domain"], jnp.array([1.0, 0.5]))
    close(metrics["resp_len/domain"], jnp.array([4.0, 1.5]))
    grpo = jax.jit(lambda lp, r: losses.grpo_loss(
        lp, lp, losses.group_advantages(r, 3), batch.mask_BT, batch.domain_ids_B, num_domains=2,
        ref_logp_BT=jnp.zeros((B, T)), kl_coef=0.1))
    loss, metrics = grpo(jnp.full((B, T), -1.0), jnp.arange(3.0))
    assert jnp.isfinite(loss) and metrics["grad_token_share/domain"].shape == (2,)


def test_domain_ids_only_sort_metrics_when_there_are_no_domain_weights():
    h, w, _, _, batch = problem()
    mask, tokens = batch.mask_BT, batch.tokens_BT
    one = sft(h, w, tokens, mask, **CHUNKS)[0][0]
    unknown = losses.sft_loss(h, w, tokens, mask, jnp.array([0, 3, 1]), **CHUNKS)[0]
    close(unknown, one)  # domain 3 with num_domains=1 still trains


def test_config_rejects_bad_fields_with_their_name():
    with pytest.raises(ValueError, match="estimator"):
        DistillLossConfig(estimator="D")
    with pytest.raises(ValueError, match="domain_weights"):
        DistillLossConfig(num_domains=3, domain_weights=(1.0, 2.0))
    with pytest.raises(ValueError, match="TeacherScores.hidden_BTD"):
        h, w, _, _, batch = problem()
        estimators.distill_loss(DistillLossConfig(estimator="C"), h, w, TeacherScores(), batch)


@pytest.mark.parametrize("name,beta", [("FKL", 0.0), ("JSD", 0.5)])
def test_gkd_estimator_objects_are_the_exact_divergences_at_temperature(name, beta):
    """The 'FKL' / 'JSD' MOPD estimators (estimators/gkd.py): exact on the tiny vocabulary,
    student and teacher both at the sampling temperature, routed per domain like C."""
    h, w, th, tw, batch = problem()
    cfg = config(name, CHUNKS)
    (loss, metrics), grads = distill(cfg, h, w, score(cfg, th, tw, batch.tokens_BT), batch)

    def naive(h, w):
        a, b = naive_logp(h, w, 1.3), naive_logp(th, tw, 1.3)
        if beta == 0.0:
            d = jnp.exp(b) * (b - a)
        else:
            m = jnp.log(beta * jnp.exp(b) + (1 - beta) * jnp.exp(a))
            d = beta * jnp.exp(b) * (b - m) + (1 - beta) * jnp.exp(a) * (a - m)
        return seq_mean(d.sum(-1), batch.mask_BT)

    close(loss, naive(h, w))
    for got, want in zip(grads, jax.jit(jax.grad(naive, (0, 1)))(h, w)):
        close(got, want, GTOL)
    assert estimators.get(name).stacked == ("w",) and float(metrics["kl"]) > 0


def test_gkd_loss_tempers_student_and_teacher():
    """`gkd_loss(temperature=T)` divides both sides' logits by T, not only the teacher's."""
    h, w, th, tw, batch = problem()
    loss, _ = jax.jit(functools.partial(losses.gkd_loss, beta=0.0, temperature=1.7,
                                        **CHUNKS))(h, w, th, tw, batch.mask_BT)
    b = naive_logp(th, tw, 1.7)
    for a, want_equal in ((naive_logp(h, w, 1.7), True), (naive_logp(h, w), False)):
        naive = ((jnp.exp(b) * (b - a)).sum(-1) * batch.mask_BT).sum() / batch.mask_BT.sum()
        assert np.isclose(float(loss), float(naive), rtol=ATOL, atol=ATOL) == want_equal
