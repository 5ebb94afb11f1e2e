"""``mopd bench moe``: the MoE implementations (``model.moe_impl``) against the dense reference.

Every implementation runs the same Qwen3-30B-A3B-shaped expert layers (E=128, k=8, D=2048,
F=768) on the same tokens in one process: a training call (forward and the gradients of a
scalar loss with respect to the input and every weight) or, with ``--mode fwd``, the forward
alone. Timed in ``--iters`` interleaved rounds (each impl, then dense, ...) after a warm-up;
the figure is dense time / impl time (higher = faster than dense), median (min-max) round by
round, and the largest difference of outputs and gradients from dense (float32 round-off).
``blocked`` is the CPU path ``auto`` picks; ``ragged`` (``lax.ragged_dot``) is masked dense
work over every expert on XLA:CPU.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

from models.config import preset
from models.moe import MoE, resolve_impl
from mopd_jax.bench import fmt, interleaved, print_environment, ratios, scaled, spread


def add_parser(sub):
    p = sub.add_parser("moe", help="MoE implementations vs the dense path at Qwen3-30B-A3B "
                       "expert shapes", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=128, help="tokens per layer call (B*T)")
    p.add_argument("--layers", type=int, default=1, help="MoE layers chained")
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--expert-ffn", type=int, default=768)
    p.add_argument("--impls", default="auto",
                   help="comma-separated moe_impl values timed against dense (auto = this "
                        "backend's: blocked on CPU)")
    p.add_argument("--mode", choices=["train", "fwd"], default="train",
                   help="train: forward + gradients; fwd: forward only")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.set_defaults(run=run)


def _max_diff(a, b) -> float:
    return max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def run(args) -> dict:
    env = print_environment()
    cfg = preset("qwen3-30b-a3b", num_experts=args.experts, num_experts_per_tok=args.top_k,
                 hidden_size=args.hidden, moe_intermediate_size=args.expert_ffn,
                 dtype=args.dtype, param_dtype=args.dtype)
    blocks = [MoE(cfg, nnx.Rngs(i)) for i in range(args.layers)]
    graphdef, states = nnx.split(nnx.List(blocks))
    x = jax.random.normal(jax.random.key(0), (1, args.tokens, cfg.hidden_size),
                          jnp.float32).astype(cfg.dtype)
    impls = [resolve_impl(i.strip()) for i in args.impls.split(",") if i.strip()]

    def make(impl):
        def forward(states, x):
            mods = nnx.merge(graphdef, states)
            for m in mods:
                m.cfg = m.cfg.replace(moe_impl=impl)
                y, _ = m(x)
                x = x + y
            return x

        if args.mode == "fwd":
            return jax.jit(forward)
        return jax.jit(lambda s, x: jax.value_and_grad(
            lambda s, x: jnp.sum(jnp.sin(forward(s, x))), argnums=(0, 1))(s, x))

    fns = {impl: make(impl) for impl in impls + ["dense"]}
    ref = jax.block_until_ready(fns["dense"](states, x))  # compile + warm
    diffs = {}
    for impl in impls:  # one impl's result beside dense's at a time (a gradient is 2.4 GB)
        ours = jax.block_until_ready(fns[impl](states, x))
        diffs[impl] = (_max_diff(ours, ref) if args.mode == "fwd" else _max_diff(ours[0], ref[0]),
                       None if args.mode == "fwd" else _max_diff(ours[1], ref[1]))
        del ours
    del ref
    # timed calls keep no result: only the running call's buffers are alive
    def timed(f):
        def call():
            jax.block_until_ready(f(states, x))
        return call

    calls = {impl: timed(f) for impl, f in fns.items()}
    times, _ = interleaved(calls, args.iters)
    t_dense = spread(times["dense"])
    rows = {}
    for impl in impls:
        t = spread(times[impl])
        x_d = spread(ratios(times["dense"], times[impl]))
        rows[impl] = {"ms": scaled(t, 1e3), "x_dense": x_d, "max_abs_diff": diffs[impl][0],
                      "grad_max_abs_diff": diffs[impl][1]}
    flops_active = (3 if args.mode == "train" else 1) * 2 * 3 * args.tokens * args.top_k \
        * cfg.hidden_size * cfg.moe_intermediate_size * args.layers
    res = {"env": env, "tokens": args.tokens, "layers": args.layers, "E": cfg.num_experts,
           "k": cfg.num_experts_per_tok, "hidden": cfg.hidden_size,
           "expert_ffn": cfg.moe_intermediate_size, "dtype": args.dtype, "iters": args.iters,
           "mode": args.mode, "dense_ms": scaled(t_dense, 1e3), "impls": rows,
           "active_gflop": flops_active / 1e9, "device": jax.devices()[0].device_kind}
    print(f"MoE layer, {args.mode}, E={cfg.num_experts} k={cfg.num_experts_per_tok} "
          f"D={cfg.hidden_size} F={cfg.moe_intermediate_size}, {args.tokens} tokens x "
          f"{args.layers} layers, {args.dtype}, {res['device']}; {args.iters} interleaved "
          f"rounds, median (min-max); {res['active_gflop']:.1f} GFLOP on the active experts")
    print(f"  {'dense (reference)':<18}: {fmt(res['dense_ms'], '.0f')} ms")
    for impl, r in rows.items():
        grad = "" if r["grad_max_abs_diff"] is None else \
            f", gradients {r['grad_max_abs_diff']:.1e}"
        print(f"  {impl:<18}: {fmt(r['ms'], '.0f')} ms = {fmt(r['x_dense'], '.2f')}x dense; "
              f"max |diff| outputs {r['max_abs_diff']:.1e}{grad}")
    return res
