"""Pieces every recipe composes: run directory, data, student, engine, evaluation, epilogue.

A recipe is ``setup(cfg) -> Run`` (the immutable setup: config, directory, mesh, tokenizer,
data; ``init_student`` adds pi_0 and its engine), a ``step_fn(state, step, loop) -> (state,
metrics, host metrics, rows)`` closure, ``run_loop.train_loop(run, state, step_fn)`` (the
loop every recipe shares) and ``finish`` (the epilogue: export the model unless stopped).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

import models
from models.config import ModelConfig
from mopd_jax import config as cfgmod
from mopd_jax import sharding as shd
from mopd_jax.config import Config, ConfigError
from mopd_jax.data import domains as builtin
from mopd_jax.data.pipeline import PromptPipeline, encode_prompt
from mopd_jax.data.rewards import configure as configure_rewards, score_batch
from mopd_jax.data import run_records
from mopd_jax.metrics import format_config
from mopd_jax import run_dir, validate
from mopd_jax.sampling import Engine, SamplingParams, rollout
from mopd_jax.steps import init_train_state, make_optimizer, make_train_step
from mopd_jax.tokenizer import CharTokenizer, Tokenizer


class RunError(ValueError):
    """A run cannot start: output directory, existing run, tokenizer/vocabulary mismatch."""


@dataclasses.dataclass(frozen=True)
class Run:
    """What a recipe step needs that does not change during the run (the loop's changing
    state is ``Loop``). The student fields are set by ``init_student`` / ``with_model``."""

    cfg: Config
    out: Path
    mesh: Mesh
    tokenizer: Tokenizer
    domains: tuple[str, ...]  # index = domain id in batches and metrics
    train_records: dict[str, list[dict]]
    eval_records: dict[str, list[dict]]
    graphdef: nnx.GraphDef | None = None
    model_cfg: ModelConfig | None = None
    init_params: nnx.State | None = None  # pi_0 as loaded (frozen: 'self' teacher, KL ref)
    engine: Engine | None = None  # the student's rollout engine (shapes of pi_0)
    header: str = ""  # printed when the loop starts (a failed start prints only its error)
    roles: dict = dataclasses.field(default_factory=dict)  # mesh.roles' sub-meshes ({}: none)

    def mesh_for(self, role: str) -> Mesh:
        """The mesh of ``role`` (trainer, sampler, teachers): its sub-mesh under mesh.roles,
        else the one mesh (teachers without their own sub-mesh live with the trainer)."""
        return self.roles.get(role) or self.mesh

    def domain_ids(self, names) -> np.ndarray:
        return np.asarray([self.domains.index(d) for d in names], np.int32)

    def with_model(self, graphdef, params, model_cfg) -> "Run":
        """This run with another model as pi_0 (and an engine for its shapes)."""
        run = dataclasses.replace(self, graphdef=graphdef, init_params=params,
                                  model_cfg=model_cfg, engine=None)
        return dataclasses.replace(run, engine=_engine(run))


@dataclasses.dataclass
class Loop:
    """The loop's state beside the train state: owned by ``train_loop``, checkpointed with it,
    updated by the step functions."""

    samples: dict[str, float] = dataclasses.field(default_factory=dict)  # rollouts per domain
    initial_kl: dict[str, float] = dataclasses.field(default_factory=dict)  # teacher -> KL
    stopped: bool = False  # ended early on SIGTERM/SIGINT
    finished_before: bool = False  # resumed at its end: nothing was run
    elapsed: float = 0.0  # seconds in train_loop

    def count(self, domain: str, n: float = 1) -> None:
        self.samples[domain] = self.samples.get(domain, 0) + n

    def sample_metrics(self) -> dict[str, float]:
        return {f"samples/{d}": float(c) for d, c in sorted(self.samples.items())}


@dataclasses.dataclass(frozen=True)
class Result:
    """What a recipe returns."""

    out: Path  # the run directory (OUT/model holds the model unless stopped)
    params: nnx.State  # the trained params
    stopped: bool
    elapsed: float
    samples: dict[str, float]


# ----------------------------------------------------------------------------- setup
def prepare_out_dir(cfg: Config, resume: bool) -> Path:
    """run.out_dir can hold this run (or fail clearly); writes nothing (``run_dir.start`` does,
    when the loop starts), and refuses to clobber a run unless resuming."""
    return run_dir.check_out_dir(cfg, resume)


def load_tokenizer(cfg: Config):
    if cfg.data.tokenizer == "builtin":
        return builtin.tokenizer()
    from mopd_jax.tokenizer import load_tokenizer as load
    tok = load(cfg.data.tokenizer)
    if tok is None:
        raise RunError(f"data.tokenizer: no tokenizer.json in {cfg.data.tokenizer}; point it at "
                       "the model directory or use 'builtin' for the built-in domains")
    return tok


def load_records(cfg: Config) -> tuple[dict, dict]:
    """(train, eval) records by domain from the built-in domains and the data files."""
    train, evals = run_records.load_located(cfg)
    return ({k: [r for _, r in v] for k, v in train.items()},
            {k: [r for _, r in v] for k, v in evals.items()})


def setup(cfg: Config, *, resume: bool = False, quiet: bool = False) -> Run:
    """Output dir, mesh, tokenizer and data of a run; prints the resolved config.

    Inputs are validated before anything is written, so a bad config or data file leaves no
    half-made run directory behind.
    """
    cfg = recorded_config(cfg)
    tok = load_tokenizer(cfg)
    vocab = getattr(tok, "vocab_size", None)
    if vocab is not None and vocab > cfg.model.vocab_size:
        raise RunError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                       f"{vocab} ids; use a model whose vocabulary covers the tokenizer")
    located_train, located_eval = run_records.load_located(cfg)
    roles = shd.make_role_meshes(cfg.mesh)
    mesh = roles.get("trainer") or shd.make_mesh(cfg.mesh)
    warnings = validate.preflight(
        cfg, cfg.model, tok, [x for v in located_train.values() for x in v],
        [x for v in located_eval.values() for x in v],
        lambda r: encode_prompt(tok, r), list(mesh.devices.flat))
    out = prepare_out_dir(cfg, resume)
    rewards_line = configure_rewards(cfg.rewards)  # an isolation that cannot run fails here
    header = ""
    if not quiet and is_primary():
        procs = jax.process_count()
        header = "\n".join([
            f"# {cfg.run.recipe} run {cfg.run.name!r} -> {out} ({mesh.size} devices, {procs} "
            f"process{'es' if procs > 1 else ''})", *_roles_line(roles), f"# {rewards_line}",
            format_config(cfgmod.to_dict(cfg)), *warnings])
    train = {k: [r for _, r in v] for k, v in located_train.items()}
    evals = {k: [r for _, r in v] for k, v in located_eval.items()}
    all_domains = tuple(sorted(set(train) | set(evals) | set(cfg.mopd.teachers)))
    return Run(cfg, out, mesh, tok, all_domains, train, evals, header=header, roles=roles)


def _roles_line(roles: dict) -> list[str]:
    if not roles:
        return []
    return ["# sub-meshes: " + ", ".join(f"{r} {m.size} devices {dict(m.shape)}"
                                         for r, m in roles.items())]


def recorded_config(cfg: Config) -> Config:
    """``cfg`` as the run records it: with run.init, the init's model (it decides the student)."""
    init_cfg = validate.init_model_config(cfg.run.init) if cfg.run.init else None
    if init_cfg is None:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(init_cfg,
                                                              **runtime_overrides(cfg.model)))


def runtime_overrides(model_cfg) -> dict:
    """The ``RUNTIME_FIELDS`` (kernels, layer scan, remat) set away from their defaults: they
    apply on top of ``run.init``'s (and the teachers') own model config."""
    from models.config import RUNTIME_FIELDS, ModelConfig
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    return {k: getattr(model_cfg, k) for k in RUNTIME_FIELDS
            if getattr(model_cfg, k) != defaults[k]}


def init_student(run: Run) -> Run:
    """``run`` with the student pi_0: run.init loaded, or a random init of cfg.model."""
    from mopd_jax.loading import load_model

    cfg = run.cfg
    src = cfg.run.init
    if src:
        kw = {"hf": src[3:]} if src.startswith("hf:") else {"checkpoint": src}
        if not Path(kw.get("hf") or kw["checkpoint"]).is_dir():
            raise RunError(f"run.init: checkpoint {src!r} not found; train pi_0 first (recipe "
                           "sft) or fix the path")
        loaded = load_model(mesh=run.mesh, role="train", runtime=runtime_overrides(cfg.model),
                            **kw)
        graphdef, params, mcfg = loaded.graphdef, loaded.params, loaded.cfg
    else:
        mcfg = cfg.model
        graphdef, params = shd.init_sharded(
            lambda: models.build(mcfg, nnx.Rngs(cfg.run.seed)), run.mesh, "train")
    vocab = getattr(run.tokenizer, "vocab_size", None)
    if vocab is not None and vocab > mcfg.vocab_size:
        raise RunError(f"run.init: model vocabulary {mcfg.vocab_size} < tokenizer {vocab}")
    return run.with_model(graphdef, params, mcfg)


def make_pipeline(run: Run, batch_size: int) -> PromptPipeline:
    """The global prompt stream, the same on every process: rollouts, scoring and steps run
    SPMD over the whole mesh, so every process must feed them the same batch (one shard)."""
    d = run.cfg.data
    weights = {k: v for k, v in d.weights.items() if k in run.train_records} or None
    return PromptPipeline(run.train_records, encode=lambda r: encode_prompt(run.tokenizer, r),
                          batch_size=batch_size, weights=weights, seed=run.cfg.run.seed,
                          max_prompt_len=d.max_prompt_len, overflow=d.overflow)


def seq_len(cfg: Config) -> int:
    """Fixed row width of every batch: longest prompt + longest response."""
    return cfg.data.max_prompt_len + cfg.rollout.max_new_tokens


def router_replay(cfg: Config) -> str | None:
    """The field asking for router replay in this recipe ('mopd.router_replay', ...), or None."""
    for section in ("mopd", "grpo"):
        if cfg.run.recipe == section and getattr(cfg, section).router_replay:
            return f"{section}.router_replay"
    return None


def _engine(run: Run) -> Engine:
    """The rollout engine for pi_0's shapes (compiles on first use, not here); it records the
    routing when the recipe replays it."""
    cfg = run.cfg
    replay = router_replay(cfg)
    if replay and not run.model_cfg.num_experts:
        raise RunError(f"{replay}=true: the student ({run.model_cfg.name}) has no MoE layers, "
                       f"so there is no routing to replay; set {replay}=false")
    return Engine(run.graphdef, run.init_params, max_concurrent_decodes=cfg.rollout.slots,
                  record_routing=bool(replay),
                  max_prefill_length=cfg.data.max_prompt_len, max_target_length=seq_len(cfg),
                  max_prefill_batch=cfg.rollout.prefill_batch,
                  stop_tokens=(run.tokenizer.eos_id,), mesh=run.mesh_for("sampler"),
                  pad_id=getattr(run.tokenizer, "pad_id", 0) or 0)


def sampling_params(cfg: Config, greedy: bool = False) -> SamplingParams:
    r = cfg.rollout
    return SamplingParams(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                          greedy=greedy, max_new_tokens=r.max_new_tokens)


def step_seed(cfg: Config, step: int, salt: int = 0) -> int:
    return (cfg.run.seed * 1_000_003 + step * 7919 + salt) % (2 ** 31)


def responses(run: Run, rb) -> list[str]:
    return [run.tokenizer.decode(rb.tokens[i, rb.prompt_lengths[i]:rb.lengths[i]].tolist())
            for i in range(len(rb))]


def rewards_of(run: Run, rb) -> np.ndarray:
    rewards = score_batch(responses(run, rb), [dict(m) for m in rb.metadata],
                          default=run.cfg.data.default_reward)
    if jax.process_count() > 1:  # a sandboxed test may time out on one host only: use host 0's
        from jax.experimental import multihost_utils
        rewards = multihost_utils.broadcast_one_to_all(rewards)
    return rewards


def evaluate(run: Run, params, domains=None) -> dict[str, float]:
    """Greedy mean reward per domain on the fixed, seeded held-out set."""
    engine = run.engine
    out = {}
    for d in domains or sorted(run.eval_records):
        recs = run.eval_records[d]
        prompts = [{"tokens": encode_prompt(run.tokenizer, r), "domain": d, "metadata": r}
                   for r in recs]
        prompts = [p for p in prompts if len(p["tokens"]) <= run.cfg.data.max_prompt_len]
        if not prompts:
            continue
        rb = rollout(engine, params, prompts, sampling=sampling_params(run.cfg, greedy=True))
        out[d] = float(rewards_of(run, rb).mean())
    return out


def new_train_state(run: Run, params=None):
    """Optimizer and train state from a copy of pi_0 (the step donates its state; pi_0 stays
    alive as the 'self' teacher, the KL reference and the engine's shape template)."""
    ocfg = run.cfg.optimizer
    opt = make_optimizer(ocfg) if not ocfg.sample_budget else _sample_optimizer(ocfg)
    params = jax.tree.map(jnp.copy, run.init_params if params is None else params)
    return opt, init_train_state(params, opt, run.mesh)


def _sample_optimizer(ocfg):
    """``make_optimizer``'s AdamW with the learning rate a state field: a sample-budget run
    sets it before every step from the samples consumed (``lr_at``)."""
    import optax
    parts = [optax.clip_by_global_norm(ocfg.clip_norm)] if ocfg.clip_norm > 0 else []
    parts.append(optax.inject_hyperparams(optax.adamw)(
        learning_rate=ocfg.lr, b1=ocfg.b1, b2=ocfg.b2, eps=ocfg.eps,
        weight_decay=ocfg.weight_decay))
    return optax.chain(*parts)


def lr_at(ocfg, step: int, samples: float) -> float:
    """Learning rate of a sample-budget run before 0-based ``step`` with ``samples`` consumed:
    linear warmup over warmup_steps steps (0 at step 0, as optax's), times a cosine from lr
    to lr * min_lr_ratio over samples / sample_budget."""
    import math
    warm = min(1.0, step / ocfg.warmup_steps) if ocfg.warmup_steps else 1.0
    p = min(1.0, samples / ocfg.sample_budget)
    end = ocfg.min_lr_ratio
    return ocfg.lr * warm * (end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * p)))


def _set_lr(state, lr: float):
    opt_state = state["opt_state"]
    inj = opt_state[-1]
    old = inj.hyperparams["learning_rate"]
    new = jax.device_put(np.asarray(lr, old.dtype), old.sharding)
    inj = inj._replace(hyperparams={**inj.hyperparams, "learning_rate": new})
    return {**state, "opt_state": (*opt_state[:-1], inj)}


def check_untruncated(cfg: Config) -> None:
    """MOPD and GRPO use the sampler's log-prob as mu, which is the *untruncated* tempered
    softmax (sampling/sampler.py): under top-k / top-p it is not the distribution the tokens
    came from, and the importance ratio pi/mu would be biased without a word. Refuse."""
    r = cfg.rollout
    if r.top_k or r.top_p < 1.0:
        field, value = ("rollout.top_k", r.top_k) if r.top_k else ("rollout.top_p", r.top_p)
        raise ConfigError(f"{field}={value}: recipe {cfg.run.recipe} trains on the sampler's "
                          "log-probs, which are untruncated, so truncated sampling would bias "
                          "its importance ratio; set rollout.top_k=0 and rollout.top_p=1 "
                          "(rollout.temperature is fine)")


def compile_train_step(run: Run, opt, objective):
    return make_train_step(run.graphdef, opt, objective,
                           microbatches=run.cfg.optimizer.microbatches, mesh=run.mesh)


# ----------------------------------------------------------------------------- the loop
def is_primary() -> bool:
    """Process 0 writes the run's files (metrics, rollouts, reports); every process computes."""
    return jax.process_index() == 0


def finish(run: Run, params, loop: Loop) -> Result:
    """The recipes' epilogue: export OUT/model unless the loop was stopped."""
    if not loop.stopped and not loop.finished_before:
        export_student(run, params)
    return Result(run.out, params, loop.stopped, loop.elapsed, dict(loop.samples))


def open_store(run: Run):
    """The run's rollout store (``OUT/rollouts``), or None when off or not process 0."""
    if not run.cfg.run.store_rollouts or not is_primary():  # one writer per store
        return None
    return run_dir.LazyStore(run.out / "rollouts", seq_len(run.cfg))


def export_student(run: Run, params, name: str = "model") -> Path:
    """Save the trained params as a model checkpoint (teacher / pi_0 / student) + tokenizer."""
    from mopd_jax.checkpoint import save_model
    from mopd_jax.outputs import atomic_dir

    out = (run.out / name).absolute()
    # Written beside OUT/<name> and renamed into place: a model dir is whole or absent. The
    # run's own earlier export (a resumed run that went on) is replaced.
    with atomic_dir(out, replace_own=True, primary=is_primary(), barrier=_barrier) as tmp:
        save_model(tmp, params, run.model_cfg)
        if is_primary():
            if isinstance(run.tokenizer, CharTokenizer):
                (tmp / "char_tokenizer.json").write_text(json.dumps(
                    {"alphabet": run.tokenizer.alphabet,
                     "vocab_size": run.tokenizer.vocab_size}))
            elif getattr(run.tokenizer, "directory", None):
                import shutil
                for f in Path(run.tokenizer.directory).iterdir():
                    if f.name.startswith("tokenizer") or f.name == "chat_template.jinja":
                        shutil.copy(f, tmp / f.name)
    return out


def _barrier() -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("mopd_export")
