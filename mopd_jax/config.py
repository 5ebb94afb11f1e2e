"""Typed, frozen configs loaded from YAML with ``--set path.to.field=value`` overrides.

Every section is a frozen dataclass whose fields carry a docstring (the string right after the
field). Unknown keys, wrong types and out-of-range values raise ``ConfigError`` naming the
dotted field and the fix. ``model:`` accepts ``preset: NAME`` (defaults from a named preset) or
``hf: DIR`` (read a Hugging Face ``config.json``), then any ModelConfig field as an override.
"""

from __future__ import annotations

import ast
import difflib
import dataclasses
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from models.config import ModelConfig, ModelConfigError, preset
from mopd_jax.estimators import EstimatorKnobs
from mopd_jax.merge import METHODS as MERGE_METHODS
from mopd_jax.recipes import RECIPES
from mopd_jax.data.isolation import MODES as _ISOLATION_MODES
from mopd_jax.data.rewards import DISTINCT_ANSWERS as _DISTINCT_ANSWERS
from mopd_jax.sharding import MeshConfig, MeshError


class ConfigError(ValueError):
    """A user-fixable configuration problem; the message names the field and the fix."""


def _check(ok: bool, field: str, msg: str):
    if not ok:
        raise ConfigError(f"{field}: {msg}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Which recipe runs, where it writes, how it is seeded and checkpointed."""

    name: str = "run"
    """Run name, used in logs."""
    out_dir: str = "runs/default"
    """Directory for checkpoints, metrics, rollouts and reports."""
    seed: int = 0
    """Seed of parameter init, data order and sampling."""
    recipe: str = "mopd"
    """What ``mopd train`` runs (``mopd_jax.recipes.RECIPES``): sft, grpo, mopd, and the
    baselines mix_rl, cascade, offpolicy_ft, merge."""
    init: str = ""
    """Student start: an Orbax model checkpoint dir, ``hf:DIR``, or '' for a random init."""
    checkpoint_every: int = 50
    """Save a resumable checkpoint every this many steps (and at the end / on SIGTERM)."""
    keep_checkpoints: int = 3
    """How many recent checkpoints to keep."""
    eval_every: int = 0
    """Evaluate on the held-out set every this many steps (0: only at the end)."""
    store_rollouts: bool = True
    """Append every step's rollouts to the tensorstore rollout store ``OUT/rollouts``."""
    store_routing: bool = False
    """MOPD with mopd.router_replay: also store the sampler's experts per token (L_moe * k
    bytes a token) in ``OUT/rollouts/expert_ids``."""
    log_every: int = 0
    """Off a terminal, a progress line every this many steps (0: about 20 lines a run)."""
    log_every_s: float = 60.0
    """... and at least every this many seconds."""
    max_staleness: int = 0
    """MOPD: sample the rollouts of the next k steps while the current one trains (on the
    sampler sub-mesh with ``mesh.roles``); a step trains on rollouts of policy version >=
    step - k. 0: sample, score and train in sequence."""

    def __post_init__(self):
        _check(self.recipe in RECIPES, "run.recipe",
               f"unknown recipe {self.recipe!r}; choose one of {sorted(RECIPES)}")
        _check(self.checkpoint_every >= 1, "run.checkpoint_every", "must be >= 1")
        _check(self.keep_checkpoints >= 1, "run.keep_checkpoints", "must be >= 1")
        _check(self.eval_every >= 0, "run.eval_every", "must be >= 0")
        _check(self.log_every >= 0, "run.log_every", "must be >= 0")
        _check(self.log_every_s > 0, "run.log_every_s", "must be > 0")
        _check(self.max_staleness >= 0, "run.max_staleness", "must be >= 0 (0: synchronous)")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Prompt sources, mixing and length policy."""

    builtin: tuple[str, ...] = ()
    """Built-in synthetic domains to use (add, sort, rev); no download needed."""
    builtin_size: int = 4096
    """Training problems generated per built-in domain."""
    files: tuple[str, ...] = ()
    """Prompt files (.jsonl, .parquet, .array_record) with fields prompt, domain, metadata."""
    eval_files: tuple[str, ...] = ()
    """Held-out evaluation files (same format); built-in domains bring their own split."""
    eval_size: int = 128
    """Evaluation problems per domain (the first N of each domain's eval records)."""
    weights: dict[str, float] = dataclasses.field(default_factory=dict)
    """Per-domain mixing weights (default: equal)."""
    max_prompt_len: int = 32
    """Longest prompt in tokens; longer ones follow ``overflow``."""
    overflow: typing.Literal["drop", "truncate"] = "drop"
    """Too-long prompts: 'drop' them or 'truncate' to the last max_prompt_len tokens (counted)."""
    tokenizer: str = "builtin"
    """'builtin' (character tokenizer of the built-in domains) or a directory with tokenizer.json."""
    default_reward: str = "exact_match"
    """Reward for records without a ``reward`` field (exact_match, math, code)."""
    only_domains: tuple[str, ...] = ()
    """Restrict training prompts to these domains (GRPO teachers: one domain each)."""
    max_unk_fraction: float = 0.01
    """Refuse data whose prompts and answers map more than this fraction of their tokens to
    the tokenizer's unknown token (a count is printed whenever any do)."""

    def __post_init__(self):
        _check(self.builtin_size >= 1, "data.builtin_size", "must be >= 1")
        _check(self.eval_size >= 1, "data.eval_size", "must be >= 1")
        _check(self.max_prompt_len >= 1, "data.max_prompt_len", "must be >= 1")
        _check(0 <= self.max_unk_fraction <= 1, "data.max_unk_fraction", "must be in [0, 1]")
        for d, w in self.weights.items():
            _check(w > 0, f"data.weights.{d}", f"must be > 0, got {w}")


@dataclasses.dataclass(frozen=True)
class CodeRewardConfig:
    """The ``code`` reward's sandbox (``mopd_jax/data/isolation.py``)."""

    isolation: typing.Literal[_ISOLATION_MODES] = "auto"
    """OS isolation of each candidate: bwrap or unshare (no network, read-only system and
    interpreter dirs, only its work dir writable, uid nobody under root), none (rlimits and
    the in-process guard), auto (the first that works here; the run header says which)."""


@dataclasses.dataclass(frozen=True)
class MathRewardConfig:
    """The ``math`` reward."""

    distinct_answers: typing.Literal[_DISTINCT_ANSWERS] = "zero"
    """A response boxing several different answers: zero (scores 0, as strict graders do) or
    last (the last one is graded)."""


@dataclasses.dataclass(frozen=True)
class RewardsConfig:
    """Run-wide settings of the built-in rewards (records choose which reward)."""

    code: CodeRewardConfig = CodeRewardConfig()
    """``code`` reward sandbox."""
    math: MathRewardConfig = MathRewardConfig()
    """``math`` reward grading."""


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """How the student samples (the sampler's log-probs are of this distribution)."""

    temperature: float = 1.0
    """Sampling temperature; teacher logits are divided by it too (MOPD.md)."""
    top_k: int = 0
    """Top-k truncation (0: off)."""
    top_p: float = 1.0
    """Nucleus truncation (1: off)."""
    max_new_tokens: int = 16
    """Longest response in tokens."""
    slots: int = 64
    """Concurrent decode slots of the engine (continuous batching)."""
    prefill_batch: int = 16
    """Prompts prefilled in one forward when that many can start at once (else one at a
    time); 1 turns batching off. Each length bucket compiles once per shape (1 and this)."""

    def __post_init__(self):
        _check(self.temperature > 0, "rollout.temperature", "must be > 0")
        _check(self.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
        _check(self.slots >= 1, "rollout.slots", "must be >= 1")
        _check(self.prefill_batch >= 1, "rollout.prefill_batch", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning on (prompt, answer) records: makes pi_0."""

    batch_size: int = 64
    """Sequences per step."""
    target_field: str = "answer"
    """Record field holding the target response."""


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """GRPO (teachers, Mix-RL, Cascade): group sampling, outcome rewards, PPO clip."""

    prompts_per_step: int = 16
    """Prompts per step; each gets ``group_size`` rollouts."""
    group_size: int = 8
    """Rollouts per prompt (>= 2)."""
    dynamic_sampling: bool = True
    """Drop prompt groups whose rewards are all equal (they carry no signal)."""
    clip_low: float = 0.2
    """PPO ratio clip below 1."""
    clip_high: float = 0.28
    """PPO ratio clip above 1 (clip-higher)."""
    dr_grpo: bool = False
    """Dr. GRPO: no std normalisation of advantages and token-sum aggregation."""
    kl_coef: float = 0.0
    """Coefficient of the k3 KL to the initial policy (0: off)."""
    resample_rounds: int = 2
    """Dynamic sampling: extra rounds per step that draw only the missing groups' prompts;
    groups still missing after them are padding rows (out of the loss and the metrics)."""
    router_replay: bool = False
    """MoE student: the train forward uses the experts the sampler chose for each token (R3),
    gate weights from the current router at those experts."""

    def __post_init__(self):
        _check(self.prompts_per_step >= 1, "grpo.prompts_per_step", "must be >= 1")
        _check(self.group_size >= 2, "grpo.group_size", "must be >= 2")
        _check(self.resample_rounds >= 0, "grpo.resample_rounds", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class MOPDConfig(EstimatorKnobs):
    """Multi-teacher on-policy distillation (MOPD.md): routing, estimator and its knobs.

    The estimator's knobs (estimator, a_max, is_low, is_high, topk, aggregation, dn_rescale)
    are declared once in ``estimators.EstimatorKnobs``; the loss derives its configuration
    from this one with ``DistillLossConfig.from_mopd``."""

    teachers: dict[str, str] = dataclasses.field(default_factory=dict)
    """Domain -> teacher checkpoint dir (Orbax model dir or hf:DIR), or 'self' (frozen pi_0)."""
    fallback: str = ""
    """Teacher for domains without one ('self' or a checkpoint dir); '' makes them an error."""
    placement: typing.Literal["resident", "host"] = "resident"
    """Teachers all on the mesh, or held in host memory and moved in per use."""
    score_rows: int = 0
    """Rows per teacher call (one compiled shape per length bucket; bounds the score step's
    memory at long rows). 0 = all of a teacher's rows in one call, padded to a power of two."""
    prompts_per_step: int = 32
    """Prompts per step."""
    samples_per_prompt: int = 1
    """Rollouts per prompt (>= 2 for the alpha * A_ORM term)."""
    orm_alpha: dict[str, float] = dataclasses.field(default_factory=dict)
    """Per-domain weight of the GRPO outcome advantage added to A (default 0)."""
    domain_weights: dict[str, float] = dataclasses.field(default_factory=dict)
    """Per-domain loss weights (default 1)."""
    router_replay: bool = False
    """MoE student: the train forward uses the experts the sampler chose for each token (R3),
    gate weights from the current router at those experts; teachers route on their own."""

    def __post_init__(self):
        _check(self.prompts_per_step >= 1, "mopd.prompts_per_step", "must be >= 1")
        _check(self.samples_per_prompt >= 1, "mopd.samples_per_prompt", "must be >= 1")
        _check(self.score_rows >= 0, "mopd.score_rows", "must be >= 0 (0 = one call per teacher)")
        try:
            self._check_knobs("mopd")
        except ValueError as e:
            raise ConfigError(str(e)) from None


@dataclasses.dataclass(frozen=True)
class CascadeConfig:
    """Cascade RL baseline: GRPO on one domain, then the next, from the previous stage's model."""

    order: tuple[str, ...] = ()
    """Domain order of the stages ([]: sorted training domains). Steps are split evenly."""
    stage_samples: dict[str, int] = dataclasses.field(default_factory=dict)
    """Sample budget of each domain's stage (with optimizer.sample_budget; default: that
    budget split evenly between the stages)."""


@dataclasses.dataclass(frozen=True)
class OffPolicyConfig:
    """Off-Policy Finetune baseline: SFT of pi_0 on teacher-generated responses."""

    source: typing.Literal["generate", "store"] = "generate"
    """'generate': each domain's teacher (mopd.teachers) samples responses on the fly;
    'store': read responses from the teachers' rollout stores (offpolicy.stores)."""
    stores: dict[str, str] = dataclasses.field(default_factory=dict)
    """Domain -> rollout store directory (source 'store'; default <teacher dir>/../rollouts)."""
    prompts_per_step: int = 64
    """Teacher responses per step (each counts as one sample)."""
    min_reward: typing.Optional[float] = None
    """Keep only responses whose reward is >= this (null: keep all, no filtering)."""

    def __post_init__(self):
        _check(self.prompts_per_step >= 1, "offpolicy.prompts_per_step", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class MergeConfig:
    """Param-Merge baselines over pi_0 (run.init) and the teachers (mopd.teachers)."""

    method: typing.Literal[MERGE_METHODS] = "task_arithmetic"
    """average: mean of the teachers; task_arithmetic: pi_0 + lam * sum(teacher - pi_0);
    ties: TIES (trim to the top density of each task vector, elect signs, disjoint mean)."""
    lam: float = 0.5
    """Task-vector scale of task_arithmetic and ties."""
    density: float = 0.2
    """TIES: fraction of each task vector's entries kept (largest magnitudes)."""

    def __post_init__(self):
        _check(0 < self.density <= 1, "merge.density", "must be in (0, 1]")


@dataclasses.dataclass(frozen=True)
class CompareConfig:
    """`mopd compare`: MOPD against every baseline from one pi_0 and one set of teachers."""

    methods: tuple[str, ...] = ("mopd", "mix_rl", "cascade", "offpolicy_ft", "merge_avg",
                                "merge_ta", "merge_ties")
    """Methods to run (rows of compare.md); 'mopd' is one row per compare.estimators."""
    protocol: typing.Literal["paper", "equal_samples"] = "paper"
    """paper: the RL baselines get the teachers' per-domain budget (Mix-RL their sum, Cascade
    each stage its domain's), MOPD and Off-Policy FT compare.samples; equal_samples: every
    method compare.samples. Each run stops at its budget of consumed samples, its LR
    schedule over samples."""
    samples: int = 28800
    """Sample budget (consumed rollouts, or teacher responses) of MOPD and Off-Policy FT, and
    of every method under equal_samples (default: 450 MOPD steps of 64 rollouts)."""
    teacher_samples: dict[str, int] = dataclasses.field(default_factory=dict)
    """paper protocol: each domain teacher's consumed samples (default: read from the
    teacher run's metrics.jsonl)."""
    estimators: tuple[str, ...] = ("A",)
    """MOPD estimators, one row each (A: the paper's headline, sampled-token)."""
    lr_grid: tuple[float, ...] = ()
    """Learning rates tried per trained method (seed 0); each keeps its best on a held-out
    validation split disjoint from the test set ([]: the recipe's default lr)."""
    ablations: tuple[str, ...] = ()
    """Extra MOPD rows: foreign_teacher (teachers RL-trained from another SFT base),
    dn_rescale (DN-MOPD domain rescale on)."""
    eval_points: int = 6
    """Held-out evaluations along each run (the sample-efficiency curves)."""
    second_round: bool = False
    """Also RL-train new teachers from the MOPD student and distil again (paper 5.4)."""

    def __post_init__(self):
        from mopd_jax.estimators import REGISTRY
        _check(self.samples >= 1, "compare.samples", "must be >= 1")
        _check(self.eval_points >= 0, "compare.eval_points", "must be >= 0")
        _check(bool(self.estimators), "compare.estimators", "give at least one, e.g. [A]")
        for e in self.estimators:
            _check(e in REGISTRY, "compare.estimators",
                   f"unknown estimator {e!r}; choose from {sorted(REGISTRY)}")
        for lr in self.lr_grid:
            _check(lr > 0, "compare.lr_grid", f"learning rates must be > 0, got {lr}")
        for a in self.ablations:
            _check(a in ("foreign_teacher", "dn_rescale"), "compare.ablations",
                   f"unknown ablation {a!r}; choose from ['dn_rescale', 'foreign_teacher']")
        for d, n in self.teacher_samples.items():
            _check(n >= 1, f"compare.teacher_samples.{d}", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup, cosine decay and global-norm clipping."""

    lr: float = 1e-5
    """Peak learning rate."""
    warmup_steps: int = 0
    """Linear warmup steps from 0 to ``lr``."""
    total_steps: int = 1000
    """Steps of the cosine schedule (decays to ``lr * min_lr_ratio``)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of ``lr``."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""
    b1: float = 0.9
    """Adam beta1."""
    b2: float = 0.999
    """Adam beta2."""
    eps: float = 1e-8
    """Adam epsilon."""
    clip_norm: float = 1.0
    """Global gradient-norm clip; 0 disables it."""
    microbatches: int = 1
    """Gradient accumulation: the batch is split into this many sequential microbatches."""
    sample_budget: int = 0
    """Stop when this many samples are consumed (0: run total_steps). When set, the cosine
    decay runs over consumed samples (warmup stays in steps) and total_steps is a cap."""

    def __post_init__(self):
        _check(self.lr > 0, "optimizer.lr", "must be > 0")
        _check(self.warmup_steps >= 0, "optimizer.warmup_steps", "must be >= 0")
        _check(self.total_steps >= 1, "optimizer.total_steps", "must be >= 1")
        _check(0 <= self.min_lr_ratio <= 1, "optimizer.min_lr_ratio", "must be in [0, 1]")
        _check(self.microbatches >= 1, "optimizer.microbatches", "must be >= 1")
        _check(self.clip_norm >= 0, "optimizer.clip_norm", "must be >= 0 (0 disables)")
        _check(self.sample_budget >= 0, "optimizer.sample_budget", "must be >= 0 (0: off)")


@dataclasses.dataclass(frozen=True)
class Config:
    """Top-level config: one section per concern."""

    run: RunConfig = RunConfig()
    """Output directory, name and seed."""
    model: ModelConfig = dataclasses.field(default_factory=lambda: preset("tiny"))
    """Student architecture (``preset:``/``hf:`` plus field overrides)."""
    mesh: MeshConfig = MeshConfig()
    """Device mesh axis sizes."""
    optimizer: OptimizerConfig = OptimizerConfig()
    """Optimizer and schedule; ``total_steps`` is also the number of training steps."""
    data: DataConfig = DataConfig()
    """Prompt sources and mixing."""
    rewards: RewardsConfig = RewardsConfig()
    """Reward settings (code sandbox isolation, math grading)."""
    rollout: RolloutConfig = RolloutConfig()
    """Student sampling."""
    sft: SFTConfig = SFTConfig()
    """SFT recipe."""
    grpo: GRPOConfig = GRPOConfig()
    """GRPO recipe (teachers and RL baselines)."""
    mopd: MOPDConfig = MOPDConfig()
    """MOPD recipe."""
    cascade: CascadeConfig = CascadeConfig()
    """Cascade RL baseline."""
    offpolicy: OffPolicyConfig = OffPolicyConfig()
    """Off-Policy Finetune baseline."""
    merge: MergeConfig = MergeConfig()
    """Param-Merge baselines."""
    compare: CompareConfig = CompareConfig()
    """`mopd compare`."""


# ----------------------------------------------------------------------------- building
def field_docs(cls) -> dict[str, str]:
    """The docstring written under each dataclass field (inherited fields included)."""
    docs = {}
    for base in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(base):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(base)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for a, b in zip(body, body[1:]):
            if (isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name)
                    and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)
                    and isinstance(b.value.value, str)):
                docs[a.target.id] = " ".join(b.value.value.split())
    return docs


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{path}: must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        out = [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {k: _coerce(v, vt, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{path}: expected a string, got {value!r}")
    return value


def _model_from_dict(d: dict, path: str) -> ModelConfig:
    d = dict(d)
    base = None
    if "hf" in d:
        from models.hf import config_from_hf  # local: only needed for hf-backed configs
        base = config_from_hf(d.pop("hf"))
    if "preset" in d:
        name = d.pop("preset")
        try:
            base = preset(name)
        except ModelConfigError as e:
            raise ConfigError(str(e).replace("model.", f"{path}.", 1)) from None
    fields = build(ModelConfig, d, path, partial=True)
    base = base or ModelConfig()
    try:
        return base.replace(**fields)
    except ModelConfigError as e:
        raise ConfigError(str(e).replace("model.", f"{path}.", 1)) from None


def build(cls, data: Any, path: str = "", partial: bool = False):
    """Instantiate dataclass ``cls`` from a mapping, recursively, with path-named errors."""
    if data is None:
        data = {}
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {data!r}")
    if cls is ModelConfig and not partial:
        return _model_from_dict(data, path or "model")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        fpath = f"{path}.{key}" if path else key
        if key not in names:
            close = difflib.get_close_matches(str(key), sorted(names), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{fpath}: unknown key{hint}; valid keys: {sorted(names)}")
        kwargs[key] = _coerce(value, hints[key], fpath)
    if partial:
        return kwargs
    try:
        return cls(**kwargs)
    except (ModelConfigError, MeshError) as e:
        raise ConfigError(str(e)) from None
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path or cls.__name__}: {e}") from None


def parse_overrides(pairs: list[str]) -> dict:
    """``['a.b=1', 'c=x']`` -> nested dict; values parsed as YAML scalars/lists."""
    out: dict = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--set {pair}: expected path.to.field=value")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {pair}: {p} is set twice as a value and a section")
        node[parts[-1]] = value
    return out


def deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k),
                                                                             dict) else v
    return out


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found; pass an existing YAML file "
                          "(see configs/ for examples)")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                          f"{e.start}); save the config as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"{p}: not valid YAML ({where}{what}); fix the syntax there") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections")
    return data


def raw_config(path: str | Path | None = None, overrides: list[str] | None = None) -> dict:
    """The YAML file merged with ``--set`` overrides, before validation (what the user wrote)."""
    data = load_yaml(path) if path else {}
    return deep_merge(data, parse_overrides(overrides or []))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                cls=Config):
    """Config from an optional YAML file plus ``--set`` overrides, validated."""
    return build(cls, raw_config(path, overrides))


def to_dict(cfg) -> dict:
    """Plain-data view of a config (for printing, YAML and checkpoints)."""
    def conv(x):
        if dataclasses.is_dataclass(x):
            return {f.name: conv(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, (list, tuple)):
            return [conv(v) for v in x]
        if isinstance(x, dict):
            return {k: conv(v) for k, v in x.items()}
        return x
    return conv(cfg)


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def replace(cfg, **dotted):
    """A copy of ``cfg`` with ``{"section.field": value}`` changes, validated like a file."""
    data = to_dict(cfg)
    for key, value in dotted.items():
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return build(type(cfg), data)
