"""Rollout driver: a queue of prompts through the engine with continuous batching.

Each prompt is prefilled once and its n samples go into n free slots. When a full batch of
prompts can start (``engine.max_prefill_batch``, e.g. the first fill of the slots) they are
prefilled in one forward (``prefill_batch``) and inserted together (``bulk_insert_batch``);
otherwise one prompt at a time. A slot is refilled as soon as its sample finishes. Step
results are read one step late (dispatch generate N, then read N-1) so the host never stalls
the device; a finished slot therefore idles for one step before it is refilled. The host
counts each slot's steps to its length cap, so no step is dispatched only for slots whose
last token is already in flight (the step a rollout's end would otherwise waste).

The output is a ``RolloutBatch`` of padded arrays in prompt order (rollout r = prompt
``r // n``, sample ``r % n``), ready for the teacher/trainer score step:

    tokens[r, t]        prompt tokens, then response tokens, then ``pad_id``
    prompt_mask[r, t]   True on prompt tokens
    response_mask[r, t] True on generated tokens (the stop token included when it ended the
                        sample; those are the tokens that train)
    logprobs[r, t]      sampler log-prob μ of tokens[r, t] (0 off the response). It is aligned
                        with the token, so the trainer's log p(tokens[:, t] | tokens[:, :t])
                        (computed from hidden state t-1) compares elementwise.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Mapping, Sequence

import numpy as np

from mopd_jax.sampling.engine import Engine, EngineError
from mopd_jax.sampling.sampler import SamplingParams


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A tokenised prompt with its domain label (for teacher routing) and free metadata."""

    tokens: tuple[int, ...]
    domain: str = "default"
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, p) -> "Prompt":
        """Accept a Prompt, a token sequence, or a mapping with 'tokens' (+ 'domain', ...)."""
        if isinstance(p, Prompt):
            return p
        if isinstance(p, Mapping):
            rest = {k: v for k, v in p.items() if k not in ("tokens", "domain", "metadata")}
            return cls(tuple(int(t) for t in p["tokens"]), p.get("domain", "default"),
                       {**p.get("metadata", {}), **rest})
        return cls(tuple(int(t) for t in p))


@dataclasses.dataclass
class RolloutBatch:
    """Padded rollouts, one row per (prompt, sample); see the module docstring."""

    tokens: np.ndarray           # [R, L] int32
    prompt_mask: np.ndarray      # [R, L] bool
    response_mask: np.ndarray    # [R, L] bool
    logprobs: np.ndarray         # [R, L] fp32
    lengths: np.ndarray          # [R] prompt + response length
    prompt_lengths: np.ndarray   # [R]
    response_lengths: np.ndarray  # [R]
    finish_reason: list[str]     # [R] 'stop' | 'length'
    domain: list[str]            # [R]
    metadata: list[Mapping]      # [R]
    prompt_index: np.ndarray     # [R] group id for GRPO (index into the prompt list)
    sample_index: np.ndarray     # [R] 0..n-1 within the group
    stats: dict = dataclasses.field(default_factory=dict)
    # [R, L, L_moe, k] the experts every MoE layer chose for token t when the sampler fed it
    # (an engine with record_routing; zeros from the row's last token on: never fed); what
    # router replay hands the trainer. None when not recorded.
    expert_ids: np.ndarray | None = None

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def arrays(self) -> dict[str, np.ndarray]:
        """The numeric fields only (what a jitted score/train step takes)."""
        return {k: getattr(self, k) for k in (
            "tokens", "prompt_mask", "response_mask", "logprobs", "lengths", "prompt_lengths",
            "response_lengths", "prompt_index", "sample_index")}


def _request_seed(seed: int, prompt_index: int) -> int:
    return (seed * 0x9E3779B1 + prompt_index * 0x85EBCA6B + 1) % 2**32


def rollout(engine: Engine, params, prompts: Sequence, *, n: int = 1,
            sampling: SamplingParams | None = None, seed: int = 0,
            pad_to: int | None = None, pad_id: int | None = None) -> RolloutBatch:
    """Sample ``n`` responses per prompt with continuous batching; returns padded arrays.

    ``params`` are resharded to the engine's ``sample`` layout when it has a mesh.
    ``pad_to`` fixes the row width (default ``engine.max_target_length``, so downstream steps
    see one shape). The request seed of prompt i is derived from ``seed`` and i, so results do
    not depend on slot assignment or batch composition.
    """
    sampling = sampling or SamplingParams()
    S = engine.max_concurrent_decodes
    if not 1 <= n <= S:
        raise EngineError(f"rollout: n={n} samples per prompt must be in [1, "
                          f"max_concurrent_decodes={S}]")
    prompts = [Prompt.of(p) for p in prompts]
    for i, p in enumerate(prompts):
        if not 1 <= len(p.tokens) <= engine.max_prefill_length:
            raise EngineError(f"rollout: prompt {i} has {len(p.tokens)} tokens; it must have "
                              f"1..{engine.max_prefill_length} (engine max_prefill_length)")
    pad_id = engine.pad_id if pad_id is None else pad_id
    params = engine.shard_params(params)
    t0 = time.perf_counter()

    R = len(prompts) * n
    out_tokens: list[list[int]] = [[] for _ in range(R)]
    out_logp: list[list[float]] = [[] for _ in range(R)]
    routed = engine.record_routing
    prompt_ids: list = [None] * R   # [plen, L_moe, k] per row (its prompt's prefill)
    out_ids: list[list] = [[] for _ in range(R)]  # [L_moe, k] per generated-and-fed token
    finish: list[str | None] = [None] * R
    owner: list[int | None] = [None] * S
    left = [0] * S  # steps a slot may still take before its length cap (the engine's rule)
    free = collections.deque(range(S))
    todo = collections.deque(range(len(prompts)))
    state = engine.init_decode_state()
    steps = prefill_batches = 0

    def record(r, tok, lp, done, stopped):
        out_tokens[r].append(int(tok))
        out_logp[r].append(float(lp))
        if done:
            finish[r] = "stop" if stopped else "length"

    def admit(state):
        nonlocal prefill_batches
        while todo and len(free) >= n:
            # a full prompt batch when enough slots are free, else one prompt (two shapes)
            room = min(len(free) // n, len(todo))
            batch = [todo.popleft()
                     for _ in range(engine.max_prefill_batch if room >= engine.max_prefill_batch
                                    else 1)]
            prefix, first = engine.prefill_batch(
                params, [prompts[pi].tokens for pi in batch],
                [dataclasses.replace(sampling, seed=_request_seed(seed, pi)) for pi in batch],
                num_samples=n)
            slots = [[free.popleft() for _ in range(n)] for _ in batch]
            state = engine.bulk_insert_batch(prefix, state, slots)
            prefill_batches += 1
            first = first.convert_to_numpy()
            for j, pi in enumerate(batch):
                for i, s in enumerate(slots[j]):
                    r, k = pi * n + i, j * n + i
                    if routed:
                        prompt_ids[r] = first.expert_ids[j, :len(prompts[pi].tokens)]
                    record(r, first.tokens[k], first.log_prob[k], first.done[k],
                           first.stopped[k])
                    if first.done[k]:
                        free.append(s)  # never live on device: reusable at once
                    else:
                        owner[s] = r
                        left[s] = engine.max_new_tokens(sampling, len(prompts[pi].tokens)) - 1
        return state

    def consume(res):
        res = res.convert_to_numpy()
        for s in np.flatnonzero(res.valid):
            r = owner[s]
            if r is None:
                continue
            record(r, res.tokens[s], res.log_prob[s], res.done[s], res.stopped[s])
            if routed:  # the experts of the token this step fed (the row's previous one)
                out_ids[r].append(res.expert_ids[s])
            if res.done[s]:
                owner[s] = None
                free.append(s)

    pending = None
    while True:
        state = admit(state)
        live = [s for s, o in enumerate(owner) if o is not None]
        if not live and pending is None:
            if todo:  # cannot happen (n <= S and every slot is free), but never spin
                raise RuntimeError("rollout: no live slot and prompts left")
            break
        res = None
        # with nothing in flight, a slot still owned is live whatever the count says
        if any(left[s] > 0 for s in live) or (live and pending is None):
            state, res = engine.generate(params, state)
            res.copy_to_host_async()
            steps += 1
            for s in live:
                left[s] -= 1
        if pending is not None:
            consume(pending)
        pending = res
    wall = time.perf_counter() - t0

    plen = np.array([len(prompts[r // n].tokens) for r in range(R)], np.int32)
    rlen = np.array([len(t) for t in out_tokens], np.int32)
    width = pad_to or engine.max_target_length
    if R and int((plen + rlen).max()) > width:
        raise EngineError(f"rollout: pad_to={width} is shorter than the longest rollout "
                          f"({int((plen + rlen).max())} tokens)")
    tokens = np.full((R, width), pad_id, np.int32)
    logprobs = np.zeros((R, width), np.float32)
    col = np.arange(width)[None, :]
    for r in range(R):
        p, k = plen[r], rlen[r]
        tokens[r, :p] = prompts[r // n].tokens
        tokens[r, p:p + k] = out_tokens[r]
        logprobs[r, p:p + k] = out_logp[r]
    expert_ids = None
    if routed:
        L, k = len(engine.moe_layers), engine.cfg.num_experts_per_tok
        expert_ids = np.zeros((R, width, L, k), engine.routing_dtype)
        for r in range(R):
            p = plen[r]
            expert_ids[r, :p] = prompt_ids[r]
            if out_ids[r]:
                expert_ids[r, p:p + len(out_ids[r])] = np.stack(out_ids[r])
    prompt_mask = col < plen[:, None]
    response_mask = (col >= plen[:, None]) & (col < (plen + rlen)[:, None])
    return RolloutBatch(
        tokens=tokens, prompt_mask=prompt_mask, response_mask=response_mask,
        logprobs=logprobs, lengths=plen + rlen, prompt_lengths=plen, response_lengths=rlen,
        finish_reason=list(finish), domain=[prompts[r // n].domain for r in range(R)],
        metadata=[prompts[r // n].metadata for r in range(R)],
        prompt_index=np.arange(R, dtype=np.int32) // n,
        sample_index=np.arange(R, dtype=np.int32) % n, expert_ids=expert_ids,
        stats={"generate_steps": steps, "prefills": len(prompts),
               "prefill_batches": prefill_batches, "wall_s": wall,
               "generated_tokens": int(rlen.sum()),
               "tokens_per_s": float(rlen.sum()) / max(wall, 1e-9)})
