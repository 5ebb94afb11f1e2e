"""``mopd bench sample``: rollout-engine tokens/s vs ``transformers`` generate, and decode step
time vs ``transformers``' and vs a memory-bandwidth roofline, all in one run on identical weights.

For each model shape and batch size B: B random prompts of ``--prompt-len`` tokens, greedy,
``--new-tokens`` tokens each (no stop token), after a warm-up run of each contender, then
``--iters`` interleaved rounds (ours, transformers, ours, ...); figures are median (min-max)
over the rounds, the ratio taken round by round:

* ours: ``rollout`` on an ``Engine`` with B slots (batched prefill, insert, generate loop);
* ref:  ``generate`` of the transformers model (PyTorch eager, its KV cache) on the same
        weights, converted with ``models.hf``, on as many threads as XLA:CPU's pool has; the
        KV cache (dynamic or static) is the faster of both in a warm-up run unless
        ``--hf-cache`` says which; the greedy tokens are compared (``match``);
* step: both decode steps alone (B live rows, N - 1 steps after a prefill, no host reads;
        transformers: ``forward`` with its DynamicCache), interleaved too, against the
        roofline ``(param bytes + live KV bytes) / bandwidth`` (bandwidth measured here, see
        ``measure_bandwidth``) and as GFLOP/s of the analytic matmul count;
* rollout overhead: our rollout time minus its prefill and its decode steps, per step
  (host loop, result copies, slot bookkeeping, the cache's zeroing).

``--profile`` traces our decode step of every row and prints where its time goes, by kind of
work (``mopd_jax.bench.profile``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import models
from models.config import preset
from mopd_jax.bench import (best_time, equal_threads, fmt, interleaved, inverse,
                            print_environment, ratios, scaled, spread)
from mopd_jax.bench.step import active_matmul_params
from mopd_jax.sampling.engine import Engine
from mopd_jax.sampling.rollout import rollout
from mopd_jax.sampling.sampler import GREEDY

HF_CACHES = ("dynamic", "static")


def add_parser(sub):
    p = sub.add_parser("sample", help="rollout engine vs transformers generate, and roofline",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,qwen3-0.6b",
                   help="comma-separated presets (run in float32)")
    p.add_argument("--layers", type=int, default=None,
                   help="override num_layers of non-tiny presets (fewer = quicker on CPU)")
    p.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--iters", type=int, default=3,
                   help="interleaved rounds (ours, transformers) after a warm-up of each")
    p.add_argument("--hf-cache", choices=("auto",) + HF_CACHES, default="auto",
                   help="transformers' KV cache; auto: the faster in a warm-up run")
    p.add_argument("--copy-mb", type=int, default=512, help="array size for the bandwidth probe")
    p.add_argument("--profile", action="store_true",
                   help="trace our decode step of every row: time by kind of work")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers reference")
    p.add_argument("--json", action="store_true", help="also print the result as JSON")
    p.set_defaults(run=run)


def measure_bandwidth(mb: int, iters: int = 5) -> dict[str, float]:
    """Memory bandwidth probes in bytes/s; the roofline uses the best of them.

    'copy': a jitted elementwise pass (read + write bytes); 'read': a jitted row reduction
    (read bytes; the decode step is read-bound on weights). On CPU, XLA's elementwise loop is
    far from the memory limit, so a NumPy copy (read + write) is probed as well.
    """
    x = jnp.ones((mb * 2**20 // 4,), jnp.float32)
    probes = {}
    for key, fn, moved in (("copy", lambda a: a * 1.0001, 2 * x.nbytes),
                           ("read", lambda a: jnp.sum(a.reshape(1024, -1), axis=1), x.nbytes)):
        f = jax.jit(fn)
        jax.block_until_ready(f(x))
        t, _ = best_time(lambda: jax.block_until_ready(f(x)), iters)
        probes[key] = moved / t
    if jax.devices()[0].platform == "cpu":
        a = np.ones(x.shape, np.float32)
        b = np.empty_like(a)
        t, _ = best_time(lambda: np.copyto(b, a), iters)
        probes["numpy_copy"] = 2 * a.nbytes / t
    del x
    return probes


def decode_flops(cfg, B: int, ctx: float) -> float:
    """Analytic FLOPs of one decode step: B rows through every matmul (lm_head included) and
    attention over ``ctx`` cached positions."""
    attn = 2 * cfg.num_layers * cfg.num_heads * (cfg.head_dim + cfg.value_dim) * ctx
    return B * (2 * active_matmul_params(cfg) + attn)


# ------------------------------------------------------------------------------ transformers
def _hf_model(params, cfg):
    import torch
    import transformers

    from models.hf import hf_config_dict, iter_hf_tensors
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**hf_config_dict(cfg))).eval()
    sd = {k: torch.from_numpy(np.array(v)) for k, v in iter_hf_tensors(params, cfg)}
    hf.load_state_dict(sd, strict=False)
    if cfg.tie_word_embeddings:
        hf.tie_weights()
    return hf


def _hf_generate(hf, prompts, N, cache):
    import torch
    ids = torch.tensor(prompts)
    extra = {} if cache == "dynamic" else {"cache_implementation": cache}

    def gen():
        with torch.inference_mode():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N,
                               min_new_tokens=N, do_sample=False, eos_token_id=None,
                               pad_token_id=0, **extra)
    return gen


def _pick_hf_cache(hf, prompts, N, choice):
    """(generate fn, cache name, {cache: warm-up seconds}): the faster cache unless chosen."""
    warm = {}
    for cache in HF_CACHES if choice == "auto" else (choice,):
        gen = _hf_generate(hf, prompts, N, cache)
        gen()  # first call: allocations (a static cache is built once per shape)
        if choice == "auto":
            warm[cache], _ = best_time(gen, 1)
    cache = min(warm, key=warm.get) if warm else choice
    return _hf_generate(hf, prompts, N, cache), cache, warm


def _hf_steps(hf, prompts, N):
    """transformers' prefill and N - 1 bare decode forwards: (prefill s, s per step)."""
    import torch
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = hf(input_ids=ids, use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        t1 = time.perf_counter()
        for _ in range(N - 1):
            out = hf(input_ids=tok, past_key_values=out.past_key_values, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
        t2 = time.perf_counter()
    return t1 - t0, (t2 - t1) / (N - 1)


# ------------------------------------------------------------------------------ ours
def _ours_prefilled(engine, params, prompts):
    """Prefill and insert every prompt the way ``rollout`` does (full prompt batches, else
    one prompt at a time): (decode state, prefill seconds)."""
    B, P = len(prompts), engine.max_prefill_batch
    state = jax.block_until_ready(engine.init_decode_state())
    t0 = time.perf_counter()
    group = P if B >= P else 1
    for i in range(0, B, group):
        chunk = prompts[i:i + group]
        prefix, _ = engine.prefill_batch(params, chunk, [GREEDY] * len(chunk))
        state = engine.bulk_insert_batch(prefix, state, [[i + j] for j in range(len(chunk))])
    jax.block_until_ready(state)
    return state, time.perf_counter() - t0


def _ours_steps(engine, params, prompts, N):
    """Our prefill and N - 1 decode steps with no host reads: (prefill s, s per step)."""
    state, prefill_s = _ours_prefilled(engine, params, prompts)
    t0 = time.perf_counter()
    for _ in range(N - 1):
        state, res = engine.generate(params, state)
    jax.block_until_ready(res)
    return prefill_s, (time.perf_counter() - t0) / (N - 1)


def _profile_step(engine, params, prompts, wall_ms):
    from mopd_jax.bench.profile import op_profile, with_wall
    state, _ = _ours_prefilled(engine, params, prompts)
    text = engine._generate_jit.lower(params, state).compile().as_text()
    box = [state]

    def step():
        box[0], res = engine.generate(params, box[0])
        jax.block_until_ready(res)
    step()
    return with_wall(op_profile(step, text, steps=3), wall_ms)


def bench_one(name, cfg, params, graphdef, B, args, bandwidth, hf=None) -> dict:
    P, N = args.prompt_len, args.new_tokens
    rng = np.random.default_rng(0)
    prompts = rng.integers(1, cfg.vocab_size, size=(B, P)).tolist()
    bucket = 16
    while bucket < P:
        bucket *= 2
    engine = Engine(graphdef, params, max_concurrent_decodes=B, max_prefill_length=bucket,
                    max_target_length=bucket + 2 * N)
    sampling = dataclasses.replace(GREEDY, max_new_tokens=N)
    ours = lambda: rollout(engine, params, prompts, sampling=sampling)  # noqa: E731
    ours()  # warm-up: compiles
    row = {"model": name, "layers": cfg.num_layers, "batch": B, "prompt_len": P,
           "new_tokens": N}
    fns = {"ours": ours}
    if hf is not None:
        fns["hf"], row["hf_cache"], warm = _pick_hf_cache(hf, prompts, N, args.hf_cache)
        row["hf_cache_warmup_s"] = warm
    times, results = interleaved(fns, args.iters)
    ours_tokens = results["ours"][-1].tokens[:, P:P + N]
    gen_steps = results["ours"][-1].stats["generate_steps"]
    row.update(ours_s=spread(times["ours"]), ours_tok_s=inverse(spread(times["ours"]), B * N),
               generate_steps=gen_steps)
    if hf is not None:
        ref = results["hf"][-1][:, P:].numpy()
        row.update(hf_s=spread(times["hf"]), hf_tok_s=inverse(spread(times["hf"]), B * N),
                   x_hf=spread(ratios(times["hf"], times["ours"])),
                   match=float((ref == ours_tokens).mean()))

    # Decode steps alone (and each side's prefill), interleaved the same way.
    step_fns = {"ours": lambda: _ours_steps(engine, params, prompts, N)}
    if hf is not None:
        step_fns["hf"] = lambda: _hf_steps(hf, prompts, N)
    step_fns["ours"]()  # warm-up
    _, res = interleaved(step_fns, args.iters)
    prefill_s, step_s = (spread(x) for x in zip(*res["ours"]))
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    ctx = P + N / 2  # mean live context over the timed steps
    kv_bytes = B * ctx * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4
    roof_s = (param_bytes + kv_bytes) / bandwidth
    flops = decode_flops(cfg, B, ctx)
    other_s = row["ours_s"]["median"] - prefill_s["median"] - gen_steps * step_s["median"]
    row.update(step_ms=scaled(step_s, 1e3), prefill_ms=scaled(prefill_s, 1e3),
               roofline_ms=roof_s * 1e3, pct_roofline=100 * roof_s / step_s["median"],
               step_gflop=flops / 1e9, step_gflop_s=inverse(step_s, flops / 1e9),
               param_mb=param_bytes / 2**20, kv_mb=kv_bytes / 2**20,
               rollout_other_ms_per_step=1e3 * other_s / max(gen_steps, 1))
    if hf is not None:
        hf_prefill_s, hf_step_s = (spread(x) for x in zip(*res["hf"]))
        row.update(hf_step_ms=scaled(hf_step_s, 1e3), hf_prefill_ms=scaled(hf_prefill_s, 1e3),
                   hf_step_gflop_s=inverse(hf_step_s, flops / 1e9),
                   x_hf_step=spread(ratios([s for _, s in res["hf"]],
                                           [s for _, s in res["ours"]])))
    if args.profile:
        row["profile"] = _profile_step(engine, params, prompts, row["step_ms"]["median"])
    return row


def run(args) -> dict:
    if args.no_hf:
        return _run(args, None)
    with equal_threads() as threads:
        return _run(args, threads)


def _run(args, threads) -> dict:
    env = print_environment()
    probes = measure_bandwidth(args.copy_mb)
    bandwidth = max(probes.values())
    print("bandwidth " + "  ".join(f"{k} {v / 1e9:.1f}" for k, v in probes.items())
          + f" GB/s (roofline uses {bandwidth / 1e9:.1f}); prompt {args.prompt_len}, new "
          f"{args.new_tokens} (greedy, float32); {args.iters} interleaved rounds, median "
          f"(min-max)" + (f"; torch on {threads} threads like XLA" if threads else ""),
          flush=True)
    rows = []
    for name in args.models.split(","):
        over = dict(dtype="float32", param_dtype="float32")
        if args.layers and name != "tiny":
            over["num_layers"] = args.layers
        cfg = preset(name, **over)
        graphdef, params = nnx.split(models.build(cfg, nnx.Rngs(0)))
        hf = None if args.no_hf else _hf_model(params, cfg)
        for B in (int(b) for b in args.batches.split(",")):
            rows.append(bench_one(name, cfg, params, graphdef, B, args, bandwidth, hf))
            _print_row(rows[-1], header=len(rows) == 1)
        del hf, params
    res = {"env": env, "bandwidth": probes, "iters": args.iters, "rows": rows}
    if args.json:
        print(json.dumps(res))
    return res


def _print_row(r, header):
    if header:
        print(f"{'model':<11}{'L':>3}{'B':>4} {'ours tok/s':>22} {'hf tok/s':>22} "
              f"{'x hf':>18} {'match':>5} {'step ms':>22} {'hf step ms':>22} {'% roof':>6} "
              f"{'other ms/step':>13}")
    hf = "hf_tok_s" in r
    print(f"{r['model']:<11}{r['layers']:>3}{r['batch']:>4} {fmt(r['ours_tok_s']):>22} "
          f"{fmt(r['hf_tok_s']) if hf else '-':>22} {fmt(r['x_hf'], '.2f') if hf else '-':>18} "
          f"{r['match'] if hf else '-':>5} {fmt(r['step_ms'], '.2f'):>22} "
          f"{fmt(r['hf_step_ms'], '.2f') if hf else '-':>22} {r['pct_roofline']:6.1f} "
          f"{r['rollout_other_ms_per_step']:13.2f}", flush=True)
    details = [f"prefill {fmt(r['prefill_ms'])} ms", f"decode {r['step_gflop']:.2f} GFLOP/step "
               f"at {fmt(r['step_gflop_s'])} GFLOP/s"]
    if hf:
        details += [f"hf prefill {fmt(r['hf_prefill_ms'])} ms",
                    f"hf step at {fmt(r['hf_step_gflop_s'])} GFLOP/s",
                    f"step x hf {fmt(r['x_hf_step'], '.2f')}",
                    f"hf cache {r['hf_cache']}"
                    + (" (warm-up " + ", ".join(f"{k} {v:.2f} s" for k, v in
                                                r["hf_cache_warmup_s"].items()) + ")"
                       if r["hf_cache_warmup_s"] else "")]
    print("    " + "; ".join(details), flush=True)
    if "profile" in r:
        from mopd_jax.bench.profile import print_profile
        print_profile(r["profile"], f"{r['model']} batch {r['batch']} decode step")
