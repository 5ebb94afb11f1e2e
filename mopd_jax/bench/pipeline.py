"""``mopd bench pipeline CONFIG``: what one MOPD step costs, stage by stage, and over GRPO.

The MOPD recipe's own pieces (``recipes/mopd.py``) run one stage at a time, the device drained
between stages (``block_until_ready``):

* rollout: ``sampling.rollout`` of the step's prompts on the recipe's engine, split into
  prefill (the time inside the engine's ``prefill_batch`` and ``bulk_insert_batch`` calls,
  the device drained before each; the rollout waits on every prefill's first tokens anyway,
  so timing them costs next to nothing) and decode (the rest: generate steps and the host's
  slot bookkeeping);
* teacher scoring: ``TeacherPool.score`` of the batch, and of each teacher's rows alone (the
  very calls the batch makes for that teacher);
* rewards: ``common.rewards_of``;
* train: ``common.compile_train_step`` with ``distill_objective`` on the recipe's
  ``MOPDBatch``.

A GRPO step on the same rollouts is rollout + rewards + a train step with ``grpo_objective``
(the knobs of ``grpo:`` as the GRPO recipe maps them; with one sample per prompt the advantage
is the reward minus the batch mean, since a group needs two). MOPD step = rollout + scoring +
rewards + train; the MOPD / GRPO ratio is taken round by round.

Every round samples the same prompts with the same seed from pi_0, so every round does the
same work and meets the same shapes: the warm-up round compiles (its excess over the median is
the compile figure), the ``--iters`` rounds after it are timed, median (min-max). The two train
steps share one train state. Teachers are the config's, or random inits of the student's shape,
one per training domain (``--random-teachers``; the default when the config names none), so
the bench runs from nothing.

``--sync-vs-async N`` also runs the real recipe (``run_mopd``) for N steps at
``run.max_staleness`` 0 and 1 and reads ``time/step_s`` from its metrics.jsonl (the first step,
which compiles, left out). On the CPU the fake devices of
``--xla_force_host_platform_device_count`` share the same cores, so what overlap buys on
separate chips may not show there.

``--split-model`` prints a timing model of sync against async (k = 1) splits of a TPU slice
from ``mopd compile-check``'s per-step lower bounds (``--from-compile-check FILE``, else the
README's figures for configs/qwen3_30b_a3b.yaml on v5p-64); see ``mopd_jax.bench.split_model``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import tempfile
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from mopd_jax.bench import environment, fmt, print_environment, ratios, spread
from mopd_jax.bench.split_model import (V5P_ICI_BYTES_S, default_splits,
                                        estimate_from_compile_check, format_timing_model,
                                        parse_splits, readme_30b_estimate, timing_model)

STAGES = ("rollout", "prefill", "decode", "scoring", "rewards", "train", "grpo_train")
MOPD_STAGES = ("rollout", "scoring", "rewards", "train")  # one MOPD step, in its order
GRPO_STAGES = ("rollout", "rewards", "grpo_train")  # one GRPO step on the same rollouts


# ------------------------------------------------------------------------------ the stages
class TimedPrefill:
    """An engine whose prefill side (``prefill_batch``, ``bulk_insert_batch``) is timed, each
    call with the device drained before and after; everything else is the engine's own."""

    def __init__(self, engine):
        self._engine = engine
        self._last = None  # the latest generate's result: what is in flight
        self.prefill_s = 0.0

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def _timed(self, fn, *args, **kw):
        jax.block_until_ready(self._last)
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args, **kw))
        self.prefill_s += time.perf_counter() - t0
        return out

    def prefill_batch(self, *args, **kw):
        return self._timed(self._engine.prefill_batch, *args, **kw)

    def bulk_insert_batch(self, *args, **kw):
        return self._timed(self._engine.bulk_insert_batch, *args, **kw)

    def generate(self, params, decode_state):
        state, res = self._engine.generate(params, decode_state)
        self._last = res
        return state, res


def _clock(fn: Callable[[], object]) -> tuple[float, object]:
    """(seconds, result) of ``fn()`` with its result drained from the device."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - t0, out


def random_teacher_pool(run, m, seed: int = 1):
    """A ``TeacherPool`` of random inits of the student's shape, one per training domain, on the
    run's mesh in the teacher layout (one compiled init, the seed its argument)."""
    from flax import nnx

    import models
    from mopd_jax import sharding as shd
    from mopd_jax.teachers import Teacher, TeacherPool

    def make(s):  # nnx.Rngs(int) inside jit takes a key, not a traced int
        return models.build(run.model_cfg, nnx.Rngs(jax.random.key(s)))

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: make(0)))
    init = jax.jit(lambda s: nnx.split(make(s))[1],
                   out_shardings=shd.param_shardings(abstract, run.mesh, "teacher"))
    routes, teachers = {}, {}
    for i, d in enumerate(sorted(run.train_records)):
        name = f"random-{d}"
        routes[d] = name
        teachers[name] = Teacher(name, graphdef, init(np.int32(seed + i)),
                                 run.model_cfg.vocab_size)
    return TeacherPool(routes, None, teachers, mesh=run.mesh, placement="resident",
                       score_rows=m.score_rows)


def grpo_step_objective(run):
    """``grpo_objective`` with the config's ``grpo:`` knobs, as ``recipes.grpo.run_grpo``
    builds it."""
    from mopd_jax.steps import grpo_objective
    g, V = run.cfg.grpo, run.model_cfg.vocab_size
    return grpo_objective(
        clip_low=g.clip_low, clip_high=g.clip_high, kl_coef=g.kl_coef,
        aggregation="token_sum" if g.dr_grpo else "seq_mean", num_domains=len(run.domains),
        vocab_chunk=min(8192, V), aux_coef=run.model_cfg.router_aux_loss_coef,
        temperature=run.cfg.rollout.temperature)


@dataclasses.dataclass
class Bench:
    """One MOPD step's pieces, built as the recipe builds them."""

    run: object
    pool: object
    loss_cfg: object
    prompts: list
    mopd_step: Callable
    grpo_step: Callable
    state: dict
    teachers: str  # 'config' or 'random'


def build(cfg, *, random_teachers: bool = False) -> Bench:
    """The recipe's run, teachers, prompts (one step's) and both compiled train steps."""
    from mopd_jax.recipes import common
    from mopd_jax.recipes import mopd as recipe
    from mopd_jax.steps import distill_objective
    from mopd_jax.teachers import load_teachers

    common.check_untruncated(cfg)
    m = cfg.mopd
    random_teachers = random_teachers or not (m.teachers or m.fallback)
    run = common.init_student(common.setup(cfg, quiet=True))
    if random_teachers:
        pool = random_teacher_pool(run, m)
    else:
        recipe.check_routing(run)
        pool = load_teachers(m.teachers, m.fallback,
                             student=(run.graphdef, run.init_params, run.model_cfg),
                             mesh=run.mesh, placement=m.placement,
                             student_tokenizer=run.tokenizer, score_rows=m.score_rows)
    loss_cfg = recipe.loss_config(run)
    opt, state = common.new_train_state(run)
    # Committed, as every state a step returns is: on a one-device mesh the fresh state's
    # scalars are not, and jit keys its cache on that, so the second step would compile again.
    state = jax.device_put(state, jax.tree.map(lambda x: x.sharding, state))
    mopd_step = common.compile_train_step(run, opt, distill_objective(
        loss_cfg, aux_coef=run.model_cfg.router_aux_loss_coef))
    grpo_step = common.compile_train_step(run, opt, grpo_step_objective(run))
    prompts = next(common.make_pipeline(run, m.prompts_per_step))
    return Bench(run, pool, loss_cfg, prompts, mopd_step, grpo_step, state,
                 "random" if random_teachers else "config")


def one_round(b: Bench) -> tuple[dict[str, float], dict]:
    """Every stage once, in the MOPD step's order, then the GRPO train step on the same
    rollouts: ({stage: seconds}, {teacher: seconds}, counts)."""
    from mopd_jax.batches import GRPOBatch, MOPDBatch
    from mopd_jax.losses import group_advantages_host
    from mopd_jax.recipes import common
    from mopd_jax.steps import token_logprobs_step

    run, cfg, n = b.run, b.run.cfg, b.run.cfg.mopd.samples_per_prompt
    t: dict[str, float] = {}
    engine = TimedPrefill(run.engine)
    t["rollout"], rb = _clock(lambda: rollout_of(engine, run, b.prompts, n))
    t["prefill"] = engine.prefill_s
    t["decode"] = t["rollout"] - t["prefill"]
    t["rewards"], rewards = _clock(lambda: common.rewards_of(run, rb))
    t["scoring"], teacher = _clock(lambda: b.pool.score(rb.tokens, rb.domain, b.loss_cfg,
                                                        lengths=rb.lengths))
    names = b.pool.route(rb.domain)
    per_teacher, counts = {}, {"teacher_rows": {}, "teacher_tokens": {}}
    for name in sorted(set(names)):
        rows = np.asarray([i for i, x in enumerate(names) if x == name])
        per_teacher[name], _ = _clock(lambda: b.pool.score(
            rb.tokens[rows], [rb.domain[i] for i in rows], b.loss_cfg, lengths=rb.lengths[rows]))
        counts["teacher_rows"][name] = len(rows)
        counts["teacher_tokens"][name] = int(rb.response_lengths[rows].sum())

    def mopd_train():
        batch = MOPDBatch(
            tokens_BT=rb.tokens, mask_BT=rb.response_mask.astype(np.int32),
            domain_B=run.domain_ids(rb.domain), sampler_logp_BT=rb.logprobs, teacher=teacher,
            reward_B=rewards,
            orm_adv_B=group_advantages_host(rewards, n, normalize_std=True) if n >= 2 else None)
        b.state, metrics = b.mopd_step(b.state, batch)
        return metrics

    def grpo_train():
        g = cfg.grpo
        adv = (group_advantages_host(rewards, n, normalize_std=not g.dr_grpo) if n >= 2
               else rewards - rewards.mean())
        batch = GRPOBatch(tokens_BT=rb.tokens, mask_BT=rb.response_mask.astype(np.int32),
                          domain_B=run.domain_ids(rb.domain), sampler_logp_BT=rb.logprobs,
                          adv_B=np.asarray(adv, np.float32), reward_B=rewards)
        if g.kl_coef > 0:  # the GRPO recipe's reference pass is part of its step
            V = run.model_cfg.vocab_size
            ref = np.asarray(token_logprobs_step(run.graphdef, run.init_params, batch.tokens_BT,
                                                 temperature=cfg.rollout.temperature,
                                                 vocab_chunk=min(8192, V)))
            batch = batch.replace(ref_logp_BT=np.pad(ref, ((0, 0), (1, 0))))
        b.state, metrics = b.grpo_step(b.state, batch)
        return metrics

    t["train"], _ = _clock(mopd_train)
    t["grpo_train"], _ = _clock(grpo_train)
    P = len(b.prompts)
    counts.update(rows=len(rb), width=int(rb.tokens.shape[1]), prompts=P,
                  prompt_tokens=int(rb.prompt_lengths[::n].sum()),
                  generated_tokens=int(rb.response_lengths.sum()),
                  generate_steps=int(rb.stats["generate_steps"]),
                  prefill_batches=int(rb.stats["prefill_batches"]))
    return t, {"teachers": per_teacher, **counts}


def rollout_of(engine, run, prompts, n: int):
    """The recipe's rollout call, from pi_0 with a fixed seed (every round the same work)."""
    from mopd_jax.recipes import common
    from mopd_jax.sampling import rollout
    return rollout(engine, run.init_params, prompts, n=n, sampling=common.sampling_params(run.cfg),
                   seed=common.step_seed(run.cfg, 0))


def step_times(t: dict[str, float]) -> tuple[float, float]:
    """(MOPD step, GRPO step) seconds of one round's stage times."""
    return sum(t[s] for s in MOPD_STAGES), sum(t[s] for s in GRPO_STAGES)


def summarize(rounds: list[tuple[dict, dict]], warmup: tuple[dict, dict]) -> dict:
    """The JSON-ready figures of timed ``rounds`` (and the warm-up round's compile excess)."""
    times = [t for t, _ in rounds]
    counts = rounds[0][1]
    stages = {s: spread([t[s] for t in times]) for s in STAGES}
    mopd_s = [step_times(t)[0] for t in times]
    grpo_s = [step_times(t)[1] for t in times]
    teachers = {}
    for name in counts["teachers"]:
        sp = spread([c["teachers"][name] for _, c in rounds])
        tok = counts["teacher_tokens"][name]
        teachers[name] = {"s": sp, "rows": counts["teacher_rows"][name], "response_tokens": tok,
                          "tok_s": tok / sp["median"]}
    med = {s: stages[s]["median"] for s in STAGES}
    gen = resp = counts["generated_tokens"]  # the response tokens are the generated ones
    w_t, w_c = warmup
    compile_s = {s: max(w_t[s] - med[s], 0.0) for s in STAGES if s != "decode"}
    compile_s["teachers"] = {n: max(w_c["teachers"][n] - teachers[n]["s"]["median"], 0.0)
                             for n in teachers}
    return {
        "stages": stages, "teachers": teachers, "counts": {k: v for k, v in counts.items()
                                                           if k != "teachers"},
        "mopd_step": spread(mopd_s), "grpo_step": spread(grpo_s),
        "mopd_over_grpo": spread(ratios(mopd_s, grpo_s)),
        "tok_s": {"rollout": gen / med["rollout"], "decode": gen / max(med["decode"], 1e-9),
                  "prefill": counts["prompt_tokens"] / max(med["prefill"], 1e-9),
                  "scoring": resp / med["scoring"], "train": resp / med["train"],
                  "grpo_train": resp / med["grpo_train"]},
        "compile_s": compile_s, "rounds": times,
    }


def run_stages(b: Bench, *, iters: int = 3) -> dict:
    """One warm-up round, ``iters`` timed rounds; the summary."""
    cfg = b.run.cfg
    warmup = one_round(b)
    rounds = [one_round(b) for _ in range(iters)]
    mc = b.run.model_cfg
    res = summarize(rounds, warmup)
    res.update(model=mc.name, layers=mc.num_layers, params=mc.num_params(),
               estimator=cfg.mopd.estimator, devices=b.run.mesh.size, mesh=dict(b.run.mesh.shape),
               teacher_source=b.teachers, iters=iters,
               samples_per_prompt=cfg.mopd.samples_per_prompt)
    return res


_LABEL = {"rollout": "rollout", "prefill": "  prefill", "decode": "  decode",
          "scoring": "teacher scoring", "rewards": "rewards", "train": "train step (MOPD)",
          "grpo_train": "train step (GRPO)"}


def format_stages(r: dict) -> str:
    c, tok, st = r["counts"], r["tok_s"], r["stages"]
    lines = [f"MOPD step by stage: {r['model']} ({r['layers']} layers, "
             f"{r['params'] / 1e6:.1f}M params), estimator {r['estimator']}, {r['devices']} "
             f"device(s) {r['mesh']}; {c['prompts']} prompts x {r['samples_per_prompt']} = "
             f"{c['rows']} rollouts x {c['width']} tokens, {c['generated_tokens']} generated in "
             f"{c['generate_steps']} decode steps; teachers: {r['teacher_source']}; "
             f"{r['iters']} rounds after a warm-up, median (min-max)",
             f"{'stage':<22}{'ms':>26}{'tokens/s':>12}{'compile s':>11}"]
    rate = {"rollout": tok["rollout"], "prefill": tok["prefill"], "decode": tok["decode"],
            "scoring": tok["scoring"], "train": tok["train"], "grpo_train": tok["grpo_train"]}
    for s in STAGES:
        ms = {k: (v * 1e3 if k != "n" else v) for k, v in st[s].items()}
        comp = r["compile_s"].get(s)
        lines.append(f"{_LABEL[s]:<22}{fmt(ms):>26}"
                     f"{(f'{rate[s]:.0f}' if s in rate else '-'):>12}"
                     f"{(f'{comp:.1f}' if comp is not None else '-'):>11}")
        if s == "scoring":
            for name, t in r["teachers"].items():
                ms = {k: (v * 1e3 if k != "n" else v) for k, v in t["s"].items()}
                comp = r["compile_s"]["teachers"][name]
                lines.append(f"{'  ' + name:<22}{fmt(ms):>26}{t['tok_s']:>12.0f}{comp:>11.1f}"
                             f"   {t['rows']} rows, {t['response_tokens']} response tokens")
    mo, gr = r["mopd_step"], r["grpo_step"]
    lines += [
        "  tokens/s: rollout and decode = generated tokens; prefill = prompt tokens (one "
        "prefill per prompt); scoring, train = response tokens; compile s = warm-up round "
        "minus the median",
        f"MOPD step (rollout + scoring + rewards + train) {fmt(_ms(mo))} ms; GRPO step "
        f"(rollout + rewards + GRPO train) {fmt(_ms(gr))} ms; MOPD / GRPO "
        f"{fmt(r['mopd_over_grpo'], '.2f')}x (round by round)"]
    return "\n".join(lines)


def _ms(s: dict) -> dict:
    return {k: (v * 1e3 if k != "n" else v) for k, v in s.items()}


# ------------------------------------------------------------------------- sync vs async
def async_support() -> str | None:
    """None when this build's config has ``run.max_staleness``, else why async cannot run."""
    from mopd_jax.config import RunConfig
    if "max_staleness" not in {f.name for f in dataclasses.fields(RunConfig)}:
        return ("run.max_staleness is not in this build's config (mopd_jax/config.py): "
                "asynchronous MOPD has not landed, so only the synchronous loop can be timed")
    return None


def check_async_config(cfg) -> None:
    """The recipe's own refusals of ``cfg`` at max_staleness 1 (estimators B and C), raised
    before anything runs."""
    from mopd_jax import config as cfgmod
    from mopd_jax.recipes import mopd as recipe
    if async_support() is None and hasattr(recipe, "check_async"):
        recipe.check_async(cfgmod.replace(cfg, **{"run.max_staleness": 1}))


def _roles_field() -> bool:
    from mopd_jax.sharding import MeshConfig
    return "roles" in {f.name for f in dataclasses.fields(MeshConfig)}


def recipe_step_times(cfg, steps: int, overrides: dict, teacher_dirs: dict | None) -> dict:
    """``run_mopd`` for ``steps`` steps with ``overrides`` (dotted keys) in a scratch directory;
    every step's ``time/step_s`` and their spread after the first (which compiles)."""
    from mopd_jax import config as cfgmod
    from mopd_jax.recipes.mopd import run_mopd

    with tempfile.TemporaryDirectory(prefix="mopd-bench-") as tmp:
        over = {"run.out_dir": str(Path(tmp) / "run"), "optimizer.total_steps": steps,
                "run.checkpoint_every": steps, "run.eval_every": 0,
                "run.store_rollouts": False, **overrides}
        if teacher_dirs is not None:
            over.update({"mopd.teachers": teacher_dirs, "mopd.fallback": ""})
        run_cfg = cfgmod.replace(cfg, **over)
        run_mopd(run_cfg, quiet=True)
        rows = [json.loads(line) for line in
                (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    step_s = [r["time/step_s"] for r in rows if "time/step_s" in r]
    return {"step_s": step_s, "after_first": spread(step_s[1:]) if len(step_s) > 1 else None}


def save_random_teachers(b: Bench, out: Path) -> dict[str, str]:
    """The bench's random teachers as checkpoints under ``out``, as ``mopd.teachers`` routes."""
    from mopd_jax import sharding as shd
    from mopd_jax.checkpoint import save_model
    routes = {}
    for d, name in b.pool.routes.items():
        path = out / name
        save_model(path, shd.to_host(b.pool.teachers[name].params), b.run.model_cfg)
        routes[d] = str(path)
    return routes


def sync_vs_async(cfg, steps: int, teacher_dirs: dict | None, roles: dict | None) -> dict:
    """Whole recipe steps at max_staleness 0 and 1 (or why async is unavailable)."""
    n, platform = jax.device_count(), jax.devices()[0].platform
    cores = len(_usable_cores())
    label = (f"{n} {platform} device(s) on {cores} core(s): " + (
        "fake host devices share the same cores, so overlap may not show here"
        if platform == "cpu" and n > 1 else
        "sampler and trainer share one device, so only host work can overlap" if n == 1 else
        "separate devices"))
    res = {"steps": steps, "devices": n, "label": label}
    why = async_support()
    over = {"run.max_staleness": 1}
    if why is None:
        if roles and _roles_field():
            over["mesh.roles"] = roles
        res["roles"] = roles
        check_async_config(cfg)
    res["sync"] = recipe_step_times(cfg, steps, {"run.max_staleness": 0} if why is None else {},
                                    teacher_dirs)
    if why is not None:
        res["async"] = None
        res["async_unavailable"] = why
        return res
    res["async"] = recipe_step_times(cfg, steps, over, teacher_dirs)
    if "mesh.roles" in over:  # the same sub-meshes in sequence: what the overlap alone buys
        res["sync_split"] = recipe_step_times(
            cfg, steps, {"run.max_staleness": 0, "mesh.roles": over["mesh.roles"]}, teacher_dirs)
    a = res["async"]["after_first"]
    for key, base in (("async_over_sync", "sync"), ("async_over_sync_split", "sync_split")):
        b = (res.get(base) or {}).get("after_first")
        if a and b:
            res[key] = a["median"] / b["median"]
    return res


def _usable_cores():
    import os
    return os.sched_getaffinity(0)


def format_sync_vs_async(r: dict) -> str:
    lines = [f"whole MOPD steps of the recipe ({r['steps']} steps, time/step_s after the first): "
             f"{r['label']}"]
    roles = f", mesh.roles {r['roles']}" if r.get("roles") else ""
    names = {"sync": "sync  (max_staleness 0, one mesh)",
             "sync_split": f"sync  (max_staleness 0{roles}: the sub-meshes in turn)",
             "async": f"async (max_staleness 1{roles})"}
    for k in ("sync", "sync_split", "async"):
        v = r.get(k)
        if v is None:
            continue
        lines.append(f"  {names[k]}: {fmt(_ms(v['after_first'])) if v['after_first'] else '-'} "
                     f"ms per step (all steps: {', '.join(f'{x:.2f}' for x in v['step_s'])} s)")
    if r.get("async_unavailable"):
        lines.append(f"  async: unavailable: {r['async_unavailable']}")
    if "async_over_sync" in r:
        lines.append(f"  async / sync step time: {r['async_over_sync']:.2f}x"
                     + (f"; async / sync on the same sub-meshes: "
                        f"{r['async_over_sync_split']:.2f}x (the overlap alone)"
                        if "async_over_sync_split" in r else ""))
    return "\n".join(lines)


# ------------------------------------------------------------------------------ the verb
def parse_roles(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        return {k: int(v) for k, v in (p.split("=") for p in text.split(","))}
    except ValueError:
        raise ValueError(f"--roles {text!r}: expected ROLE=N pairs, e.g. trainer=4,sampler=4") \
            from None


def add_parser(sub):
    p = sub.add_parser("pipeline", help="one MOPD step by stage (rollout, teacher scoring, "
                       "rewards, train), tokens/s, and its cost over a GRPO step",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  mopd bench pipeline mopd_jax/assets/demo.yaml --iters 3 "
                              "--json\n  mopd bench pipeline --split-model")
    p.add_argument("config", metavar="CONFIG", nargs="?", default=None,
                   help="YAML config (the recipe's; e.g. mopd_jax/assets/demo.yaml); optional "
                        "with --split-model alone")
    p.add_argument("--set", action="append", default=[], metavar="K=V",
                   help="config override, e.g. --set model.num_layers=2 (repeatable)")
    p.add_argument("--iters", type=int, default=3, help="timed rounds after the warm-up round")
    p.add_argument("--random-teachers", action="store_true",
                   help="random inits of the student's shape, one per training domain, instead "
                        "of the config's teachers (the default when the config names none)")
    p.add_argument("--sync-vs-async", type=int, default=0, metavar="STEPS",
                   help="also time STEPS whole recipe steps at run.max_staleness 0 and 1")
    p.add_argument("--roles", default=None, metavar="ROLE=N,...",
                   help="mesh.roles of the async run (default: trainer and sampler halves)")
    p.add_argument("--split-model", action="store_true",
                   help="print the sync vs async-split timing model (README's 30B v5p-64 "
                        "figures unless --from-compile-check)")
    p.add_argument("--from-compile-check", default=None, metavar="FILE.json",
                   help="`mopd compile-check --json` output: the timing model's inputs")
    p.add_argument("--splits", default=None, metavar="T/S,...",
                   help="trainer/sampler chip counts of the model (default: 3/4, 1/2, 1/4 of "
                        "the chips and the nearest balanced split)")
    p.add_argument("--ici-gbps", type=float, default=V5P_ICI_BYTES_S * 8 / 1e9,
                   help="ICI bandwidth per chip for the weight transfer (default: v5p's 4800)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead")
    p.set_defaults(run=run)


def run(args) -> dict:
    from mopd_jax.errors import UsageError

    model_only = args.config is None
    if model_only and not (args.split_model or args.from_compile_check):
        raise UsageError("mopd bench pipeline: give CONFIG (and/or --split-model)")
    if args.iters < 1:
        raise UsageError(f"--iters: must be >= 1, got {args.iters}")
    env = environment() if args.json else print_environment()
    res: dict = {"env": env}
    if not model_only:
        from mopd_jax.config import load_config
        cfg = load_config(args.config, args.set)
        if args.sync_vs_async:
            check_async_config(cfg)
        with tempfile.TemporaryDirectory(prefix="mopd-bench-") as tmp:
            from mopd_jax import config as cfgmod
            cfg = cfgmod.replace(cfg, **{"run.out_dir": str(Path(tmp) / "bench"),
                                         "run.store_rollouts": False})
            res["config"] = args.config
            res["overrides"] = list(args.set)
            b = build(cfg, random_teachers=args.random_teachers)
            res["pipeline"] = run_stages(b, iters=args.iters)
            if not args.json:
                print(format_stages(res["pipeline"]), flush=True)
            teacher_dirs = None
            if args.sync_vs_async and b.teachers == "random":  # the recipe loads checkpoints
                teacher_dirs = save_random_teachers(b, Path(tmp) / "teachers")
            del b  # its student, teachers and state: the recipe runs build their own
            gc.collect()
            if args.sync_vs_async:
                n = jax.device_count()
                roles = parse_roles(args.roles) or ({"trainer": n // 2, "sampler": n - n // 2}
                                                    if n >= 2 else None)
                res["sync_vs_async"] = sync_vs_async(cfg, args.sync_vs_async, teacher_dirs, roles)
                if not args.json:
                    print(format_sync_vs_async(res["sync_vs_async"]), flush=True)
    if args.split_model or args.from_compile_check:
        if args.from_compile_check:
            with open(args.from_compile_check) as f:
                est = estimate_from_compile_check(json.load(f), args.from_compile_check)
        else:
            est = readme_30b_estimate()
        splits = (parse_splits(args.splits) if args.splits
                  else default_splits(est.chips))
        res["timing_model"] = timing_model(est, splits, args.ici_gbps * 1e9 / 8)
        if not args.json:
            print(format_timing_model(res["timing_model"]), flush=True)
    if args.json:
        print(json.dumps(res, default=float))
    return res
