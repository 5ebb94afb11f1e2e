"""The baselines MOPD is measured against (MOPD.md "Baselines"), as ordinary recipes.

- ``mix_rl``: one GRPO run on the whole domain mix, each prompt scored by its domain's reward
  (the GRPO recipe on every domain; see grpo.py).
- ``cascade``: GRPO on one domain after another (``cascade.order``), each stage starting from
  the previous stage's model; the steps are split evenly between stages.
- ``offpolicy_ft``: SFT of pi_0 on responses its domain's teacher generated, sampled on the fly
  (``offpolicy.source: generate``) or read from the teachers' rollout stores (``store``),
  optionally keeping only responses with reward >= ``offpolicy.min_reward``.
- ``merge``: Param-Merge of the teachers (``mopd.teachers``) around pi_0 (``run.init``):
  average, task arithmetic or TIES (``merge.method``); no training, no samples.

Every recipe counts the samples it consumes per domain the same way (``samples/<domain>`` in
metrics.jsonl): one student rollout (or one teacher response) is one sample, kept or not.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from mopd_jax.batches import SFTBatch
from mopd_jax.config import ConfigError, replace
from mopd_jax.recipes import common
from mopd_jax.recipes.run_loop import train_loop
from mopd_jax.recipes.grpo import run_grpo
from mopd_jax.sampling import rollout
from mopd_jax.steps import sft_objective
from mopd_jax.teachers import SELF, TeacherError, load_teachers


def run_mix_rl(cfg, *, resume: bool = False, quiet: bool = False) -> common.Result:
    """Mix-RL: GRPO on the whole domain mix (every training domain, its own reward)."""
    if cfg.data.only_domains:
        raise ConfigError("data.only_domains: Mix-RL trains on the whole mix; unset it (use "
                          "recipe grpo for a one-domain run)")
    return run_grpo(cfg, resume=resume, quiet=quiet)


# ----------------------------------------------------------------------------- cascade
def run_phase(fn, cfg, quiet: bool = True) -> Path:
    """Run one recipe into cfg.run.out_dir; reuse it if finished, resume it if interrupted."""
    out = Path(cfg.run.out_dir)
    if (out / "model" / "model.json").is_file():
        print(f"[{cfg.run.name}] done earlier, reusing {out / 'model'}", file=sys.stderr)
        return out / "model"
    resume = (out / "checkpoints").is_dir()
    t0 = time.perf_counter()
    print(f"[{cfg.run.name}] {cfg.run.recipe}, {cfg.optimizer.total_steps} steps",
          file=sys.stderr)
    result = fn(cfg, resume=resume, quiet=quiet)
    if result.stopped:
        raise KeyboardInterrupt(f"stopped during {cfg.run.name}; run the same command again "
                                "to continue")
    print(f"[{cfg.run.name}] {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out / "model"


def _eval_rows(run_dir: Path) -> list[dict]:
    """(step, eval/*, samples/*) rows of a finished run's metrics.jsonl."""
    rows, samples = [], {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        samples.update({k: v for k, v in r.items() if k.startswith("samples/")})
        if any(k.startswith("eval/") for k in r):
            rows.append({"step": r["step"], **samples,
                         **{k: v for k, v in r.items() if k.startswith("eval/")}})
    return rows


def run_cascade(cfg, *, resume: bool = False, quiet: bool = False) -> common.Result:
    """Cascade RL: one GRPO stage per domain in cascade.order; OUT/stage<i>_<domain>/."""
    train = common.load_records(cfg)[0]
    order = list(cfg.cascade.order) or sorted(train)
    unknown = [d for d in order if d not in train]
    if unknown:
        raise ConfigError(f"cascade.order: domains {unknown} have no training prompts; "
                          f"choose from {sorted(train)}")
    total, budget = cfg.optimizer.total_steps, cfg.optimizer.sample_budget
    unknown = sorted(set(cfg.cascade.stage_samples) - set(order))
    if unknown:
        raise ConfigError(f"cascade.stage_samples: domains {unknown} are not stages; the "
                          f"stages are {order}")
    if budget:  # each stage to its own sample budget; total_steps caps each stage
        stage_budget = [cfg.cascade.stage_samples.get(d, budget // len(order)) for d in order]
        steps = [total] * len(order)
    else:
        if cfg.cascade.stage_samples:
            raise ConfigError("cascade.stage_samples: needs optimizer.sample_budget (stages end "
                              "at their sample budget); set it or drop cascade.stage_samples")
        stage_budget = [0] * len(order)
        steps = [total // len(order) + (i < total % len(order)) for i in range(len(order))]
    if min(steps) < 1 or (budget and min(stage_budget) < 1):
        raise ConfigError(f"optimizer.total_steps={total}: need at least one step (and sample) "
                          f"per cascade stage ({len(order)} stages)")
    run = common.setup(cfg, resume=True, quiet=quiet)
    t0 = time.perf_counter()
    init, rows, step0, samples0 = cfg.run.init, [], 0, {}
    for i, (d, n) in enumerate(zip(order, steps)):
        stage = replace(cfg, **{"run.recipe": "grpo", "run.name": f"{cfg.run.name}-{d}",
                                "run.out_dir": str(run.out / f"stage{i + 1}_{d}"),
                                "run.init": str(init), "data.only_domains": [d],
                                "optimizer.total_steps": n,
                                "optimizer.sample_budget": stage_budget[i]})
        init = run_phase(run_grpo, stage, quiet=True)
        stage_samples, stage_rows = {}, _eval_rows(Path(stage.run.out_dir))
        for r in stage_rows:
            stage_samples = {k: v for k, v in r.items() if k.startswith("samples/")}
            tot = dict(samples0)
            for k, v in stage_samples.items():
                tot[k] = tot.get(k, 0.0) + v
            rows.append({**r, **tot, "step": step0 + r["step"], "stage": d})
        for k, v in stage_samples.items():
            samples0[k] = samples0.get(k, 0.0) + v
        step0 += stage_rows[-1]["step"] if stage_rows else n  # its last evaluation: the end
    if common.is_primary():
        with open(run.out / "metrics.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        if (run.out / "model").exists():
            shutil.rmtree(run.out / "model")
        shutil.copytree(init, run.out / "model")
        last = Path(init).parent / "eval.json"
        if last.is_file():
            shutil.copy(last, run.out / "eval.json")
    from mopd_jax.checkpoint import load_model_params
    params = load_model_params(run.out / "model", run.mesh)[2]
    return common.Result(run.out, params, False, time.perf_counter() - t0,
                         {k.split("/", 1)[1]: v for k, v in samples0.items()})


# ----------------------------------------------------------------------------- off-policy FT
def _store_rows(run: common.Run, pool) -> dict[str, np.ndarray]:
    """Teacher responses from rollout stores: tokens, response mask, domain ids, rewards."""
    from mopd_jax.rollout_store import RolloutStore, StoreError

    op, L = run.cfg.offpolicy, common.seq_len(run.cfg)
    parts = []
    for d in sorted(run.train_records):
        path = op.stores.get(d)
        if path is None:
            teacher = pool.routes.get(d, pool.fallback)
            if teacher in (None, SELF):
                raise TeacherError(f"offpolicy.stores.{d}: no rollout store for domain {d!r}; "
                                   f"set offpolicy.stores.{d}=DIR or use offpolicy.source="
                                   "generate")
            path = str(Path(teacher[3:] if teacher.startswith("hf:") else teacher).parent
                       / "rollouts")
        try:
            data = RolloutStore.open(path).read(
                columns=["tokens", "prompt_len", "length", "reward", "domain"])
        except (StoreError, FileNotFoundError, OSError) as e:
            raise TeacherError(f"offpolicy.stores.{d}: cannot read rollout store {path} ({e}); "
                               "point it at a run's rollouts/ directory") from None
        keep = data["domain"] == d
        parts.append({k: v[keep] for k, v in data.items()})
    data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if not len(data["reward"]):
        raise TeacherError("offpolicy: the rollout stores hold no responses of the training "
                           "domains")
    pos = np.arange(data["tokens"].shape[1])[None]
    mask = (pos >= data["prompt_len"][:, None]) & (pos < data["length"][:, None])
    tokens = np.zeros((len(mask), L), np.int32)
    w = min(L, data["tokens"].shape[1])
    tokens[:, :w] = data["tokens"][:, :w]
    full_mask = np.zeros((len(mask), L), np.int32)
    full_mask[:, :w] = mask[:, :w]
    return {"tokens": tokens, "mask": full_mask, "reward": data["reward"],
            "domain": run.domain_ids(list(data["domain"]))}


def run_offpolicy_ft(cfg, *, resume: bool = False, quiet: bool = False) -> common.Result:
    """Off-Policy Finetune: SFT of pi_0 on teacher responses; saves OUT/model."""
    run = common.init_student(common.setup(cfg, resume=resume, quiet=quiet))
    op, m = cfg.offpolicy, cfg.mopd
    pool = load_teachers(m.teachers, m.fallback, student=(run.graphdef, run.init_params,
                                                          run.model_cfg),
                         mesh=run.mesh, placement=m.placement, student_tokenizer=run.tokenizer,
                         score_rows=m.score_rows)
    pool.route(sorted(run.train_records))  # every domain has a teacher (or a clear error)
    pipeline = common.make_pipeline(run, op.prompts_per_step)
    opt, state = common.new_train_state(run)
    V = run.model_cfg.vocab_size
    step = common.compile_train_step(run, opt, sft_objective(
        vocab_chunk=min(8192, V), num_domains=len(run.domains),
        aux_coef=run.model_cfg.router_aux_loss_coef))
    stored = _store_rows(run, pool) if op.source == "store" else None
    if stored is None:
        _check_same_architecture(run, pool)
    engine = run.engine
    P = op.prompts_per_step

    def generate(i):
        prompts = next(pipeline)
        names = pool.route([p.domain for p in prompts])
        L = common.seq_len(cfg)
        batch = {"tokens": np.zeros((P, L), np.int32), "mask": np.zeros((P, L), np.int32),
                 "reward": np.zeros((P,), np.float32), "domain": np.zeros((P,), np.int32)}
        for t in sorted(set(names)):
            idx = [k for k, n in enumerate(names) if n == t]
            rb = rollout(engine, pool._params_of(pool.teachers[t]), [prompts[k] for k in idx],
                         sampling=common.sampling_params(cfg), seed=common.step_seed(cfg, i, 7))
            batch["tokens"][idx] = rb.tokens
            batch["mask"][idx] = rb.response_mask
            batch["reward"][idx] = common.rewards_of(run, rb)
            batch["domain"][idx] = run.domain_ids(rb.domain)
        return batch

    def from_store(i):
        n = len(stored["reward"])
        order = np.random.default_rng(cfg.run.seed + i // max(1, n // P)).permutation(n)
        start = (i * P) % max(1, n - P + 1) if n > P else 0
        idx = order[start:start + P] if n >= P else np.resize(order, P)
        return {k: v[idx] for k, v in stored.items()}

    def step_fn(state, i, loop):
        batch = generate(i) if stored is None else from_store(i)
        for d in batch["domain"]:
            loop.count(run.domains[d])
        kept = np.ones(P, bool) if op.min_reward is None else batch["reward"] >= op.min_reward
        batch["mask"] = batch["mask"] * kept[:, None].astype(np.int32)
        state, metrics = step(state, SFTBatch(tokens_BT=batch["tokens"], mask_BT=batch["mask"],
                                              domain_B=batch["domain"]))
        host = {"offpolicy/teacher_reward": float(batch["reward"].mean()),
                "offpolicy/kept": float(kept.mean()),
                **loop.sample_metrics()}
        return state, metrics, host, None

    state, loop = train_loop(run, state, step_fn, pipeline=pipeline,
                                    total_steps=cfg.optimizer.total_steps, resume=resume,
                                    prefix="offpolicy")
    return common.finish(run, state["params"], loop)


def _check_same_architecture(run: common.Run, pool) -> None:
    import jax
    ref = jax.tree.map(lambda x: x.shape, run.init_params)
    for name, t in pool.teachers.items():
        if jax.tree.map(lambda x: x.shape, t.params) != ref:
            raise TeacherError(f"offpolicy.source=generate: teacher {name} has another "
                               "architecture than the student; the student's engine cannot "
                               "sample from it — use offpolicy.source=store")


# ----------------------------------------------------------------------------- merge
def run_merge(cfg, *, resume: bool = False, quiet: bool = False) -> common.Result:
    """Param-Merge of mopd.teachers around run.init (merge.method); saves OUT/model."""
    from mopd_jax.loading import load_model
    from mopd_jax.merge import merge_params

    run = common.setup(cfg, resume=True, quiet=quiet)
    if not cfg.run.init:
        raise ConfigError("run.init: Param-Merge needs pi_0 (the base the teachers were "
                          "trained from)")
    teachers = {d: t for d, t in sorted(cfg.mopd.teachers.items()) if t != SELF}
    if not teachers:
        raise ConfigError("mopd.teachers: Param-Merge needs at least one teacher checkpoint")
    run = common.init_student(run)
    models = []
    for d, src in teachers.items():
        path = src[3:] if src.startswith("hf:") else src
        if not Path(path).is_dir():
            raise TeacherError(f"mopd.teachers.{d}: checkpoint {src!r} not found")
        kw = {"hf": path} if src.startswith("hf:") else {"checkpoint": path}
        models.append(load_model(mesh=run.mesh, role="train", **kw).params)
    t0 = time.perf_counter()
    mg = cfg.merge
    merged = merge_params(run.init_params, models, mg.method, lam=mg.lam, density=mg.density)
    common.export_student(run, merged)
    scores = common.evaluate(run, merged)
    if common.is_primary():
        (run.out / "eval.json").write_text(json.dumps(scores, indent=1))
        with open(run.out / "metrics.jsonl", "w") as f:
            f.write(json.dumps({"step": 0, **{f"samples/{d}": 0.0 for d in scores},
                                **{f"eval/{d}": s for d, s in scores.items()}}) + "\n")
    return common.Result(run.out, merged, False, time.perf_counter() - t0, {})
