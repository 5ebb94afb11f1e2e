"""``mopd bench replay``: what router replay (R3) buys and what recording the routing costs.

A tiny MoE student samples rollouts with the engine recording every MoE layer's experts per
token; the trainer (float32) then scores them with and without replaying those experts. The
figure is the mean |log pi_train - mu| over response tokens (mu = the sampler's log-prob) and
the fraction of (token, layer) routings the trainer would flip, in three settings:

* ``same``: sampler and trainer in float32 with the same weights (numerics only);
* ``bf16``: the sampler computes in bfloat16 (what an inference engine does), the trainer in
  float32, same weights: the numerics gap R3 was made for;
* ``bf16+step``: the same after one optimizer step (GRPO loss, random advantages, Adam at
  ``--lr``), as a rollout of staleness 1 meets the trainer.

Cost: the rollout's wall time with recording on and off (interleaved rounds) and the bytes
per token the record takes (layers x k ids, one byte each up to 256 experts).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import models
from models.config import preset
from mopd_jax.bench import fmt, interleaved, print_environment, ratios, scaled, spread


def add_parser(sub):
    p = sub.add_parser("replay", help="router replay: log-prob mismatch with and without it, "
                       "and the cost of recording the routing", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny-moe", help="MoE student preset (random weights)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="the optimizer step of bf16+step")
    p.add_argument("--iters", type=int, default=5)
    p.set_defaults(run=run)


def _engine(graphdef, params, args, record):
    from mopd_jax.sampling import Engine
    return Engine(graphdef, params, max_concurrent_decodes=args.prompts, max_prefill_length=16,
                  max_target_length=16 + args.new_tokens, record_routing=record)


def mismatch(graphdef, params, rb) -> dict[str, float]:
    """Mean |log pi - mu| on response tokens with and without replay, and the flip fraction."""
    model = nnx.merge(graphdef, params)
    tokens = jnp.asarray(rb.tokens)
    layers = model.moe_layers()
    replay = {i: jnp.asarray(rb.expert_ids[:, :-1, j], jnp.int32) for j, i in enumerate(layers)}
    mask, mu = rb.response_mask[:, 1:], rb.logprobs[:, 1:]

    def logp(**kw):
        h, _, _ = model(tokens[:, :-1], **kw)
        lp = jax.nn.log_softmax(model.logits(h), -1)
        return np.asarray(jnp.take_along_axis(lp, tokens[:, 1:, None], -1)[..., 0])

    _, ids = models.forward_with_routing(model, tokens)
    own = np.stack([np.asarray(ids[i]) for i in layers], axis=2)
    fed = np.arange(tokens.shape[1])[None] < (rb.lengths - 1)[:, None]
    same = np.all(np.sort(own, -1) == np.sort(rb.expert_ids.astype(own.dtype), -1), -1)
    return {"replay": float(np.abs(logp(expert_ids=replay) - mu)[mask].mean()),
            "no_replay": float(np.abs(logp() - mu)[mask].mean()),
            "flips": float(1.0 - same[fed].mean())}


def _one_step(graphdef, params, rb, lr):
    from mopd_jax.batches import GRPOBatch
    from mopd_jax.config import OptimizerConfig
    from mopd_jax.steps import grpo_objective, init_train_state, make_optimizer, make_train_step
    opt = make_optimizer(OptimizerConfig(lr=lr, warmup_steps=0))
    step = make_train_step(graphdef, opt, grpo_objective())
    state = init_train_state(jax.tree.map(jnp.copy, params), opt)
    adv = np.random.default_rng(1).standard_normal(len(rb)).astype(np.float32)
    batch = GRPOBatch(tokens_BT=rb.tokens, mask_BT=rb.response_mask.astype(np.int32),
                      domain_B=np.zeros(len(rb), np.int32), sampler_logp_BT=rb.logprobs,
                      adv_B=adv)
    return step(state, batch)[0]["params"]


def run(args) -> dict:
    from mopd_jax.sampling import SamplingParams, rollout
    env = print_environment()
    cfg = preset(args.preset)
    if not cfg.num_experts:
        raise SystemExit(f"bench replay: preset {args.preset!r} has no MoE layers")
    graphdef, params = nnx.split(models.build(cfg, nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(1, cfg.vocab_size, size=rng.integers(4, 16)))
               for _ in range(args.prompts)]
    sp = SamplingParams(temperature=1.0, max_new_tokens=args.new_tokens)
    on, off = _engine(graphdef, params, args, True), _engine(graphdef, params, args, False)
    rb = rollout(on, params, prompts, sampling=sp, seed=1)
    rollout(off, params, prompts, sampling=sp, seed=1)  # compile both before timing
    times, _ = interleaved({"record": lambda: rollout(on, params, prompts, sampling=sp, seed=1),
                            "off": lambda: rollout(off, params, prompts, sampling=sp, seed=1)},
                           args.iters)
    settings = {"same": mismatch(graphdef, params, rb)}
    g16, p16 = nnx.split(models.build(cfg.replace(dtype="bfloat16"), nnx.Rngs(0)))
    p16 = jax.tree.map(lambda a, b: a.astype(b.dtype), params, p16)
    rb16 = rollout(_engine(g16, p16, args, True), p16, prompts, sampling=sp, seed=1)
    settings["bf16"] = mismatch(graphdef, params, rb16)
    settings["bf16+step"] = mismatch(graphdef, _one_step(graphdef, params, rb16, args.lr), rb16)
    per_token = int(rb.expert_ids[0, 0].nbytes)
    res = {"env": env, "preset": args.preset, "moe_layers": len(on.moe_layers),
           "k": cfg.num_experts_per_tok, "experts": cfg.num_experts, "iters": args.iters,
           "rows": len(rb), "width": int(rb.tokens.shape[1]), "lr": args.lr,
           "record_ms": scaled(spread(times["record"]), 1e3),
           "off_ms": scaled(spread(times["off"]), 1e3),
           "record_over_off": spread(ratios(times["record"], times["off"])),
           "bytes_per_token": per_token, "token_bytes": 8, "settings": settings}
    print(f"router replay, {args.preset}: {res['moe_layers']} MoE layers, E={cfg.num_experts} "
          f"k={cfg.num_experts_per_tok}; {len(rb)} rollouts x {res['width']} positions")
    print(f"  recording: {fmt(res['record_ms'])} ms vs {fmt(res['off_ms'])} ms per rollout = "
          f"{fmt(res['record_over_off'], '.3f')}x; {per_token} bytes per token (tokens + mu: "
          "8)")
    print(f"  {'setting':<10} {'flipped routings':>16} {'|logpi-mu| replay':>18} "
          f"{'no replay':>10}")
    for name, s in settings.items():
        print(f"  {name:<10} {s['flips']:>16.4f} {s['replay']:>18.2e} {s['no_replay']:>10.2e}")
    return res
