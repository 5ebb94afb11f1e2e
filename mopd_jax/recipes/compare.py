"""`mopd compare`: MOPD and every baseline from one pi_0 and one set of teachers.

Layout under ``--out``: ``sft/`` and ``teacher_<d>/`` (shared with `mopd demo`, reused when
finished), then ``compare/<method>/n<budget>/lr<lr>/s<seed>/`` per method, budget, learning
rate and seed, shared by the protocols (``compare/merges/<method>/`` for the Param-Merges, ``compare/foreign/`` for the
foreign-teacher ablation's base and teachers, ``compare/round2/`` for the second round's
teachers), and the outputs ``compare.md``, ``.csv``, ``.json`` and ``compare_samples.png``
(``compare_equal_samples.*`` under that protocol).

Budgets (``compare.protocol``, see ``plan``): a budget is a number of *consumed* samples (one
student rollout, or one teacher response for Off-Policy FT; GRPO's dynamic sampling counts
every rollout it draws, kept or not). Each trained run stops at its budget
(``optimizer.sample_budget``) with its cosine LR decay over samples, so a method that draws
more per step takes fewer optimizer steps. ``paper``: the RL baselines get the teachers'
per-domain budget, as in the paper (Mix-RL the sum over domains, Cascade each stage its
domain's), MOPD and Off-Policy FT ``compare.samples``. ``equal_samples``: every method
``compare.samples``. Param-Merge uses none.

Scores are greedy rewards on the fixed, seeded held-out test set, normalised per domain:
0 = pi_0, 1 = that domain's teacher; a domain whose teacher does not beat pi_0 has no scale,
is shown as such and left out of the mean (with a printed note). ``compare.lr_grid`` picks
each method's learning rate on a validation split disjoint from the test set.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from importlib import resources
from pathlib import Path

from mopd_jax import config as cfgmod
from mopd_jax.recipes import compare_report as report
from mopd_jax.recipes import demo, recipe_fn
from mopd_jax.recipes.baselines import run_phase
from mopd_jax.recipes.grpo import run_grpo

BASELINES = ("mix_rl", "cascade", "offpolicy_ft", "merge_avg", "merge_ta", "merge_ties")
MERGES = {"merge_avg": "average", "merge_ta": "task_arithmetic", "merge_ties": "ties"}
VARIANTS = {"dn_rescale": "dn", "foreign_teacher": "foreign"}  # ablation -> row suffix
QUICK_SAMPLES = 384


def resolve_config(name: str) -> Path:
    """CONFIG path; 'demo' names the built-in demo config."""
    if name == "demo":
        return Path(str(resources.files("mopd_jax") / "assets" / "demo.yaml"))
    return Path(name)


# ----------------------------------------------------------------------------- rows
def method_rows(c, second_round: bool) -> list[str]:
    """compare.methods expanded: 'mopd' -> 'mopd_<E>' per compare.estimators, then the
    ablations (``mopd_<E0>_dn``, ``mopd_<E0>_foreign``) and the second round."""
    unknown = [m for m in c.methods if m != "mopd" and m not in BASELINES]
    if unknown:  # before any training, not after the first methods ran
        raise cfgmod.ConfigError(f"compare.methods: unknown method(s) {unknown}; choose from "
                                 f"{['mopd', *BASELINES]} (the second round is "
                                 "--second-round, ablations compare.ablations)")
    rows = []
    for m in c.methods:
        rows += [f"mopd_{e}" for e in c.estimators] if m == "mopd" else [m]
    e0 = c.estimators[0]
    rows += [f"mopd_{e0}_{VARIANTS[a]}" for a in c.ablations]
    if second_round:
        rows.append(f"mopd_{e0}_round2")
    return list(dict.fromkeys(rows))


def parse_mopd(method: str) -> tuple[str, str] | None:
    """('A', '') for 'mopd_A', ('A', 'dn') for 'mopd_A_dn'; None for a baseline."""
    if not method.startswith("mopd_"):
        return None
    est, _, variant = method[len("mopd_"):].partition("_")
    return est, variant


def recipe_of(method: str) -> str:
    return "mopd" if parse_mopd(method) else "merge" if method in MERGES else method


# ----------------------------------------------------------------------------- budgets
@dataclasses.dataclass(frozen=True)
class Budget:
    """One method's budget under a protocol."""

    samples: int  # consumed samples the run stops at (0: Param-Merge)
    per_step: int  # nominal samples per optimizer step (GRPO: prompts x group size)
    stages: dict = dataclasses.field(default_factory=dict)  # Cascade: domain -> budget

    @property
    def nominal_steps(self) -> int:
        """Steps if every step consumed exactly its nominal samples; no run takes more (a
        GRPO step draws at least prompts x group size), so it is also the step cap."""
        if not self.per_step:
            return 0
        if self.stages:
            return sum(math.ceil(b / self.per_step) for b in self.stages.values())
        return math.ceil(self.samples / self.per_step)


def plan(protocol: str, method: str, cfg, teacher_samples: dict[str, int],
         domains) -> Budget:
    """The budget of ``method`` under ``protocol`` (see the module doc)."""
    c, kind = cfg.compare, recipe_of(method)
    if kind == "merge":
        return Budget(0, 0)
    if kind == "mopd":
        return Budget(c.samples, cfg.mopd.prompts_per_step * cfg.mopd.samples_per_prompt)
    if kind == "offpolicy_ft":
        return Budget(c.samples, cfg.offpolicy.prompts_per_step)
    per = cfg.grpo.prompts_per_step * cfg.grpo.group_size
    paper = protocol == "paper"
    if kind == "mix_rl":
        return Budget(sum(teacher_samples[d] for d in domains) if paper else c.samples, per)
    order = list(cfg.cascade.order) or sorted(domains)
    if paper:
        stages = {d: int(teacher_samples[d]) for d in order}
    else:  # the budget split evenly, the remainder to the first stages
        stages = {d: c.samples // len(order) + (i < c.samples % len(order))
                  for i, d in enumerate(order)}
    return Budget(sum(stages.values()), per, stages)


def teacher_budgets(c, teachers: dict) -> dict[str, int]:
    """Each domain teacher's consumed samples: compare.teacher_samples, else the last
    ``samples/*`` of the teacher run's metrics.jsonl (``<run>/model`` -> ``<run>``)."""
    out = {}
    for d, path in sorted(teachers.items()):
        if d in c.teacher_samples:
            out[d] = int(c.teacher_samples[d])
            continue
        p = Path(str(path)[3:] if str(path).startswith("hf:") else str(path))
        metrics = (p.parent if p.name == "model" else p) / "metrics.jsonl"
        if not metrics.is_file():
            raise cfgmod.ConfigError(
                f"compare.protocol=paper: the budget of teacher {d} is its consumed samples, "
                f"but {metrics} is missing; set compare.teacher_samples.{d}=N or use "
                "compare.protocol=equal_samples")
        last = {}
        for line in metrics.read_text().splitlines():
            r = json.loads(line)
            last.update({k: v for k, v in r.items() if k.startswith("samples/")})
        out[d] = int(round(sum(last.values())))
    return out


# ----------------------------------------------------------------------------- runs
def method_config(method, budget: Budget, lr, run_dir: Path, ctx, seed: int, pi0, teachers):
    """The recipe config of one run of ``method``."""
    base = ctx.base
    est = parse_mopd(method)
    extra = {"run.recipe": recipe_of(method), "run.seed": seed, "run.init": str(pi0),
             "run.name": f"{method}-s{seed}", "run.out_dir": str(run_dir),
             **{f"mopd.teachers.{d}": str(p) for d, p in teachers.items()}}
    if method in MERGES:
        extra.update({"merge.method": MERGES[method], "optimizer.total_steps": 1})
        return demo.phase_config(ctx.out, str(run_dir), ctx.mode, ctx.overrides, ctx.cfg_path,
                                 **extra)
    steps = budget.nominal_steps
    if est:
        extra["mopd.estimator"] = est[0]
        if est[1] == "dn":
            extra["mopd.dn_rescale"] = True
    if budget.stages:
        extra.update({f"cascade.stage_samples.{d}": b for d, b in budget.stages.items()})
        steps = max(math.ceil(b / budget.per_step) for b in budget.stages.values())
    points = base.compare.eval_points
    extra.update({"optimizer.lr": lr, "optimizer.sample_budget": budget.samples,
                  "optimizer.total_steps": max(1, steps),
                  "run.eval_every": max(1, budget.nominal_steps // points) if points else 0})
    return demo.phase_config(ctx.out, str(run_dir), ctx.mode, ctx.overrides, ctx.cfg_path,
                             **extra)


@dataclasses.dataclass
class Context:
    """What every run of one `mopd compare` shares."""

    out: Path
    mode: dict
    overrides: list
    cfg_path: Path
    base: object  # the resolved compare config
    pi0: Path
    teachers: dict
    ref: dict  # {"base": {d: score}, "teacher": {d: score}} on the test set
    protocol: str
    lrs: dict = dataclasses.field(default_factory=dict)  # method -> the lr its runs use


def default_lr(ctx, method) -> float:
    return ctx.mode["grpo_lr"] if recipe_of(method) in ("mix_rl", "cascade") \
        else ctx.mode["mopd_lr"]


def _run_dir(ctx, method, budget: Budget, lr, seed) -> Path:
    """Keyed by what the run is (its budget, lr, seed), not by the protocol that asked for
    it: MOPD's runs are the same under both protocols and are trained once."""
    if method in MERGES:
        return ctx.out / "compare" / "merges" / method
    key = f"n{budget.samples}" + "".join(f"-{d}{b}" for d, b in budget.stages.items())
    return ctx.out / "compare" / method / key / f"lr{lr:g}" / f"s{seed}"


def train_one(ctx, method, budget, lr, seed, sources) -> dict:
    """Run (or reuse) one (method, lr, seed); its scores, steps, samples and curve."""
    pi0, teachers = sources(seed)
    run_dir = _run_dir(ctx, method, budget, lr, seed)
    cfg = method_config(method, budget, lr, run_dir, ctx, seed, pi0, teachers)
    reused = (run_dir / "model" / "model.json").is_file()
    t0 = time.perf_counter()
    run_phase(recipe_fn(cfg.run.recipe), cfg)
    wall = _wall(run_dir, None if reused else time.perf_counter() - t0)
    scores = json.loads((run_dir / "eval.json").read_text())
    curve, steps = report.read_curve(run_dir)
    used = curve[-1][0] if curve else 0.0
    base, teacher = ctx.ref["base"], ctx.ref["teacher"]
    norm = report.normalised(scores, base, teacher)
    points = [] if method in MERGES else [(0.0, 0.0)]
    points += [(s, report.mean_finite(report.normalised(ev, base, teacher).values()))
               for s, ev in curve]
    return {"method": method, "seed": seed, "lr": lr if method not in MERGES else None,
            "scores": scores, "normalised": norm,
            "mean_normalised": report.mean_finite(norm.values()), "steps": steps,
            "samples": used, "nominal": steps * budget.per_step, "budget": budget.samples,
            "wall_s": wall, "curve": points, "dir": str(run_dir)}


def run_compare(config: str = "demo", out: str = "runs/compare", quick: bool = False,
                seeds: int = 1, overrides=(), second_round: bool | None = None) -> dict:
    """Every row of ``method_rows`` for each seed; writes compare.md/.csv/.json + the plot."""
    out = Path(out)
    cfg_path = resolve_config(config)
    mode = dict(demo.MODES["quick" if quick else "full"])
    overrides = list(overrides)
    if quick:
        overrides = [f"compare.samples={QUICK_SAMPLES}", "compare.eval_points=1"] + overrides
    base = demo.phase_config(out, "compare", mode, overrides, cfg_path)
    if seeds < 1:
        raise cfgmod.ConfigError("--seeds: must be >= 1")
    c = base.compare
    rows = method_rows(c, c.second_round if second_round is None else second_round)
    if "foreign_teacher" in c.ablations and (base.run.init or base.mopd.teachers):
        raise cfgmod.ConfigError("compare.ablations: foreign_teacher trains a second SFT base "
                                 "and its teachers from scratch; use a config that trains "
                                 "pi_0 and the teachers here (no run.init / mopd.teachers)")
    t_all = time.perf_counter()
    pi0, teachers, _ = demo.base_and_teachers(out, mode, overrides, cfg_path)
    eval_cfg = demo.phase_config(out, "compare/eval", mode, overrides, cfg_path, **{
        "run.init": str(pi0), **{f"mopd.teachers.{d}": str(p) for d, p in teachers.items()}})
    ref = demo.evaluate_models(eval_cfg, pi0, teachers, None)
    ctx = Context(out, mode, overrides, cfg_path, base, pi0, teachers,
                  {"base": {r["domain"]: r["base"] for r in ref["rows"]},
                   "teacher": {r["domain"]: r["teacher"] for r in ref["rows"]}}, c.protocol)
    domains = sorted(teachers)
    t_budget = teacher_budgets(c, teachers) if c.protocol == "paper" and any(
        recipe_of(m) in ("mix_rl", "cascade") for m in rows) else {}

    runs, chosen = [], {}
    for method in rows:
        budget = plan(c.protocol, method, base, t_budget, domains)
        sources = _sources(ctx, method)
        lr = default_lr(ctx, method)
        if c.lr_grid and method not in MERGES:
            lr, grid = select_lr(ctx, method, budget, sources, eval_cfg)
            chosen[method] = {"lr": lr, "validation": grid}
        ctx.lrs[method] = lr
        for seed in range(1 if method in MERGES else seeds):
            runs.append(train_one(ctx, method, budget, lr, seed, sources))
    result = {"protocol": c.protocol, "base": ctx.ref["base"], "teacher": ctx.ref["teacher"],
              "runs": runs, "domains": domains, "seeds": seeds, "samples": c.samples,
              "teacher_samples": t_budget, "lr_grid": chosen,
              "excluded": report.excluded_domains(ctx.ref["base"], ctx.ref["teacher"]),
              "wall_s": time.perf_counter() - t_all}
    for note in report.exclusion_notes(result):
        print(note, file=sys.stderr)
    paths = report.write_outputs(out, result)
    print(report.format_compare(result))
    print("wrote " + ", ".join(str(p) for p in paths))
    return result


def _sources(ctx, method):
    """seed -> (pi_0, teachers) of a method: the shared ones, the foreign teachers, or the
    second round's (new teachers forked from that seed's MOPD student)."""
    est = parse_mopd(method)
    if est and est[1] == "foreign":
        foreign = foreign_teachers(ctx)
        return lambda seed: (ctx.pi0, foreign)
    if est and est[1] == "round2":
        def round2(seed):
            first = f"mopd_{est[0]}"
            student = _run_dir(ctx, first, plan(ctx.protocol, first, ctx.base, {}, []),
                               ctx.lrs.get(first, default_lr(ctx, first)), seed) / "model"
            if not (student / "model.json").is_file():
                raise cfgmod.ConfigError(f"--second-round: needs the mopd_{est[0]} run "
                                         f"{student.parent} (keep 'mopd' in compare.methods)")
            return student, _second_round_teachers(ctx, student, seed)
        return round2
    return lambda seed: (ctx.pi0, ctx.teachers)


def foreign_teachers(ctx) -> dict:
    """Paper ablation: teachers RL-trained from another SFT base (another init and data
    order: run.seed 1000), the same recipe and steps as the real ones."""
    _, teachers, _ = demo.base_and_teachers(ctx.out / "compare" / "foreign", ctx.mode,
                                            ctx.overrides + ["run.seed=1000"], ctx.cfg_path)
    return teachers


def _second_round_teachers(ctx, student, seed) -> dict:
    """Paper 5.4: new GRPO teachers forked from the MOPD student, one per domain."""
    teachers = {}
    for d in sorted(ctx.teachers):
        cfg = demo.phase_config(ctx.out, f"compare/round2/s{seed}/teacher_{d}", ctx.mode,
                                ctx.overrides, ctx.cfg_path, **{
            "run.recipe": "grpo", "run.init": str(student), "data.only_domains": f"[{d}]",
            "optimizer.total_steps": ctx.mode["grpo"], "optimizer.lr": ctx.mode["grpo_lr"],
            "run.seed": seed})
        teachers[d] = run_phase(run_grpo, cfg)
    return teachers


def _wall(run_dir: Path, measured: float | None) -> float:
    """Wall time of a run: measured now, or the one recorded when a reused run ran."""
    path = run_dir / "wall_s.json"
    if measured is None:
        return json.loads(path.read_text()) if path.is_file() else float("nan")
    path.write_text(json.dumps(measured))
    return measured


# ----------------------------------------------------------------------------- lr grid
def validation_records(cfg) -> dict[str, list[dict]]:
    """Per domain, the held-out records after the first data.eval_size (the test set): the
    built-in eval split's next eval_size problems, or data.eval_files' next records."""
    from mopd_jax.data import domains as builtin
    from mopd_jax.data.sources import read_records

    n = cfg.data.eval_size
    pool: dict[str, list[dict]] = {d: builtin.generate(d, 2 * n, seed=0, split="eval")
                                   for d in cfg.data.builtin}
    for path in cfg.data.eval_files:
        for r in read_records(path):
            pool.setdefault(r["domain"], []).append(r)
    out = {d: recs[n:2 * n] for d, recs in pool.items()}
    empty = sorted(d for d, recs in out.items() if not recs)
    if empty:
        raise cfgmod.ConfigError(f"compare.lr_grid: domain(s) {empty} have no held-out records "
                                 f"beyond the {n} test records (data.eval_size); add eval "
                                 "records or lower data.eval_size")
    return out


def validation_scores(eval_cfg, model_dirs: dict, domains=None) -> dict:
    """{key: {domain: greedy score}} of each model on the validation split."""
    from mopd_jax.loading import load_model
    from mopd_jax.recipes import common

    run = common.setup(eval_cfg, resume=True, quiet=True)
    run = dataclasses.replace(run, eval_records=validation_records(eval_cfg))
    out = {}
    for key, path in model_dirs.items():
        loaded = load_model(checkpoint=str(path), mesh=run.mesh, role="sample")
        out[key] = common.evaluate(run.with_model(loaded.graphdef, loaded.params, loaded.cfg),
                                   loaded.params, (domains or {}).get(key))
    return out


def select_lr(ctx, method, budget, sources, eval_cfg) -> tuple[float, dict]:
    """Seed 0 at every compare.lr_grid rate; the best mean normalised validation score wins
    (normalised by pi_0's and the teachers' validation scores). Returns (lr, {lr: score})."""
    if "val_ref" not in ctx.ref:
        ref = validation_scores(eval_cfg, {"base": ctx.pi0, **{
            f"t_{d}": p for d, p in ctx.teachers.items()}}, {f"t_{d}": [d] for d in ctx.teachers})
        ctx.ref["val_ref"] = {"base": ref["base"],
                              "teacher": {d: ref[f"t_{d}"][d] for d in ctx.teachers}}
    grid = {}
    for lr in ctx.base.compare.lr_grid:
        run = train_one(ctx, method, budget, lr, 0, sources)
        val = validation_scores(eval_cfg, {"m": Path(run["dir"]) / "model"})["m"]
        grid[lr] = report.mean_finite(report.normalised(
            val, ctx.ref["val_ref"]["base"], ctx.ref["val_ref"]["teacher"]).values())
    best = max(grid, key=lambda k: (grid[k] == grid[k], grid[k]))
    print(f"[{method}] lr grid on the validation split: " + ", ".join(
        f"{k:g} -> {v:.3f}" for k, v in grid.items()) + f"; keeping {best:g}", file=sys.stderr)
    return best, grid
