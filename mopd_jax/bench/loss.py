"""``mopd bench loss``: XLA's compiled temp memory of the chunked estimators vs naive full logits.

Shapes default to the issue's: V = 151,936, 8 x 4096 tokens, hidden 2048. Both versions compute
loss and gradients w.r.t. the student's hidden states and lm_head; only compilation happens
(``memory_analysis`` of the compiled executable), so the naive version never runs.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from mopd_jax.bench import print_environment
from mopd_jax.estimators import DistillBatch, DistillLossConfig, TeacherScores, distill_loss


def add_parser(sub):
    p = sub.add_parser("loss", help="compiled memory of chunked vs naive-logits MOPD losses",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--vocab-chunk", type=int, default=8192)
    p.add_argument("--seq-chunk", type=int, default=1024)
    p.add_argument("--topk", type=int, default=64)
    p.set_defaults(run=run)


def _naive(estimator, h, w, th, tw, tokens, mask, topk):
    logp = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32))
    tlogp = jax.nn.log_softmax(jnp.einsum("btd,dv->btv", th, tw,
                                          preferred_element_type=jnp.float32))
    if estimator == "C":
        per = jnp.sum(jnp.exp(logp) * (logp - tlogp), -1)
    elif estimator == "B":
        tv, ids = jax.lax.top_k(tlogp, topk)
        sv = jnp.take_along_axis(logp, ids, -1)
        per = jnp.sum(jnp.exp(sv) * (sv - tv) - jnp.exp(sv) + jnp.exp(tv), -1)
    else:
        lp = jnp.take_along_axis(logp, tokens[..., None], -1)[..., 0]
        tl = jnp.take_along_axis(tlogp, tokens[..., None], -1)[..., 0]
        per = -jax.lax.stop_gradient(jnp.clip(tl - lp, -5, 5)) * lp
    return jnp.sum(per * mask) / jnp.sum(mask)


def run(args) -> dict:
    """{'env', 'vocab', 'batch', 'seq', 'hidden', 'estimators': {A|B|C: temp bytes, ratio}}."""
    env = print_environment()
    B, T, D, V = args.batch, args.seq, args.hidden, args.vocab
    f32, bf16 = jnp.float32, jnp.bfloat16
    h = jax.ShapeDtypeStruct((B, T, D), bf16)
    w = jax.ShapeDtypeStruct((D, V), bf16)
    tokens = jax.ShapeDtypeStruct((B, T), jnp.int32)
    mask = jax.ShapeDtypeStruct((B, T), f32)
    dom = jax.ShapeDtypeStruct((B,), jnp.int32)
    res = {"env": env, "vocab": V, "batch": B, "seq": T, "hidden": D, "estimators": {}}
    print(f"loss + grad(h, lm_head) memory, B={B} T={T} D={D} V={V} bf16 inputs, fp32 softmax "
          f"({jax.devices()[0].device_kind}); target chunked/naive <= 5%")
    print(f"  {'estimator':10} {'chunked temp':>14} {'naive temp':>14} {'ratio':>8}")
    for est in ("A", "B", "C"):
        cfg = DistillLossConfig(estimator=est, topk=args.topk, vocab_chunk=args.vocab_chunk,
                                seq_chunk=args.seq_chunk)

        def chunked(h, w, th, tw, tokens, mask, dom, t_lp, ids, t_topk):
            teacher = {"A": TeacherScores(logp_BT=t_lp),
                       "B": TeacherScores(logp_BT=t_lp, topk_ids_BTk=ids, topk_logp_BTk=t_topk),
                       "C": TeacherScores(hidden_BTD=th, w=tw)}[est]
            batch = DistillBatch(tokens_BT=tokens, mask_BT=mask, domain_ids_B=dom)
            return distill_loss(cfg, h, w, teacher, batch)[0]

        extra = (jax.ShapeDtypeStruct((B, T), f32),
                 jax.ShapeDtypeStruct((B, T, args.topk), jnp.int32),
                 jax.ShapeDtypeStruct((B, T, args.topk), f32))
        c = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1))).lower(
            h, w, h, w, tokens, mask, dom, *extra).compile()
        n = jax.jit(jax.value_and_grad(
            lambda *a: _naive(est, *a, args.topk), argnums=(0, 1))).lower(
            h, w, h, w, tokens, mask).compile()
        ct, nt = c.memory_analysis().temp_size_in_bytes, n.memory_analysis().temp_size_in_bytes
        res["estimators"][est] = {"chunked_temp_bytes": ct, "naive_temp_bytes": nt,
                                  "ratio": ct / nt}
        print(f"  {est:10} {ct / 2**30:11.3f} GiB {nt / 2**30:11.3f} GiB {ct / nt:8.2%}")
    return res
