"""``mopd bench moe``: ragged (sort + grouped matmul) MoE dispatch vs the dense reference path.

Both paths run the same Qwen3-30B-A3B-shaped expert layers (E=128, k=8, D=2048, F=768) on the
same tokens in one process, timed in ``--iters`` interleaved rounds (ragged, dense, ...) after a
warm-up of each; the figure is the dense/ragged time ratio (higher = ragged faster), median
(min-max) round by round, and the outputs' max difference, which must be at float32 round-off.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import preset
from models.moe import MoE
from mopd_jax.bench import fmt, interleaved, print_environment, ratios, scaled, spread


def add_parser(sub):
    p = sub.add_parser("moe", help="ragged vs dense MoE dispatch at Qwen3-30B-A3B expert shapes",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=256, help="tokens per layer call (B*T)")
    p.add_argument("--layers", type=int, default=2, help="MoE layers chained")
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--expert-ffn", type=int, default=768)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.set_defaults(run=run)


def run(args) -> dict:
    env = print_environment()
    cfg = preset("qwen3-30b-a3b", num_experts=args.experts, num_experts_per_tok=args.top_k,
                 hidden_size=args.hidden, moe_intermediate_size=args.expert_ffn,
                 dtype=args.dtype, param_dtype=args.dtype)
    blocks = [MoE(cfg, nnx.Rngs(i)) for i in range(args.layers)]
    graphdef, states = nnx.split(nnx.List(blocks))
    x = jax.random.normal(jax.random.key(0), (1, args.tokens, cfg.hidden_size),
                          jnp.float32).astype(cfg.dtype)

    def make(impl):
        @jax.jit
        def f(states, x):
            mods = nnx.merge(graphdef, states)
            for m in mods:
                m.cfg = m.cfg.replace(moe_impl=impl)
                y, _ = m(x)
                x = x + y
            return x
        return f

    ragged, dense = make("ragged"), make("dense")
    fns = {"ragged": lambda: jax.block_until_ready(ragged(states, x)),
           "dense": lambda: jax.block_until_ready(dense(states, x))}
    for fn in fns.values():
        fn()  # compile + warm
    times, out = interleaved(fns, args.iters)
    diff = float(jnp.max(jnp.abs(out["ragged"][-1].astype(jnp.float32)
                                 - out["dense"][-1].astype(jnp.float32))))
    t_r, t_d = spread(times["ragged"]), spread(times["dense"])
    x = spread(ratios(times["dense"], times["ragged"]))
    flops_active = 2 * 3 * args.tokens * args.top_k * cfg.hidden_size * cfg.moe_intermediate_size
    res = {"env": env, "tokens": args.tokens, "layers": args.layers, "E": cfg.num_experts,
           "k": cfg.num_experts_per_tok, "hidden": cfg.hidden_size,
           "expert_ffn": cfg.moe_intermediate_size, "dtype": args.dtype, "iters": args.iters,
           "ragged_s": t_r["median"], "dense_s": t_d["median"],
           "ragged_ms": scaled(t_r, 1e3), "dense_ms": scaled(t_d, 1e3),
           "speedup_dense_over_ragged": x["median"], "x_spread": x, "max_abs_diff": diff,
           "ragged_active_gflops": flops_active * args.layers / t_r["median"] / 1e9,
           "device": jax.devices()[0].device_kind}
    print(f"MoE dispatch, E={cfg.num_experts} k={cfg.num_experts_per_tok} D={cfg.hidden_size} "
          f"F={cfg.moe_intermediate_size}, {args.tokens} tokens x {args.layers} layers, "
          f"{args.dtype}, {res['device']}; {args.iters} interleaved rounds, median (min-max)")
    print(f"  ragged (sort + ragged_dot): {fmt(res['ragged_ms'], '.2f')} ms   "
          f"({res['ragged_active_gflops']:.1f} GFLOP/s on active experts)")
    print(f"  dense reference           : {fmt(res['dense_ms'], '.2f')} ms")
    print(f"  ratio dense/ragged        : {fmt(x, '.2f')}x   max |diff| {diff:.2e}")
    return res
