"""``mopd bench sample``: rollout-engine tokens/s vs ``transformers`` generate, and decode step
time vs a memory-bandwidth roofline, all measured in one run on identical weights.

For each model shape and batch size B: B random prompts of ``--prompt-len`` tokens, greedy,
``--new-tokens`` tokens each (no stop token), timed end to end after a warm-up run:

* ours: ``rollout`` on an ``Engine`` with B slots (prefill per prompt, insert, generate loop);
* ref:  ``Qwen3ForCausalLM.generate`` (eager PyTorch, KV cache) on the same weights, converted
        with ``models.hf``; the greedy tokens are compared (``match``);
* step: our decode step alone (B live slots, no host reads), against the roofline
        ``(param bytes + live KV bytes) / bandwidth``, the bandwidth measured here with large
        array copies / reductions (the best probe; see ``measure_bandwidth``).
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

from models.config import preset
import models
from mopd_jax.bench import best_time
from mopd_jax.sampling.engine import Engine
from mopd_jax.sampling.rollout import rollout
from mopd_jax.sampling.sampler import GREEDY


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
    p.add_argument("--iters", type=int, default=2, help="timed repeats (best is kept)")
    p.add_argument("--copy-mb", type=int, default=512, help="array size for the bandwidth probe")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers reference")
    p.add_argument("--json", action="store_true", help="also print the rows as JSON")
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
    rollout(engine, params, prompts, sampling=sampling)  # warm-up: compiles
    t_ours, batch = best_time(lambda: rollout(engine, params, prompts, sampling=sampling),
                          args.iters)
    ours = batch.tokens[:, P:P + N]
    row = {"model": name, "layers": cfg.num_layers, "batch": B,
           "ours_tok_s": B * N / t_ours, "ours_s": t_ours}

    # Decode step alone: B live slots, N steps, no host reads in between.
    state = engine.init_decode_state()
    for s, p in enumerate(prompts):
        padded, L = engine.pad_tokens(p)
        prefix, _ = engine.prefill(params, padded, L, sampling=GREEDY)
        state = engine.insert(prefix, state, s)
    state, res = engine.generate(params, state)
    jax.block_until_ready(res)

    def steps(state):
        for _ in range(N - 1):
            state, res = engine.generate(params, state)
        jax.block_until_ready(res)
        return state

    t0 = time.perf_counter()
    state = steps(state)
    step_s = (time.perf_counter() - t0) / (N - 1)
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    ctx = P + N / 2  # mean live context over the timed steps
    kv_bytes = B * ctx * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4
    roof_s = (param_bytes + kv_bytes) / bandwidth
    row.update(step_ms=step_s * 1e3, roofline_ms=roof_s * 1e3, pct_roofline=100 * roof_s / step_s,
               param_mb=param_bytes / 2**20, kv_mb=kv_bytes / 2**20)

    if hf is not None:
        import torch
        ids = torch.tensor(prompts)
        gen = lambda: hf.generate(ids, attention_mask=torch.ones_like(ids),  # noqa: E731
                                  max_new_tokens=N, min_new_tokens=N, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
        with torch.no_grad():
            gen()
            t_hf, out = best_time(lambda: gen(), args.iters)
        ref = out[:, P:].numpy()
        row.update(hf_tok_s=B * N / t_hf, hf_s=t_hf, speedup=t_hf / t_ours,
                   match=float((ref == ours).mean()))
    return row


def run(args) -> list[dict]:
    probes = measure_bandwidth(args.copy_mb)
    bandwidth = max(probes.values())
    device = jax.devices()[0]
    print(f"device {device.platform}:{device.device_kind} x{jax.device_count()}  bandwidth "
          + "  ".join(f"{k} {v / 1e9:.1f}" for k, v in probes.items())
          + f" GB/s (roofline uses {bandwidth / 1e9:.1f})  prompt {args.prompt_len}  "
          f"new {args.new_tokens} (greedy, float32)")
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
    if args.json:
        print(json.dumps(rows))
    return rows


def _print_row(r, header):
    if header:
        print(f"{'model':<12}{'L':>3}{'B':>4}{'ours tok/s':>12}{'hf tok/s':>10}{'x hf':>7}"
              f"{'match':>7}{'step ms':>9}{'roof ms':>9}{'% roof':>8}")
    hf = (f"{r['hf_tok_s']:>10.1f}{r['speedup']:>7.2f}{r['match']:>7.2f}" if "hf_tok_s" in r
          else f"{'-':>10}{'-':>7}{'-':>7}")
    print(f"{r['model']:<12}{r['layers']:>3}{r['batch']:>4}{r['ours_tok_s']:>12.1f}{hf}"
          f"{r['step_ms']:>9.2f}{r['roofline_ms']:>9.2f}{r['pct_roofline']:>8.1f}", flush=True)
