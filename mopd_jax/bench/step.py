"""``mopd bench step``: student train-step tokens/s and achieved FLOP/s against the machine's
peak matmul FLOP/s and against ``transformers``, all measured in one run on identical weights.

One ``make_train_step`` step (forward, chunked loss, backward, global-norm clip, AdamW or
with ``--optimizer sgd`` SGD) on B random sequences of T positions, after a warm-up of each
side, then ``--iters`` interleaved rounds (ours, torch, ours, ...); figures are median
(min-max), the ratio taken round by round:

* peak: a jitted ``jnp.dot`` of two ``--peak-size``^2 matrices of ``--dtype`` on the device,
  the best of a probe before and one after the rounds;
* FLOPs (``mopd_jax.flops``): the analytic model count ``6 * active matmul params * tokens``
  plus attention over the (query, key) pairs a causal row sees, T(T+1)/2, about half of full
  (PaLM appendix B, MaxText's causal convention: the lm_head counts, the embedding lookup does
  not, the chunked loss's logit recomputation is not credited). MFU (% of peak) uses this
  count. Beside it the matmul FLOPs of the compiled HLO with every loop body counted once per
  trip (XLA's ``cost_analysis()`` counts it once) and their ratio to the model count: what
  the step really computes (the chunked loss's recomputed logits included);
* ref: ``Qwen3ForCausalLM`` / ``Qwen3MoeForCausalLM`` (eager PyTorch) on the same weights
  (converted with ``models.hf``), the same loss on full [B, T, V] logits, ``backward()``, then
  ``clip_grad_norm_`` and ``AdamW.step()``: the work of our step. Its fwd+bwd time alone is
  timed in the same rounds, and ours against it too (ours does the clip and AdamW on top); the
  first-step losses of both are compared (they see the same initial params).
  torch runs on as many threads as XLA:CPU's pool has.

Targets: >= 40% of peak, >= 1x transformers.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from models.config import ModelConfig, preset
from models.decoder import scans
import models
from mopd_jax.bench import (best_time, equal_threads, fmt, interleaved, inverse,
                            print_environment, ratios, scaled, spread)
from mopd_jax.config import OptimizerConfig
from mopd_jax.batches import MOPDBatch, SFTBatch
from mopd_jax.estimators import DistillLossConfig, TeacherScores
from mopd_jax.flops import active_matmul_params, hlo_flops, train_flops
from mopd_jax.steps import (distill_objective, init_train_state, make_optimizer, make_train_step,
                            sft_objective)

TARGET_PCT_PEAK, TARGET_X_TORCH = 40.0, 1.0
TORCH_HINT = "pip install 'mopd-jax[test]' (torch, transformers)"


def add_parser(sub):
    p = sub.add_parser("step", help="train-step tokens/s, %% of peak matmul FLOP/s, x transformers",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-0.6b", help="model preset")
    p.add_argument("--layers", type=int, default=0,
                   help="decoder blocks (0: the preset's, 28 for qwen3-0.6b; fewer = quicker "
                        "on CPU)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128, help="positions per sequence (model input)")
    p.add_argument("--iters", type=int, default=3,
                   help="interleaved rounds (ours, torch) after a warm-up of each")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="params, activations and the peak probe")
    p.add_argument("--objective", choices=["sft", "mopd-A"], default="sft",
                   help="sft: cross-entropy; mopd-A: estimator A on fake teacher log-probs")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw",
                   help="adamw: the training default (two fp32 moments per param on both "
                        "sides); sgd: plain SGD at the same lr on both sides, no optimizer "
                        "state (the full 0.6B shape's memory, ours and torch's at once)")
    p.add_argument("--scan-layers", choices=["auto", "on", "off"], default="auto",
                   help="model.scan_layers: auto = the preset's rule (a scan from 16 layers); "
                        "off unrolls the blocks (XLA:CPU then slices no layer's weights out of "
                        "stacked arrays and writes no stacked gradients)")
    p.add_argument("--vocab-chunk", type=int, default=0,
                   help="the loss's vocabulary chunk (0: the whole vocabulary where B*T fp32 "
                        "logits fit in 1 GiB, else 8192)")
    p.add_argument("--peak-size", type=int, default=4096, help="matrix side of the peak probe")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers reference")
    p.add_argument("--json", action="store_true", help="also print the result as JSON")
    p.set_defaults(run=run)


def measure_peak_flops(n: int, dtype: str, iters: int = 3) -> float:
    """FLOP/s of a jitted n x n by n x n ``jnp.dot`` in ``dtype`` (best of iters)."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    dot = jax.jit(jnp.dot)
    jax.block_until_ready(dot(a, b))
    t, _ = best_time(lambda: jax.block_until_ready(dot(a, b)), iters)
    return 2 * n**3 / t


def make_bench_optimizer(name: str):
    """The step's optimizer: ``make_optimizer`` (clip + AdamW) or clip + SGD at the same lr."""
    ocfg = OptimizerConfig()
    if name == "adamw":
        return make_optimizer(ocfg)
    return optax.chain(optax.clip_by_global_norm(ocfg.clip_norm), optax.sgd(ocfg.lr))


def loss_vocab_chunk(asked: int, V: int, rows: int) -> int:
    """``--vocab-chunk``: as asked, else one chunk where [rows, V] fp32 logits fit in 1 GiB.

    The chunked loss lays its vocabulary chunks out strided (chunk j holds ids j, j + C, ...,
    for sharding); on one CPU device building that layout of the lm_head, slicing it and
    writing dW back into it cost more than the lm_head's matmuls at this shape (about half the
    2-layer step), and one chunk of B*T rows is memory torch spends as well.
    """
    if asked:
        return asked
    return V if rows * V * 4 <= 2**30 else 8192


def release_host_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``): the
    two models side by side at the 0.6B shape need every GiB the converted copies left."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def model_flops(cfg: ModelConfig, B: int, T: int) -> float:
    """Analytic FLOPs of one training step (forward + backward) on B causal rows of T."""
    return train_flops(cfg, B, T)


def make_batch(cfg: ModelConfig, B: int, T: int, objective: str, seed: int = 0):
    """Random tokens [B, T + 1] (the model sees T positions), every target trained; mopd-A gets
    fake teacher log-probs of the targets (an ``SFTBatch`` or a ``MOPDBatch``)."""
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(1, cfg.vocab_size, (B, T + 1)), jnp.int32)
    mask, domain = jnp.ones((B, T + 1), jnp.float32), jnp.zeros((B,), jnp.int32)
    if objective != "mopd-A":
        return SFTBatch(tokens_BT=tokens, mask_BT=mask, domain_B=domain)
    t_lp = -rng.exponential(np.log(cfg.vocab_size), (B, T)).astype(np.float32)
    return MOPDBatch(tokens_BT=tokens, mask_BT=mask, domain_B=domain, sampler_logp_BT=None,
                     teacher=TeacherScores(logp_BT=jnp.asarray(t_lp)))


def run(args) -> dict:
    if args.no_hf:
        return _run(args, None)
    with equal_threads() as threads:
        return _run(args, threads)


def _run(args, threads) -> dict:
    env = print_environment()
    over = dict(dtype=args.dtype, param_dtype=args.dtype)
    if args.layers:
        over["num_layers"] = args.layers
    if args.scan_layers != "auto":
        over["scan_layers"] = args.scan_layers == "on"
    cfg = preset(args.model, **over)
    B, T = args.batch, args.seq
    device = jax.devices()[0]
    peak = measure_peak_flops(args.peak_size, args.dtype)

    graphdef, params = nnx.split(models.build(cfg, nnx.Rngs(0)))
    batch = make_batch(cfg, B, T, args.objective)
    torch_ref = None if args.no_hf else _torch_reference(params, cfg, batch, args)
    release_host_memory()  # the checkpoint round trip's buffers, before our step allocates

    vc = loss_vocab_chunk(args.vocab_chunk, cfg.vocab_size, B * T)
    objective = (sft_objective(vocab_chunk=vc) if args.objective == "sft"
                 else distill_objective(DistillLossConfig(estimator="A", vocab_chunk=vc)))
    opt = make_bench_optimizer(args.optimizer)
    state = init_train_state(params, opt)
    del params
    step = make_train_step(graphdef, opt, objective).lower(state, batch).compile()
    xla_flops = hlo_flops(step.as_text())["flops"]

    state, m = step(state, batch)  # warm-up; its loss is at the initial params
    first_loss = float(m["loss"])
    release_host_memory()

    def one():
        nonlocal state
        state, m = step(state, batch)
        return jax.block_until_ready(m["loss"])

    fns = {"ours": one}
    if torch_ref is not None:
        fns["torch"] = torch_ref["train_step"]
        fns["torch_fwd_bwd"] = torch_ref["fwd_bwd"]
    times, _ = interleaved(fns, args.iters)
    # the probe again after the rounds, the best of both: a probe that ran while another
    # process held a core understates the peak (and overstates MFU)
    peak = max(peak, measure_peak_flops(args.peak_size, args.dtype))
    step_s = spread(times["ours"])
    t = step_s["median"]
    flops = model_flops(cfg, B, T)
    res = {"env": env, "model": cfg.name, "layers": cfg.num_layers, "batch": B, "seq": T,
           "dtype": args.dtype, "objective": args.objective, "optimizer": args.optimizer,
           "vocab_chunk": vc, "scan_layers": scans(cfg),
           "device": device.device_kind,
           "iters": args.iters, "threads": threads,
           "active_params": active_matmul_params(cfg), "peak_flops": peak, "step_s": t,
           "step_ms": scaled(step_s, 1e3), "tok_s": B * T / t,
           "tok_s_spread": inverse(step_s, B * T), "model_flops": flops,
           "xla_flops": xla_flops, "xla_over_model": xla_flops / flops, "achieved_flops": flops / t, "pct_peak": 100 * flops / t / peak,
           "pct_peak_spread": inverse(step_s, 100 * flops / peak), "loss": first_loss}
    if torch_ref is not None:
        t_step = spread(times["torch"])
        t_fb = spread(times["torch_fwd_bwd"])
        x = spread(ratios(times["torch"], times["ours"]))
        x_fb = spread(ratios(times["torch_fwd_bwd"], times["ours"]))
        res.update(torch_step_s=t_step["median"], torch_step_ms=scaled(t_step, 1e3),
                   torch_fwd_bwd_s=t_fb["median"], torch_fwd_bwd_ms=scaled(t_fb, 1e3),
                   x_torch_fwd_bwd=x_fb["median"], x_torch_fwd_bwd_spread=x_fb,
                   torch_tok_s=B * T / t_step["median"], torch_loss=torch_ref["loss"],
                   x_torch=x["median"], x_torch_spread=x)
    _print(res, args.peak_size, torch_ref is None and not args.no_hf)
    if args.json:
        print(json.dumps(res))
    return res


def _print(r, peak_size, torch_missing):
    print(f"train step, {r['model']} ({r['layers']} layers, {r['active_params'] / 1e6:.1f}M "
          f"active matmul params), B={r['batch']} T={r['seq']}, {r['dtype']}, "
          f"{r['objective']}, {r['optimizer']}, loss vocab chunk {r['vocab_chunk']}, "
          f"{'layer scan' if r['scan_layers'] else 'unrolled layers'}, "
          f"{r['device']}; {r['iters']} interleaved rounds, median (min-max)"
          + (f", torch on {r['threads']} threads like XLA" if r["threads"] else ""))
    print(f"  peak matmul ({peak_size}^2 {r['dtype']} jnp.dot): {r['peak_flops'] / 1e9:10.1f} "
          f"GFLOP/s")
    print(f"  ours : {fmt(r['step_ms'])} ms/step, {fmt(r['tok_s_spread'])} tok/s, "
          f"{r['achieved_flops'] / 1e9:.1f} GFLOP/s = {fmt(r['pct_peak_spread'])}% of peak "
          f"(target >= {TARGET_PCT_PEAK:.0f}%)")
    print(f"         FLOPs/step: model {r['model_flops'] / 1e9:.2f} G (causal attention; used "
          f"for MFU = % of peak), compiled HLO {r['xla_flops'] / 1e9:.2f} G = "
          f"{r['xla_over_model']:.2f}x model (loop bodies x trips)")
    if "torch_step_s" in r:
        print(f"  torch: {fmt(r['torch_step_ms'])} ms/step, {r['torch_tok_s']:.1f} tok/s; "
              f"fwd+bwd alone {fmt(r['torch_fwd_bwd_ms'])} ms; ours / torch fwd+bwd: "
              f"{fmt(r['x_torch_fwd_bwd_spread'], '.2f')}x")
        print(f"  ours / torch: {fmt(r['x_torch_spread'], '.2f')}x (target >= "
              f"{TARGET_X_TORCH:.0f}x)   first-step loss ours {r['loss']:.6f} torch "
              f"{r['torch_loss']:.6f}")
    elif torch_missing:
        print(f"  torch: skipped, torch/transformers not installed ({TORCH_HINT})")


# ------------------------------------------------------------------------------ reference
def _torch_reference(params, cfg, batch, args) -> dict | None:
    """The transformers train step (same loss, clip and AdamW) and its fwd+bwd alone, as
    callables after a warm-up, and its first loss; None without torch."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    import tempfile

    from models.hf import save_hf

    # Through a checkpoint, not load_state_dict: transformers converts the Hub layout on load
    # (fused MoE expert tensors), and from_pretrained reports any weight it did not fill.
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(params, cfg, tmp)
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=tdtype)
    model.train()
    ocfg = OptimizerConfig()
    opt = (torch.optim.SGD(model.parameters(), lr=ocfg.lr) if args.optimizer == "sgd" else
           torch.optim.AdamW(model.parameters(), lr=ocfg.lr, betas=(ocfg.b1, ocfg.b2),
                             eps=ocfg.eps, weight_decay=ocfg.weight_decay))

    tokens = torch.from_numpy(np.array(batch.tokens_BT)).long()
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    mask = torch.from_numpy(np.array(batch.mask_BT))[:, 1:]
    t_lp = (torch.from_numpy(np.array(batch.teacher.logp_BT))
            if args.objective == "mopd-A" else None)

    def loss_fn():
        logp = torch.log_softmax(model(input_ids=inputs).logits.float(), -1)
        lp = logp.gather(-1, targets[..., None])[..., 0]
        if t_lp is None:  # sft_loss: token_mean cross-entropy
            return -(lp * mask).sum() / mask.sum()
        # estimator A, seq_mean, no sampler log-probs: -c * clip(t - sg(lp), +-a_max) * lp
        c = mask / mask.sum(-1, keepdim=True).clamp(min=1) / mask.shape[0]
        adv = (t_lp - lp.detach()).clamp(-5.0, 5.0)
        return -(c * adv * lp).sum()

    # Each call ends by dropping its gradients (a training loop's zero_grad), so they are not
    # held beside ours while our step runs (2.4 GB at the 0.6B shape in fp32).
    def fwd_bwd():
        loss = loss_fn()
        loss.backward()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def train_step():
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), ocfg.clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    first_loss = train_step().item()  # warm-up, at the initial params
    return {"train_step": train_step, "fwd_bwd": fwd_bwd, "loss": first_loss}
