"""The rollout engine: JetStream 0.3-shaped ``prefill`` / ``insert`` / ``generate`` over slots.

A fixed number of decode *slots* (``max_concurrent_decodes``) share one KV cache of
``max_target_length`` positions per slot (the model's own cache, ``model.init_cache``). A
request is prefilled alone into a cache of its length bucket (powers of two up to
``max_prefill_length``), which also samples its first token(s); ``insert`` / ``bulk_insert``
copy that prefix into free slots (n samples of one prompt share one prefill); ``generate``
advances every slot by one token. Shapes never depend on the request, and every per-request
setting (temperature, top-k, top-p, seed, stop tokens, max new tokens) is an array, so after
warm-up (one prefill compile per bucket, one insert per bucket and n, one generate) nothing
recompiles. The decode state is donated to ``insert`` and ``generate``.

Positions: a prompt of length L fills positions 0..L-1; the first sampled token sits at
position L. Slot state holds the last sampled token ``tokens`` at position ``pos`` (not yet
in the cache); ``generate`` writes it into the cache, samples position ``pos + 1`` and, for
live slots only, advances. Finished slots keep computing (fixed shapes) but never change.

Log-probs: see ``sampler`` — log softmax(logits / T) of the sampled token, untruncated.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding

from models.moe import routing_dtype
from mopd_jax.sampling.sampler import SamplingParams, sample_logits

Params = Any


@struct.dataclass
class ResultTokens:
    """Tokens produced by one prefill (one row per sample) or one generate step (per slot).

    Mirrors JetStream's ResultTokens (tokens, validity, lengths, log_prob) as named fields
    rather than one packed array; ``get_result_at_slot`` gives the JetStream view of a row.
    """

    tokens: jax.Array      # [B] int32: the sampled token
    log_prob: jax.Array    # [B] fp32: its sampler log-prob (see sampler docstring)
    valid: jax.Array       # [B] bool: the row was live, so the token is real
    lengths: jax.Array     # [B] int32: tokens generated so far for the row, this one included
    done: jax.Array        # [B] bool: this token ended the row (stop token or length cap)
    stopped: jax.Array     # [B] bool: ... and it did so by a stop token
    # Router record (engine built with record_routing): the experts each MoE layer chose for
    # the tokens *fed* in this call, [..., L_moe, k] in ``routing_dtype``: a prefill's
    # [P, bucket, L_moe, k] per prompt (its prompt positions), a generate's [S, L_moe, k] per
    # slot (the token at ``pos``, whose successor this step samples).
    expert_ids: jax.Array | None = None
    samples_per_slot: int = struct.field(pytree_node=False, default=1)

    def copy_to_host_async(self) -> None:
        for x in jax.tree.leaves(self):
            if isinstance(x, jax.Array):
                x.copy_to_host_async()

    def convert_to_numpy(self) -> "ResultTokens":
        from mopd_jax.sharding import to_host  # multi-process: slots span every host
        return to_host(self)

    def get_result_at_slot(self, slot: int) -> dict:
        s = slice(slot * self.samples_per_slot, (slot + 1) * self.samples_per_slot)
        return {"tokens": self.tokens[s, None], "valid": self.valid[s, None],
                "lengths": self.lengths[s], "log_prob": self.log_prob[s, None]}


@struct.dataclass
class Prefix:
    """One prefilled request: its KV cache [1, K, bucket, Hd] per layer and n first tokens."""

    cache: list
    length: jax.Array       # [] int32: true prompt length
    tokens: jax.Array       # [n] first sampled tokens (position ``length``)
    log_prob: jax.Array     # [n]
    keys: jax.Array         # [n, 2] uint32: per-sample PRNG keys
    done: jax.Array         # [n] bool: finished already at the first token
    temperature: jax.Array  # [] fp32 (0 = greedy)
    top_k: jax.Array        # [] int32
    top_p: jax.Array        # [] fp32
    max_new: jax.Array      # [] int32: cap on generated tokens, clipped to the cache
    stop_tokens: jax.Array  # [max_stop] int32, -1 padded


@struct.dataclass
class DecodeState:
    """Everything ``generate`` transforms; one row per slot."""

    cache: list             # per layer {'k','v': [S, K, max_target_length, Hd]}
    tokens: jax.Array       # [S] last sampled token (at ``pos``, not yet cached)
    pos: jax.Array          # [S] its position
    generated: jax.Array    # [S] tokens generated so far
    max_new: jax.Array      # [S]
    active: jax.Array       # [S] bool: live slot
    keys: jax.Array         # [S, 2] uint32
    temperature: jax.Array  # [S]
    top_k: jax.Array        # [S]
    top_p: jax.Array        # [S]
    stop_tokens: jax.Array  # [S, max_stop]


class EngineError(ValueError):
    """A request does not fit the engine (too long, too many samples, bad slots)."""


class Engine:
    """Slot-based decoding engine for any ``models.CausalLM`` (dense or MoE, any family).

    ``params`` passed to the constructor may be abstract (only shapes are read); the params
    given to ``prefill`` / ``generate`` are arguments, so one compiled step serves any weights
    of the same architecture and layout.
    """

    def __init__(self, graphdef, params: Params, *, max_concurrent_decodes: int = 8,
                 max_prefill_length: int = 128, max_target_length: int | None = None,
                 stop_tokens: Sequence[int] = (), max_stop_tokens: int = 4,
                 min_prefill_bucket: int = 16, max_prefill_batch: int = 16,
                 mesh: Mesh | None = None, pad_id: int = 0, record_routing: bool = False):
        abstract = jax.eval_shape(lambda p: p, params)
        self.graphdef = graphdef
        self.cfg = nnx.merge(graphdef, abstract).cfg
        self.moe_layers = nnx.merge(graphdef, abstract).moe_layers()
        if record_routing and not self.moe_layers:
            raise EngineError("record_routing: this model has no MoE layers (nothing to "
                              "record); turn router replay off for a dense model")
        self.record_routing = bool(record_routing)
        self.routing_dtype = routing_dtype(self.cfg.num_experts)
        self.mesh = mesh
        self.pad_id = pad_id
        self._slots = int(max_concurrent_decodes)
        self._max_prefill = int(max_prefill_length)
        self.max_target_length = int(max_target_length or 2 * max_prefill_length)
        if self.max_target_length <= self._max_prefill:
            raise EngineError(f"engine.max_target_length ({self.max_target_length}) must exceed "
                              f"max_prefill_length ({self._max_prefill}) to leave room to "
                              "generate")
        self.stop_tokens = tuple(int(t) for t in stop_tokens)
        self.max_stop_tokens = max(int(max_stop_tokens), len(self.stop_tokens), 1)
        b, buckets = max(1, int(min_prefill_bucket)), []
        while b < self._max_prefill:
            buckets.append(b)
            b *= 2
        self.prefill_buckets = tuple(buckets) + (self._max_prefill,)
        # Two prompt-batch shapes only (each is compiled per length bucket): a lone prompt, and
        # a full batch (fewer prompts are padded to it; ``rollout`` only batches full ones).
        self.prefill_batch_buckets = tuple(sorted({1, max(1, int(max_prefill_batch))}))
        self._cache_axes = nnx.merge(graphdef, abstract).cache_axes()
        self._cache_abstract = jax.eval_shape(
            lambda p: nnx.merge(graphdef, p).init_cache(self._slots, self.max_target_length),
            abstract)
        self._state_shardings = self._decode_state_shardings() if mesh is not None else None
        out = self._state_shardings
        self._prefill_jit = jax.jit(self._prefill_fn, static_argnames=("num_samples",))
        self._prefill_batch_jit = jax.jit(self._prefill_batch_fn,
                                          static_argnames=("num_samples",))
        self._insert_jit = jax.jit(self._insert_fn, donate_argnums=(1,),
                                   out_shardings=out)
        self._insert_batch_jit = jax.jit(self._insert_batch_fn, donate_argnums=(1,),
                                         out_shardings=out)
        self._generate_jit = jax.jit(self._generate_fn, donate_argnums=(1,),
                                     out_shardings=None if out is None else (out, None))
        self._init_jit = jax.jit(self._init_fn, out_shardings=out)
        self.prefill_calls = 0  # prompts prefilled (host counter: n samples share one prefill)

    # ------------------------------------------------------------------ JetStream properties
    @property
    def max_concurrent_decodes(self) -> int:
        return self._slots

    @property
    def samples_per_slot(self) -> int:
        return 1

    @property
    def max_prefill_length(self) -> int:
        return self._max_prefill

    @property
    def max_prefill_batch(self) -> int:
        """Most prompts one ``prefill_batch`` call takes."""
        return self.prefill_batch_buckets[-1]

    # ------------------------------------------------------------------ helpers
    def shard_params(self, params: Params) -> Params:
        """Params in the ``sample`` layout on this engine's mesh (identity without a mesh)."""
        if self.mesh is None:
            return params
        from mopd_jax.sharding import reshard
        return reshard(params, self.mesh, "sample")

    def _rules(self):
        if self.mesh is None:
            return contextlib.nullcontext()
        from mopd_jax.sharding import use_rules
        return use_rules(self.mesh, "sample")

    def _decode_state_shardings(self):
        from mopd_jax.sharding import logical_to_spec
        mesh = self.mesh

        def sh(axes, shape):
            return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, "sample"))

        S = self._slots
        kv = jax.tree.map(lambda axes, v: sh(axes, v.shape), self._cache_axes,
                          self._cache_abstract, is_leaf=lambda x: isinstance(x, tuple))
        row, row2 = sh(("batch",), (S,)), sh(("batch", None), (S, 2))
        return DecodeState(cache=kv, tokens=row, pos=row, generated=row, max_new=row,
                           active=row, keys=row2, temperature=row, top_k=row, top_p=row,
                           stop_tokens=sh(("batch", None), (S, self.max_stop_tokens)))

    def bucket_for(self, length: int) -> int:
        """The prefill length bucket for a prompt of ``length`` tokens."""
        if not 1 <= length <= self._max_prefill:
            raise EngineError(f"prompt length {length} is outside [1, max_prefill_length="
                              f"{self._max_prefill}]; shorten the prompt or raise "
                              "max_prefill_length")
        return next(b for b in self.prefill_buckets if b >= length)

    def pad_tokens(self, tokens: Sequence[int]) -> tuple[np.ndarray, int]:
        """Right-pad a prompt to its bucket: (padded int32 [bucket], true_length)."""
        tokens = np.asarray(tokens, np.int32).reshape(-1)
        out = np.full(self.bucket_for(len(tokens)), self.pad_id, np.int32)
        out[:len(tokens)] = tokens
        return out, len(tokens)

    def max_new_tokens(self, sampling: SamplingParams, prompt_length: int) -> int:
        """Most tokens a request can generate (its first included): ``max_new_tokens``, clipped
        to the room the cache leaves after the prompt, as the prefill clips it on device."""
        return min(sampling.max_new_tokens or self.max_target_length,
                   self.max_target_length - prompt_length)

    def _sampling_arrays(self, sampling: SamplingParams) -> tuple:
        """(temperature, top_k, top_p, max_new, stop_tokens, seed) as the jitted prefill
        takes them."""
        max_new = min(sampling.max_new_tokens or self.max_target_length, 2**31 - 1)
        return (np.float32(sampling.effective_temperature), np.int32(sampling.top_k),
                np.float32(sampling.top_p), np.int32(max_new),
                self._stop_array(sampling.stop_tokens), np.uint32(sampling.seed % 2**32))

    def _stop_array(self, stop_tokens) -> np.ndarray:
        stops = self.stop_tokens if stop_tokens is None else tuple(stop_tokens)
        if len(stops) > self.max_stop_tokens:
            raise EngineError(f"sampling.stop_tokens: at most {self.max_stop_tokens} stop "
                              f"tokens (engine max_stop_tokens), got {len(stops)}")
        arr = np.full(self.max_stop_tokens, -1, np.int32)
        arr[:len(stops)] = stops
        return arr

    # ------------------------------------------------------------------ public API
    def init_decode_state(self) -> DecodeState:
        """Empty slots (all inactive) and a zeroed KV cache."""
        return self._init_jit()

    def prefill(self, params: Params, padded_tokens, true_length: int, *,
                sampling: SamplingParams | None = None, num_samples: int = 1,
                existing_prefix=None) -> tuple[Prefix, ResultTokens]:
        """Prefill one prompt and sample ``num_samples`` first tokens from its last position.

        ``padded_tokens`` is [bucket] (see ``pad_tokens``); returns the prefix to insert and
        a ResultTokens with one row per sample.
        """
        if existing_prefix is not None:
            raise NotImplementedError("prefix caching (existing_prefix) is not supported")
        sampling = sampling or SamplingParams()
        padded = np.asarray(padded_tokens, np.int32).reshape(-1)
        if padded.shape[0] not in self.prefill_buckets:
            raise EngineError(f"padded prompt length {padded.shape[0]} is not a prefill "
                              f"bucket {self.prefill_buckets}; use Engine.pad_tokens")
        if not 1 <= true_length <= padded.shape[0]:
            raise EngineError(f"true_length {true_length} not in [1, {padded.shape[0]}]")
        if not 1 <= num_samples <= self._slots:
            raise EngineError(f"num_samples {num_samples} must be in [1, "
                              f"max_concurrent_decodes={self._slots}]")
        self.prefill_calls += 1
        return self._prefill_jit(params, padded, np.int32(true_length),
                                 *self._sampling_arrays(sampling), num_samples=num_samples)

    def insert(self, prefix: Prefix, decode_state: DecodeState, slot: int) -> DecodeState:
        """Put the prefix's first sample into ``slot`` (donates ``decode_state``)."""
        return self.bulk_insert(prefix, decode_state, [slot], _first_only=True)

    def bulk_insert(self, prefix: Prefix, decode_state: DecodeState, slots: Sequence[int],
                    *, _first_only: bool = False) -> DecodeState:
        """Sample i of the prefix goes to ``slots[i]``; all share the one prefix KV."""
        slots = np.asarray(slots, np.int32).reshape(-1)
        n = prefix.tokens.shape[0]
        if not _first_only and len(slots) != n:
            raise EngineError(f"bulk_insert: {len(slots)} slots for a prefix with {n} samples")
        if len(set(slots.tolist())) != len(slots) or slots.min() < 0 or slots.max() >= self._slots:
            raise EngineError(f"bulk_insert: slots {slots.tolist()} must be distinct and in "
                              f"[0, {self._slots})")
        return self._insert_jit(prefix, decode_state, slots)

    def prefill_batch(self, params: Params, prompts: Sequence[Sequence[int]],
                      samplings: Sequence[SamplingParams], *, num_samples: int = 1
                      ) -> tuple[Prefix, ResultTokens]:
        """Prefill several prompts in one call (one [P, bucket] forward instead of P [1, bucket]
        ones); each gets its own ``SamplingParams``. Not part of JetStream's API.

        Prompts are right-padded to the longest one's bucket and P to 1 or
        ``max_prefill_batch``, so two shapes per length bucket serve every call. Returns a
        batched Prefix (one leading row per padded prompt; hand it to ``bulk_insert_batch``)
        and ResultTokens with row ``p * num_samples + i`` = sample i of prompt p. Row p of the
        batched prefix equals ``prefill`` of prompt p alone.
        """
        P = len(prompts)
        if not 1 <= P <= self.max_prefill_batch or len(samplings) != P:
            raise EngineError(f"prefill_batch: {P} prompts (with {len(samplings)} samplings); "
                              f"give 1..{self.max_prefill_batch} and one SamplingParams each")
        if not 1 <= num_samples <= self._slots:
            raise EngineError(f"num_samples {num_samples} must be in [1, "
                              f"max_concurrent_decodes={self._slots}]")
        bucket = self.bucket_for(max(len(p) for p in prompts))
        Pb = next(b for b in self.prefill_batch_buckets if b >= P)
        tokens = np.full((Pb, bucket), self.pad_id, np.int32)
        lengths = np.ones((Pb,), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)], lengths[i] = p, len(p)
        # padding rows repeat the last request's settings; their results are never read
        rows = [self._sampling_arrays(sp) for sp in samplings]
        rows += [rows[-1]] * (Pb - P)
        self.prefill_calls += P
        return self._prefill_batch_jit(params, tokens, lengths,
                                       *(np.stack(col) for col in zip(*rows)),
                                       num_samples=num_samples)

    def bulk_insert_batch(self, prefix: Prefix, decode_state: DecodeState,
                          slots: Sequence[Sequence[int]]) -> DecodeState:
        """Sample i of prompt p of a ``prefill_batch`` prefix goes to ``slots[p][i]``."""
        slots = np.asarray(slots, np.int32)
        P, n = slots.shape
        rows, samples = prefix.tokens.shape
        flat = slots.reshape(-1)
        if P > rows or n > samples or len(set(flat.tolist())) != flat.size or flat.min() < 0 \
                or flat.max() >= self._slots:
            raise EngineError(f"bulk_insert_batch: slots {slots.tolist()} must be distinct, in "
                              f"[0, {self._slots}), at most {rows} prompts x {samples} samples")
        padded = np.full((rows, n), self._slots, np.int32)  # out of range: dropped
        padded[:P] = slots
        return self._insert_batch_jit(prefix, decode_state, padded)

    def warmup(self, params: Params, num_samples: Sequence[int] = (1,)) -> int:
        """Compile every shape a ``rollout`` with these ``num_samples`` can meet: prefill and
        insert for each (prompt-batch size, length bucket), plus generate. Runs each once on
        dummy prompts in a scratch decode state; returns the number of shapes run."""
        state, shapes, calls = self.init_decode_state(), 0, self.prefill_calls
        for n in num_samples:
            for P in self.prefill_batch_buckets:
                if P * n > self._slots:
                    continue
                for bucket in self.prefill_buckets:
                    prefix, _ = self.prefill_batch(params, [[self.pad_id] * bucket] * P,
                                                   [SamplingParams()] * P, num_samples=n)
                    slots = np.arange(P * n).reshape(P, n)
                    state = self.bulk_insert_batch(prefix, state, slots)
                    shapes += 1
        self.prefill_calls = calls  # warm-up prompts are not requests
        state, res = self.generate(params, state)
        jax.block_until_ready(res)
        return shapes

    def generate(self, params: Params, decode_state: DecodeState
                 ) -> tuple[DecodeState, ResultTokens]:
        """One token for every slot (donates ``decode_state``); results are per slot."""
        return self._generate_jit(params, decode_state)

    # ------------------------------------------------------------------ jitted bodies
    def _init_fn(self) -> DecodeState:
        S, ms = self._slots, self.max_stop_tokens
        cache = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), self._cache_abstract)
        zi = jnp.zeros((S,), jnp.int32)
        return DecodeState(cache=cache, tokens=zi, pos=zi, generated=zi, max_new=zi,
                           active=jnp.zeros((S,), bool), keys=jnp.zeros((S, 2), jnp.uint32),
                           temperature=jnp.zeros((S,), jnp.float32), top_k=zi,
                           top_p=jnp.ones((S,), jnp.float32),
                           stop_tokens=jnp.full((S, ms), -1, jnp.int32))

    def _prefill_fn(self, params, tokens_T, true_length, temperature, top_k, top_p, max_new,
                    stop_tokens, seed, *, num_samples):
        """One prompt: ``_prefill_batch_fn`` on a batch of one, rows unbatched (cache kept
        [1, K, bucket, Hd])."""
        prefix, result = self._prefill_batch_fn(
            params, tokens_T[None], true_length[None], temperature[None], top_k[None],
            top_p[None], max_new[None], stop_tokens[None], seed[None], num_samples=num_samples)
        return (jax.tree.map(lambda x: x[0], prefix.replace(cache=[])).replace(
            cache=prefix.cache), result)

    def _prefill_batch_fn(self, params, tokens_PT, lengths_P, temperature_P, top_k_P, top_p_P,
                          max_new_P, stop_PZ, seed_P, *, num_samples):
        """P right-padded prompts in one forward; n first tokens sampled from each last position.

        Rows never interact (causal attention, dropless MoE), so row p equals a lone prefill.
        """
        (P, T), n = tokens_PT.shape, num_samples
        with self._rules():
            model = nnx.merge(self.graphdef, params)
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (P, T))
            (hidden, cache, _), ids = self._forward(model, tokens_PT, positions,
                                                    model.init_cache(P, T))
            h_last = jnp.take_along_axis(hidden, (lengths_P - 1)[:, None, None], axis=1)
            logits_PV = model.logits(h_last)[:, 0]
        keys_PN2 = jax.vmap(lambda s: jax.vmap(
            lambda i: jax.random.fold_in(jax.random.PRNGKey(s), i))(jnp.arange(n)))(seed_P)
        step_keys = jax.vmap(lambda ks, L: jax.vmap(lambda k: jax.random.fold_in(k, L))(ks))(
            keys_PN2, lengths_P)
        rows = lambda x: jnp.repeat(x, n, axis=0)  # noqa: E731  [P, ...] -> [P * n, ...]
        tokens, logp = sample_logits(rows(logits_PV), step_keys.reshape(P * n, 2),
                                     rows(temperature_P), rows(top_k_P), rows(top_p_P))
        max_new_P = jnp.minimum(max_new_P, self.max_target_length - lengths_P)
        stopped = jnp.any(tokens[:, None] == rows(stop_PZ), axis=-1)
        done = stopped | rows(max_new_P <= 1)
        prefix = Prefix(cache=cache, length=lengths_P, tokens=tokens.reshape(P, n),
                        log_prob=logp.reshape(P, n), keys=keys_PN2, done=done.reshape(P, n),
                        temperature=temperature_P, top_k=top_k_P, top_p=top_p_P,
                        max_new=max_new_P, stop_tokens=stop_PZ)
        result = ResultTokens(tokens=tokens, log_prob=logp, valid=jnp.ones((P * n,), bool),
                              lengths=jnp.ones((P * n,), jnp.int32), done=done, stopped=stopped,
                              expert_ids=ids)
        return prefix, result

    def _forward(self, model, tokens_BT, positions_BT, cache):
        """The model's forward; with ``record_routing`` also its experts, [B, T, L_moe, k]."""
        if not self.record_routing:
            return model(tokens_BT, positions_BT, cache=cache), None
        from models import forward_with_routing
        out, ids = forward_with_routing(model, tokens_BT, positions_BT, cache=cache)
        return out, jnp.stack([ids[i] for i in self.moe_layers], axis=2).astype(
            self.routing_dtype)

    def _insert_fn(self, prefix: Prefix, state: DecodeState, slots):
        """One prompt's prefix (``prefill``) into ``slots`` [n]."""
        batched = jax.tree.map(lambda x: x[None], prefix.replace(cache=[]))
        # its cache is already [1, K, bucket, Hd] per layer: a batch of one prompt
        return self._insert_batch_fn(batched.replace(cache=prefix.cache), state, slots[None])

    def _insert_batch_fn(self, prefix: Prefix, state: DecodeState, slots_PN):
        """Batched prefix rows into ``slots_PN`` [P, n]; out-of-range slots are dropped."""
        P, n = slots_PN.shape
        slots = slots_PN.reshape(-1)

        def per_sample(x):  # [P, ...] -> [P * n, ...], row p repeated for its n samples
            return jnp.repeat(x, n, axis=0)

        def put_rows(dst, src, axes):  # rows into slots, at the cache's batch/length axes
            b, t = axes.index("batch"), axes.index("length")
            idx = [slice(None)] * dst.ndim
            idx[b], idx[t] = slots, slice(0, src.shape[t])
            return dst.at[tuple(idx)].set(jnp.repeat(src.astype(dst.dtype), n, axis=b),
                                          mode="drop")

        cache = [{k: put_rows(layer[k], p[k], axes[k]) for k in layer}
                 for layer, p, axes in zip(state.cache, prefix.cache, self._cache_axes)]

        def put(arr, vals):
            return arr.at[slots].set(vals, mode="drop")

        return DecodeState(
            cache=cache,
            tokens=put(state.tokens, prefix.tokens[:, :n].reshape(-1)),
            pos=put(state.pos, per_sample(prefix.length)),
            generated=put(state.generated, jnp.ones((P * n,), jnp.int32)),
            max_new=put(state.max_new, per_sample(prefix.max_new)),
            active=put(state.active, ~prefix.done[:, :n].reshape(-1)),
            keys=put(state.keys, prefix.keys[:, :n].reshape(-1, 2)),
            temperature=put(state.temperature, per_sample(prefix.temperature)),
            top_k=put(state.top_k, per_sample(prefix.top_k)),
            top_p=put(state.top_p, per_sample(prefix.top_p)),
            stop_tokens=put(state.stop_tokens, per_sample(prefix.stop_tokens)))

    def _generate_fn(self, params, state: DecodeState):
        with self._rules():
            model = nnx.merge(self.graphdef, params)
            (hidden, cache, _), ids = self._forward(model, state.tokens[:, None],
                                                    state.pos[:, None], state.cache)
            logits_BV = model.logits(hidden)[:, 0]
        step_keys = jax.vmap(jax.random.fold_in)(state.keys, state.pos + 1)
        tokens, logp = sample_logits(logits_BV, step_keys, state.temperature, state.top_k,
                                     state.top_p)
        live = state.active
        generated = jnp.where(live, state.generated + 1, state.generated)
        stopped = live & jnp.any(tokens[:, None] == state.stop_tokens, axis=-1)
        done = live & (stopped | (generated >= state.max_new))
        new_state = state.replace(
            cache=cache,
            tokens=jnp.where(live, tokens, state.tokens),
            pos=jnp.where(live, state.pos + 1, state.pos),
            generated=generated,
            active=live & ~done)
        result = ResultTokens(tokens=tokens, log_prob=logp, valid=live, lengths=generated,
                              done=done, stopped=stopped,
                              expert_ids=None if ids is None else ids[:, 0])
        return new_state, result
