"""Rollout engine: greedy = full-forward argmax = transformers, log-probs = trainer's, sampling
distribution (chi-square), no recompiles, sharded = single device, shared prefill, rollouts."""

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from models.config import preset
from models import build
from mopd_jax.sampling import GREEDY, Engine, SamplingParams, rollout, sample_logits

ATOL_LOGP = 1e-5  # fp32, set once (the bound)


@pytest.fixture(scope="module")
def tiny():
    model = build(preset("tiny"), nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    return model, graphdef, params


@pytest.fixture(scope="module")
def engine(tiny):
    _, graphdef, params = tiny
    return Engine(graphdef, params, max_concurrent_decodes=4, max_prefill_length=32,
                  max_target_length=64)


def _prompts(lengths, seed=0, vocab=128):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, size=n).tolist() for n in lengths]


def _full_logits(model, tokens_BT):
    hidden, _, _ = model(jnp.asarray(tokens_BT))
    return model.logits(hidden)


@contextlib.contextmanager
def count_compiles():
    box = {"n": 0}

    def listener(name, *_, **__):
        if name == "/jax/core/compile/backend_compile_duration":
            box["n"] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield box
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@pytest.mark.parametrize("variant", ["tiny", "tiny-tied", "tiny-moe"])
def test_greedy_equals_full_forward_argmax_every_step(tiny, engine, variant):
    if variant == "tiny":
        model, _, params = tiny
    else:
        cfg = preset("tiny", tie_word_embeddings=True) if variant == "tiny-tied" else preset(
            "tiny-moe")
        model = build(cfg, nnx.Rngs(1))
        graphdef, params = nnx.split(model)
        engine = Engine(graphdef, params, max_concurrent_decodes=4, max_prefill_length=32,
                        max_target_length=64)
    batch = rollout(engine, params, _prompts([5, 17, 9, 3, 30]), sampling=dataclasses.replace(
        GREEDY, max_new_tokens=12))
    logits = _full_logits(model, batch.tokens)
    argmax = np.asarray(jnp.argmax(logits, axis=-1))
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    for r in range(len(batch)):
        p, n = batch.prompt_lengths[r], batch.response_lengths[r]
        assert n == 12 and batch.finish_reason[r] == "length"
        # token t is the argmax of the logits at t - 1, for every generated t
        np.testing.assert_array_equal(batch.tokens[r, p:p + n], argmax[r, p - 1:p + n - 1])
        np.testing.assert_allclose(batch.logprobs[r, p:p + n],
                                   logp[r, np.arange(p - 1, p + n - 1), batch.tokens[r, p:p + n]],
                                   atol=ATOL_LOGP)


def test_greedy_equals_transformers_generate(tiny):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from models.hf import hf_config_dict, iter_hf_tensors
    model, graphdef, params = tiny
    cfg = model.cfg
    hf_cfg = transformers.Qwen3Config(**hf_config_dict(cfg))
    hf = transformers.Qwen3ForCausalLM(hf_cfg).eval()
    sd = {k: torch.from_numpy(np.array(v)) for k, v in iter_hf_tensors(params, cfg)}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    hf.generation_config.pad_token_id = 0
    engine = Engine(graphdef, params, max_concurrent_decodes=2, max_prefill_length=16,
                    max_target_length=48)
    prompts = _prompts([6, 11], seed=3)
    batch = rollout(engine, params, prompts,
                    sampling=dataclasses.replace(GREEDY, max_new_tokens=20))
    for r, prompt in enumerate(prompts):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                              eos_token_id=None)
        ours = batch.tokens[r, :batch.lengths[r]]
        np.testing.assert_array_equal(ours, out[0].numpy())


@pytest.mark.parametrize("sampling", [
    SamplingParams(temperature=0.7, top_k=20, top_p=0.9, max_new_tokens=10, seed=1),
    SamplingParams(temperature=1.3, max_new_tokens=10, seed=2),
    dataclasses.replace(GREEDY, max_new_tokens=10),
], ids=["t0.7-k20-p0.9", "t1.3", "greedy"])
def test_sampler_logprob_equals_trainer_logprob(tiny, engine, sampling):
    from mopd_jax.chunked import chunked_token_logprobs
    model, graphdef, params = tiny
    batch = rollout(engine, params, _prompts([4, 13, 8], seed=5), n=2, sampling=sampling)
    T = 1.0 if sampling.is_greedy else sampling.temperature
    tokens = jnp.asarray(batch.tokens)
    hidden, _, _ = model(tokens)
    # Trainer side: log p(tokens[:, t] | tokens[:, :t]) from hidden t - 1, tempered.
    trainer = np.asarray(chunked_token_logprobs(hidden[:, :-1], model.lm_head_weight(),
                                                tokens[:, 1:], temperature=T, vocab_chunk=32,
                                                seq_chunk=16))
    reference = np.asarray(jnp.take_along_axis(
        jax.nn.log_softmax(model.logits(hidden[:, :-1]) / T, axis=-1),
        tokens[:, 1:, None], axis=-1)[..., 0])
    mask = batch.response_mask[:, 1:]
    assert mask.sum() == batch.response_lengths.sum() > 0
    np.testing.assert_allclose(batch.logprobs[:, 1:][mask], trainer[mask], atol=ATOL_LOGP)
    np.testing.assert_allclose(batch.logprobs[:, 1:][mask], reference[mask], atol=ATOL_LOGP)
    try:
        from mopd_jax.steps import token_logprobs_step
    except ImportError:
        return
    step = np.asarray(token_logprobs_step(graphdef, params, tokens, temperature=T))
    np.testing.assert_allclose(batch.logprobs[:, 1:][mask], step[mask], atol=ATOL_LOGP)


def _expected_probs(logits, T, k, p):
    """Numpy reference: softmax(logits/T), keep top-k, then the top-p nucleus, renormalise."""
    z = logits / T
    order = np.argsort(-z, kind="stable")
    keep = np.ones_like(z, bool)
    if k:
        keep[order[k:]] = False
    probs = np.exp(z - z.max()) * keep
    probs /= probs.sum()
    if p < 1.0:
        sorted_p = probs[order]
        before = np.cumsum(sorted_p) - sorted_p
        keep[order[before >= p]] = False
        probs = probs * keep
        probs /= probs.sum()
    return probs


@pytest.mark.parametrize("T,k,p", [(1.0, 0, 1.0), (0.6, 0, 1.0), (1.5, 3, 1.0),
                                   (1.0, 0, 0.7), (0.8, 5, 0.8)])
def test_sampling_frequencies_chi_square(T, k, p):
    V, N = 8, 40_000
    logits = np.array([2.0, 1.5, 1.0, 0.6, 0.3, 0.0, -0.5, -1.0], np.float32)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(1234), i))(jnp.arange(N))
    tokens, logp = jax.jit(sample_logits)(
        jnp.broadcast_to(logits, (N, V)), keys, jnp.full((N,), T), jnp.full((N,), k, jnp.int32),
        jnp.full((N,), p))
    expected = _expected_probs(logits.astype(np.float64), T, k, p)
    counts = np.bincount(np.asarray(tokens), minlength=V)
    assert counts[expected == 0].sum() == 0, "drew a truncated token"
    support = expected > 0
    chi2, pval = stats.chisquare(counts[support], expected[support] * N)
    assert pval > 1e-3, (counts, expected * N, chi2)
    # the reported log-prob is the tempered, untruncated one
    full = np.log(np.exp(logits / T) / np.exp(logits / T).sum())
    np.testing.assert_allclose(np.asarray(logp), full[np.asarray(tokens)], atol=1e-5)


def test_no_recompilation_after_warmup(tiny, engine):
    _, _, params = tiny
    rng = np.random.default_rng(0)
    buckets_lengths = [3, 20, 30]  # buckets 16 and 32
    configs = [dataclasses.replace(GREEDY, max_new_tokens=6),
               SamplingParams(temperature=0.9, top_k=7, max_new_tokens=9),
               SamplingParams(temperature=1.2, top_p=0.8, max_new_tokens=4, stop_tokens=(5,))]
    fresh = Engine(engine.graphdef, params, max_concurrent_decodes=4, max_prefill_length=32,
                   max_target_length=64, max_prefill_batch=4)
    with count_compiles() as warm:
        # prompt batches of 1 and 4 x buckets 16, 32 x n in (1, 2), where they fit 4 slots
        assert fresh.warmup(params, num_samples=(1, 2)) == 2 * 2 + 1 * 2
        for sampling in configs[:2]:  # a truncating and a greedy request
            rollout(fresh, params, _prompts(buckets_lengths, seed=1), sampling=sampling)
    assert warm["n"] > 0  # the counter does see compiles
    with count_compiles() as compiles:
        done = 0
        for i in range(10):  # 10 rollouts x 10 prompts = 100 requests of mixed lengths
            lengths = rng.integers(1, 33, size=10)
            batch = rollout(fresh, params, _prompts(lengths, seed=10 + i), n=1 + i % 2,
                            sampling=dataclasses.replace(configs[i % 3], seed=i))
            done += len(set(batch.prompt_index.tolist()))
    assert done == 100
    assert compiles["n"] == 0


def test_sharded_decode_equals_single_device(tiny):
    from mopd_jax.sharding import make_mesh
    _, graphdef, params = tiny
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2, "expert": 1})
    kw = dict(max_concurrent_decodes=4, max_prefill_length=16, max_target_length=32)
    single = Engine(graphdef, params, **kw)
    sharded = Engine(graphdef, params, mesh=mesh, **kw)
    prompts = _prompts([3, 9, 16, 5, 12], seed=7)
    for sampling in (dataclasses.replace(GREEDY, max_new_tokens=10),
                     SamplingParams(temperature=1.0, top_k=30, max_new_tokens=10, seed=4)):
        a = rollout(single, params, prompts, n=2, sampling=sampling)
        b = rollout(sharded, params, prompts, n=2, sampling=sampling)
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=ATOL_LOGP)
    # the decode state really is distributed over the mesh
    state = sharded.init_decode_state()
    assert len(state.cache[0]["k"].sharding.device_set) == 8
    assert state.cache[0]["k"].sharding.spec[0] == ("data", "fsdp")


def test_n_samples_share_one_prefill(tiny, engine):
    _, _, params = tiny
    before = engine.prefill_calls
    prompts = _prompts([5, 9, 12], seed=2)
    batch = rollout(engine, params, prompts, n=3,
                    sampling=SamplingParams(temperature=1.5, max_new_tokens=8, seed=9))
    assert engine.prefill_calls - before == 3
    assert len(batch) == 9
    np.testing.assert_array_equal(batch.prompt_index, np.repeat(np.arange(3), 3))
    np.testing.assert_array_equal(batch.sample_index, np.tile(np.arange(3), 3))
    for g in range(3):
        rows = batch.tokens[3 * g:3 * g + 3]
        assert (rows[:, :len(prompts[g])] == np.array(prompts[g])).all()
        responses = {tuple(r[len(prompts[g]):len(prompts[g]) + 8]) for r in rows}
        assert len(responses) == 3, "samples of one prompt must differ (independent keys)"


def test_prefill_batch_rows_equal_lone_prefills(tiny, engine):
    """Prompts of different buckets prefilled together give what each gives alone."""
    _, _, params = tiny
    prompts = _prompts([3, 17, 9], seed=5)
    samplings = [SamplingParams(temperature=1.1, top_k=9, seed=s) for s in (1, 2, 3)]
    prefix, first = engine.prefill_batch(params, prompts, samplings, num_samples=2)
    assert prefix.tokens.shape == (16, 2)  # 3 prompts padded to the full batch (16)
    for p, (tokens, sampling) in enumerate(zip(prompts, samplings)):
        padded, L = engine.pad_tokens(tokens)
        lone, res = engine.prefill(params, padded, L, sampling=sampling, num_samples=2)
        np.testing.assert_array_equal(first.tokens[2 * p:2 * p + 2], res.tokens)
        np.testing.assert_allclose(first.log_prob[2 * p:2 * p + 2], res.log_prob,
                                   atol=ATOL_LOGP)
        for a, b in zip(jax.tree.leaves(prefix.cache), jax.tree.leaves(lone.cache)):
            np.testing.assert_allclose(a[p, :, :L], b[0, :, :L], atol=ATOL_LOGP)


def test_continuous_batching_matches_one_request_at_a_time(tiny, engine):
    """More prompts than slots: refilled slots give exactly what a lone request gives."""
    _, graphdef, params = tiny
    prompts = _prompts([3, 25, 7, 12, 1, 30, 9, 4, 16, 2], seed=11)
    sampling = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=9, seed=3)
    together = rollout(engine, params, prompts, sampling=sampling)
    lone = Engine(graphdef, params, max_concurrent_decodes=1, max_prefill_length=32,
                  max_target_length=64)
    alone = rollout(lone, params, prompts, sampling=sampling)
    np.testing.assert_array_equal(together.tokens, alone.tokens)
    np.testing.assert_allclose(together.logprobs, alone.logprobs, atol=ATOL_LOGP)


def test_rollout_arrays_masks_lengths_finish_reasons(tiny, engine):
    _, _, params = tiny
    prompts = [{"tokens": t, "domain": d, "id": i} for i, (t, d) in enumerate(zip(
        _prompts([4, 10, 6, 2, 15], seed=4), ["math", "code", "math", "if", "code"]))]
    free = rollout(engine, params, prompts, sampling=dataclasses.replace(GREEDY,
                                                                         max_new_tokens=8))
    # make prompt 1 stop early: its own 3rd greedy token becomes a stop token
    p1 = free.tokens[1, free.prompt_lengths[1]:free.lengths[1]].tolist()
    stop = p1[2]
    first_hit = p1.index(stop)
    batch = rollout(engine, params, prompts, pad_to=40,
                    sampling=dataclasses.replace(GREEDY, max_new_tokens=8, stop_tokens=(stop,)))
    assert batch.tokens.shape == (5, 40) and batch.logprobs.shape == (5, 40)
    assert batch.finish_reason[1] == "stop" and batch.response_lengths[1] == first_hit + 1
    for r in range(5):
        p, n, L = batch.prompt_lengths[r], batch.response_lengths[r], batch.lengths[r]
        assert p == len(prompts[r]["tokens"]) and L == p + n
        assert batch.prompt_mask[r].sum() == p and batch.prompt_mask[r, :p].all()
        assert batch.response_mask[r].sum() == n and batch.response_mask[r, p:L].all()
        assert not (batch.prompt_mask[r] & batch.response_mask[r]).any()
        assert (batch.tokens[r, L:] == 0).all()
        assert (batch.logprobs[r, :p] == 0).all() and (batch.logprobs[r, L:] == 0).all()
        assert (batch.logprobs[r, p:L] < 0).all()
        response = batch.tokens[r, p:L].tolist()
        if batch.finish_reason[r] == "stop":
            assert response[-1] == stop and stop not in response[:-1]
        else:
            assert batch.finish_reason[r] == "length" and n == 8 and stop not in response
        assert batch.domain[r] == prompts[r]["domain"] and batch.metadata[r]["id"] == r
    np.testing.assert_array_equal(batch.prompt_index, np.arange(5))
    # stop tokens change nothing before the stop
    np.testing.assert_array_equal(batch.tokens[1, :batch.lengths[1]],
                                  free.tokens[1, :batch.lengths[1]])


def test_engine_api_shapes_and_errors(tiny, engine):
    from mopd_jax.sampling import EngineError
    _, _, params = tiny
    assert engine.max_concurrent_decodes == 4 and engine.samples_per_slot == 1
    assert engine.max_prefill_length == 32 and engine.prefill_buckets == (16, 32)
    padded, length = engine.pad_tokens([1, 2, 3])
    assert padded.shape == (16,) and length == 3
    prefix, first = engine.prefill(params, padded, length, sampling=GREEDY, num_samples=2)
    assert first.tokens.shape == (2,) and first.tokens[0] == first.tokens[1]
    state = engine.bulk_insert(prefix, engine.init_decode_state(), [3, 1])
    state, res = engine.generate(params, state)
    assert np.asarray(res.valid).tolist() == [False, True, False, True]
    assert np.asarray(res.lengths)[[1, 3]].tolist() == [2, 2]
    with pytest.raises(EngineError, match="max_prefill_length"):
        engine.pad_tokens(list(range(40)))
    with pytest.raises(EngineError, match="slots"):
        engine.bulk_insert(prefix, state, [0])


def test_generate_cli_json(tiny, capsys):
    import argparse
    import json

    from mopd_jax.config import ConfigError
    from mopd_jax.sampling.cli import add_generate_parser
    model, _, _ = tiny
    parser = argparse.ArgumentParser()
    add_generate_parser(parser.add_subparsers(dest="verb"))
    args = parser.parse_args(["generate", "--preset", "tiny", "--tokens", "3,1,4,1,5",
                              "--greedy", "--max-new-tokens", "6", "--n", "2", "--json"])
    args.run(args)
    out = json.loads(capsys.readouterr().out)
    assert len(out["samples"]) == 2 and out["prompt_tokens"] == [3, 1, 4, 1, 5]
    seq = out["prompt_tokens"] + out["samples"][0]["tokens"]
    logits = _full_logits(model, [seq])[0]
    np.testing.assert_array_equal(out["samples"][0]["tokens"],
                                  np.asarray(jnp.argmax(logits, -1))[4:-1])
    np.testing.assert_allclose(out["samples"][0]["logprobs"], np.asarray(
        jax.nn.log_softmax(logits, -1))[np.arange(4, 10), seq[5:]], atol=ATOL_LOGP)
    assert out["samples"][1]["tokens"] == out["samples"][0]["tokens"]
    bad = parser.parse_args(["generate", "--preset", "tiny", "--tokens", "1", "--greedy",
                             "--temperature", "0.5"])
    with pytest.raises(ConfigError, match="--greedy"):
        bad.run(bad)
    bad = parser.parse_args(["generate", "--preset", "tiny", "--tokens", "1,x"])
    with pytest.raises(ConfigError, match="--tokens"):
        bad.run(bad)
