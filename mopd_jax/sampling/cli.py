"""``mopd generate``: sample from a model with the rollout engine.

    mopd generate (--hf DIR | --checkpoint DIR) (--prompt TEXT | --tokens 1,2,3)
                  [--greedy | --temperature T --top-k K --top-p P]
                  [--max-new-tokens N] [--n N] [--seed S] [--json]

``--json`` prints ``{"prompt_tokens": [...], "samples": [{"tokens", "logprobs",
"finish_reason", "text"}], "sampling": {...}}``; ``logprobs`` are the sampler's log-probs of
each generated token (log softmax(logits / T), untruncated; T = 1 when greedy).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from mopd_jax.config import ConfigError


def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate", help="sample continuations of a prompt with the rollout engine",
        description="Sample --n continuations of a prompt (text or token ids) and print them "
                    "with the sampler's per-token log-probs.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", metavar="DIR", help="local Hugging Face model directory")
    src.add_argument("--checkpoint", metavar="DIR", help="mopd (Orbax) model checkpoint")
    src.add_argument("--preset", metavar="NAME",
                     help="a named architecture with random weights, for smoke tests and "
                          "benchmarks (tiny, tiny-moe, demo-moe, qwen3-0.6b, ...)")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", metavar="TEXT", help="prompt text (needs a tokenizer)")
    prompt.add_argument("--tokens", metavar="IDS", help="comma-separated prompt token ids")
    p.add_argument("--greedy", action="store_true", help="argmax decoding")
    p.add_argument("--temperature", type=float, default=None, metavar="T",
                   help="softmax temperature (default 1.0)")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="keep the K most likely")
    p.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus mass")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                   help="tokens to generate per sample (default 64)")
    p.add_argument("--n", type=int, default=1, metavar="N",
                   help="samples of the prompt, sharing one prefill (default 1)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="request seed (default 0)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (tokens, log-probs, text) instead of the text")
    p.set_defaults(run=run_generate)
    return p


def _sampling(args):
    from mopd_jax.sampling.sampler import SamplingParams

    if args.greedy and any(v is not None for v in (args.temperature, args.top_k, args.top_p)):
        raise ConfigError("--greedy: cannot be combined with --temperature/--top-k/--top-p; "
                          "drop one of them")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    if args.n < 1:
        raise ConfigError(f"--n: must be >= 1, got {args.n}")
    try:
        return SamplingParams(
            temperature=1.0 if args.temperature is None else args.temperature,
            top_k=args.top_k or 0, top_p=1.0 if args.top_p is None else args.top_p,
            greedy=args.greedy, max_new_tokens=args.max_new_tokens, seed=args.seed)
    except ValueError as e:
        flag = str(e).split(":")[0].replace("sampling.", "--").replace("_", "-")
        raise ConfigError(f"{flag}: {str(e).split(':', 1)[1].strip()}") from None


def _prompt_ids(args, loaded) -> list[int]:
    V = loaded.cfg.vocab_size
    if args.prompt is not None:
        if loaded.tokenizer is None:
            raise ConfigError("--prompt: this model has no tokenizer; pass --tokens 1,2,3")
        ids = list(loaded.tokenizer.encode(args.prompt))
        if not ids:
            raise ConfigError("--prompt: encodes to no tokens; give a non-empty prompt")
        return ids
    try:
        ids = [int(t) for t in args.tokens.replace(" ", "").split(",") if t]
    except ValueError:
        raise ConfigError(f"--tokens {args.tokens!r}: expected comma-separated integer ids, "
                          "e.g. --tokens 1,2,3") from None
    if not ids:
        raise ConfigError("--tokens: empty; give at least one token id")
    bad = [i for i in ids if not 0 <= i < V]
    if bad:
        raise ConfigError(f"--tokens: ids {bad[:5]} are outside the vocabulary [0, {V})")
    return ids


def run_generate(args) -> dict:
    """Load the model, sample, print; returns the JSON-able result."""
    from mopd_jax.loading import load_model
    from mopd_jax.sampling.engine import Engine, EngineError
    from mopd_jax.sampling.rollout import rollout

    from mopd_jax.sharding import make_mesh

    sampling = _sampling(args)
    mesh = make_mesh()
    loaded = load_model(hf=args.hf, checkpoint=args.checkpoint, preset=args.preset,
                        mesh=mesh, role="sample")
    ids = _prompt_ids(args, loaded)
    tok = loaded.tokenizer
    eos = getattr(tok, "eos_id", None) if tok is not None else None
    bucket = 16
    while bucket < len(ids):
        bucket *= 2
    try:
        engine = Engine(loaded.graphdef, loaded.params, max_concurrent_decodes=args.n,
                        max_prefill_length=bucket,
                        max_target_length=bucket + args.max_new_tokens,
                        stop_tokens=() if eos is None else (eos,), mesh=mesh)
        batch = rollout(engine, loaded.params, [ids], n=args.n, sampling=sampling)
    except EngineError as e:
        raise ConfigError(str(e)) from None
    samples = []
    for r in range(len(batch)):
        p, L = batch.prompt_lengths[r], batch.lengths[r]
        toks = batch.tokens[r, p:L].tolist()
        samples.append({"tokens": toks, "logprobs": [float(x) for x in batch.logprobs[r, p:L]],
                        "finish_reason": batch.finish_reason[r],
                        "text": tok.decode(toks) if tok is not None else None})
    result = {"prompt_tokens": ids, "samples": samples,
              "sampling": dataclasses.asdict(sampling)}
    if args.json:
        print(json.dumps(result))
    else:
        for i, s in enumerate(samples):
            body = s["text"] if s["text"] is not None else ",".join(map(str, s["tokens"]))
            mean = sum(s["logprobs"]) / len(s["logprobs"])
            print(f"--- sample {i} ({len(s['tokens'])} tokens, {s['finish_reason']}, "
                  f"mean log-prob {mean:.4f})")
            print(body)
    return result

