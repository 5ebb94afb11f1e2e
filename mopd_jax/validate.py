"""Checks a run passes before its first step, so a mistake costs seconds, not a training run.

``preflight`` (called by ``recipes.common.setup``, after ``load_located`` refused
``data.weights`` naming domains the data does not have) checks what every recipe shares: each
record's reward (train and eval) and ``data.default_reward``; prompt + response length against the model's context; an estimate of
device memory (weights, optimizer, KV cache, one batch's activations) against the devices'
memory, naming the knob to turn; characters the tokenizer maps to its unknown token (a count,
an error above ``data.max_unk_fraction``). It returns warnings (no evaluation set, a warm-up
longer than the run) for the caller to print. ``config_changes`` and ``check_init_overrides``
keep the config on disk the run's own.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from mopd_jax.config import ConfigError
from mopd_jax.data.rewards import REWARDS, RewardError
from mopd_jax.data.sources import DataError

# Rewards that are cheap and pure: checked by scoring an empty response against each record
# (which fails exactly when a field the reward needs is missing or malformed).
_DRY_RUN = ("exact_match", "math", "ifeval", "ifeval_loose")
UNK_SAMPLE = 20_000  # records whose tokens are counted (the first N of train + eval)


class ValidationError(ValueError):
    """A run that cannot work, found before its first step; names the field/file and the fix."""


# ----------------------------------------------------------------------------- rewards
def check_default_reward(name: str) -> None:
    if name not in REWARDS:
        raise ConfigError(f"data.default_reward: unknown reward {name!r}; choose one of "
                          f"{sorted(REWARDS)} (or register one with @mopd_jax.data.rewards."
                          "register)")


def check_record_reward(record: dict, where: str, default: str) -> None:
    """The reward ``record`` names (or ``default``) exists and can score this record."""
    name = record.get("reward", default)
    if name not in REWARDS:
        raise DataError(f"{where}: reward {name!r} is not registered; use one of "
                        f"{sorted(REWARDS)} or register it with @mopd_jax.data.rewards.register")
    try:
        if name in _DRY_RUN:
            REWARDS[name]("", record)
        elif name == "code":
            from mopd_jax.data import code_tests
            if "input_output" not in record and not record.get("tests"):
                raise RewardError("reward 'code' needs record['tests'] (or 'input_output')")
            code_tests.plan_for(record)
    except RewardError as e:
        raise DataError(f"{where}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a malformed field, reported with its record
        raise DataError(f"{where}: reward {name!r} cannot score this record "
                        f"({type(e).__name__}: {str(e)[:160]}); fix the record") from None


# ----------------------------------------------------------------------------- memory
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _gib(n: float) -> str:
    for unit, size in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 1024:.1f} KiB"


def train_batch_rows(cfg) -> tuple[int, str]:
    """Rows of one train step and the config field that sets them."""
    r = cfg.run.recipe
    if r == "sft":
        return cfg.sft.batch_size, "sft.batch_size"
    if r in ("grpo", "mix_rl", "cascade"):
        return cfg.grpo.prompts_per_step * cfg.grpo.group_size, "grpo.prompts_per_step"
    if r == "offpolicy_ft":
        return cfg.offpolicy.prompts_per_step, "offpolicy.prompts_per_step"
    if r == "merge":
        return 0, ""
    return cfg.mopd.prompts_per_step * cfg.mopd.samples_per_prompt, "mopd.prompts_per_step"


def memory_estimate(cfg, mcfg, seq: int) -> dict[str, float]:
    """Bytes, summed over all devices: weights + optimizer, teachers, KV cache, activations.

    A lower bound of what the run needs in all (no fragmentation, perfect sharding); the
    compiled truth per device is ``mopd compile-check``.
    """
    act = _BYTES.get(mcfg.dtype, 4)
    weights = mcfg.num_params() * _BYTES.get(mcfg.param_dtype, 4)
    rows, _ = train_batch_rows(cfg)
    kv_dim = mcfg.num_kv_heads * (mcfg.head_dim + (mcfg.v_head_dim or mcfg.head_dim))
    kv = cfg.rollout.slots * seq * mcfg.num_layers * kv_dim * act
    micro = -(-rows // cfg.optimizer.microbatches) if rows else 0
    # Residual stream and the attention/MLP inputs kept for the backward pass of every layer.
    activations = micro * seq * mcfg.num_layers * mcfg.hidden_size * act * 6
    teachers = 0
    if cfg.run.recipe in ("mopd", "offpolicy_ft") and cfg.mopd.placement == "resident":
        n = len({t for t in cfg.mopd.teachers.values() if t != "self"})
        teachers = n * weights
    return {"weights and optimizer": 4 * weights, "teachers": teachers, "KV cache": kv,
            "activations": activations}


def device_memory(devices) -> tuple[float, str]:
    """(bytes in all, what) of the run's devices: HBM where the backend reports it, else RAM."""
    total, kinds = 0.0, set()
    for d in devices:
        stats = None
        try:
            stats = d.memory_stats()
        except Exception:  # noqa: BLE001 - backends without memory stats
            stats = None
        if stats and stats.get("bytes_limit"):
            total += stats["bytes_limit"]
            kinds.add(d.platform)
    if total:
        return total, f"{len(devices)} {'/'.join(sorted(kinds))} devices"
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0.0, ""
    return float(ram), "host RAM (CPU devices share it)"


def check_fits(cfg, mcfg, devices, seq: int) -> None:
    need = memory_estimate(cfg, mcfg, seq)
    have, what = device_memory(devices)
    if not have or sum(need.values()) <= have:
        return
    part, size = max(need.items(), key=lambda kv: kv[1])
    rows, rows_field = train_batch_rows(cfg)
    knob = {"KV cache": f"lower rollout.slots={cfg.rollout.slots} or rollout.max_new_tokens="
                        f"{cfg.rollout.max_new_tokens} / data.max_prompt_len="
                        f"{cfg.data.max_prompt_len}",
            "activations": f"raise optimizer.microbatches={cfg.optimizer.microbatches} or lower "
                           f"{rows_field} ({rows} rows a step)",
            "teachers": "set mopd.placement=host (teachers wait in host memory)",
            "weights and optimizer": "use more devices, a smaller model or "
                                     "model.param_dtype=bfloat16"}[part]
    detail = ", ".join(f"{k} {_gib(v)}" for k, v in need.items() if v)
    raise ValidationError(
        f"memory: this run needs at least {_gib(sum(need.values()))} ({detail}; rows of "
        f"{seq} tokens) but {what} have {_gib(have)}; the largest part is the {part}: {knob} "
        "(`mopd compile-check` gives the compiled per-device figure)")


# ----------------------------------------------------------------------------- preflight
def _unk_id(tok):
    for attr in ("unk_id", "UNK"):
        v = getattr(tok, attr, None)
        if isinstance(v, int):
            return v
    return None


def check_unk(cfg, tok, records, encode) -> str | None:
    """Count tokens that are the tokenizer's unknown token in the prompts (and, for SFT, the
    targets); error above max_unk_fraction."""
    unk = _unk_id(tok)
    if unk is None:
        return None
    field = cfg.sft.target_field if cfg.run.recipe == "sft" else None  # targets are tokens
    total = bad = 0
    chars: dict[str, int] = {}
    first_where = None
    known = getattr(tok, "alphabet", None)
    for where, r in records[:UNK_SAMPLE]:
        ids = list(encode(r))
        texts = [r["prompt"] if isinstance(r["prompt"], str)
                 else "\n".join(m["content"] for m in r["prompt"])]
        if field and isinstance(r.get(field), (str, int, float)):
            ids += tok.encode(str(r[field]))
            texts.append(str(r[field]))
        total += len(ids)
        n = sum(1 for i in ids if i == unk)
        if not n:
            continue
        bad += n
        first_where = first_where or where
        if known is not None:
            for c in "".join(texts):
                if c not in known:
                    chars[c] = chars.get(c, 0) + 1
    if not bad:
        return None
    where = first_where
    examples = ", ".join(repr(c) for c, _ in sorted(chars.items(), key=lambda kv: -kv[1])[:8])
    frac = bad / max(total, 1)
    msg = (f"data: {bad:,} of {total:,} tokens ({100 * frac:.2g}%) in "
           f"{'the first ' + format(UNK_SAMPLE, ',') + ' ' if len(records) > UNK_SAMPLE else ''}"
           f"records are the tokenizer's unknown token"
           f"{' (characters ' + examples + ')' if examples else ''}, first at {where}")
    if frac > cfg.data.max_unk_fraction:
        raise DataError(f"{msg}; the built-in tokenizer covers only the built-in domains' "
                        "characters: set data.tokenizer=DIR (a tokenizer.json, e.g. the "
                        "student's Hugging Face directory) or raise data.max_unk_fraction="
                        f"{cfg.data.max_unk_fraction}")
    return msg


def preflight(cfg, mcfg, tok, located_train, located_eval, encode, devices) -> list[str]:
    """Raise on what cannot work; return warnings. ``located_*``: [(where, record)]."""
    d = cfg.data
    check_default_reward(d.default_reward)
    for where, r in located_train + located_eval:
        check_record_reward(r, where, d.default_reward)
    seq = d.max_prompt_len + cfg.rollout.max_new_tokens
    if seq > mcfg.max_position_embeddings:
        raise ConfigError(
            f"rollout.max_new_tokens: data.max_prompt_len={d.max_prompt_len} + "
            f"rollout.max_new_tokens={cfg.rollout.max_new_tokens} = {seq} tokens exceeds the "
            f"model's context of {mcfg.max_position_embeddings} (model.max_position_embeddings)"
            "; lower one of them")
    check_fits(cfg, mcfg, devices, seq)
    warnings = []
    unk = check_unk(cfg, tok, located_train + located_eval, encode)
    if unk:
        warnings.append(f"warning: {unk}")
    if not located_eval:
        warnings.append("warning: no evaluation set (data.eval_files is empty and no built-in "
                        "domain is used): the run will report no held-out scores; add "
                        "data.eval_files")
    o = cfg.optimizer
    if o.warmup_steps > o.total_steps:
        warnings.append(schedule_message(cfg))
    return warnings


def schedule_message(cfg) -> str:
    o = cfg.optimizer
    return (f"optimizer.warmup_steps={o.warmup_steps} is longer than the run "
            f"(optimizer.total_steps={o.total_steps}): the learning rate never reaches "
            f"optimizer.lr; lower warmup_steps")


# ----------------------------------------------------------------------------- config truth
# Fields that do not change what the run computes: where and how often it logs, checkpoints
# and evaluates, the mesh (restoring onto another mesh is supported), evaluation-only data.
TRAJECTORY_FREE = (
    "run.name", "run.checkpoint_every", "run.keep_checkpoints", "run.eval_every",
    "run.store_rollouts", "run.log_every", "run.log_every_s", "run.out_dir", "mesh.",
    "data.eval_files", "data.eval_size", "data.max_unk_fraction", "compare.",
    "rewards.code.isolation",
)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and not (prefix + k).startswith(("data.weights",
                                                                      "mopd.teachers")):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _norm(v):
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    return v


def config_changes(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(field, old, new) for every trajectory-changing field that differs."""
    a, b = _flat(old), _flat(new)
    out = []
    for k in sorted(set(a) | set(b)):
        if k.startswith(TRAJECTORY_FREE) or k == "model.name":
            continue
        if k not in a or k not in b:  # a field added or removed by a code change
            continue
        if _norm(a[k]) != _norm(b[k]):
            out.append((k, a[k], b[k]))
    return out


def check_init_overrides(cfg, explicit_model: dict) -> None:
    """``model.*`` fields the user set must match ``run.init``'s model (it decides them)."""
    from models.config import RUNTIME_FIELDS  # applied on top of the init (runtime_overrides)

    keys = [k for k in explicit_model if k not in ("preset", "hf", *RUNTIME_FIELDS)]
    if not cfg.run.init or not keys:
        return
    init = init_model_config(cfg.run.init)
    if init is None:
        return  # a missing init is reported with its own message later
    got = dataclasses.asdict(init)
    want = dataclasses.asdict(cfg.model)
    differ = [k for k in keys if k in want and _norm(want[k]) != _norm(got.get(k))]
    if differ:
        what = ", ".join(f"model.{k}={want[k]!r} (run.init has {got.get(k)!r})"
                         for k in differ[:4])
        raise ConfigError(f"{what}: run.init={cfg.run.init} decides the student's architecture "
                          "and dtypes, so this setting would be ignored; drop it, or convert the "
                          "init model first")


def init_model_config(src: str):
    """The ModelConfig of ``run.init`` (read from its config file; no weights), or None."""
    path = Path(src[3:] if src.startswith("hf:") else src)
    if src.startswith("hf:"):
        if not (path / "config.json").is_file():
            return None
        from models.hf import config_from_hf
        return config_from_hf(path)
    if not (path / "model.json").is_file():
        return None
    from mopd_jax.checkpoint import read_model_config
    return read_model_config(path)


def changes_text(changes) -> str:
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in changes)

