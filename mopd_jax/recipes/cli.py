"""CLI verbs of the pipeline: ``mopd train``, ``mopd eval``, ``mopd inspect``, ``mopd demo``."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from mopd_jax.merge import METHODS as MERGE_METHODS
from mopd_jax.recipes import recipe_fn

def user_errors() -> tuple:
    from mopd_jax.data.rewards import RewardError
    from mopd_jax.data.sources import DataError
    from mopd_jax.recipes.common import RunError
    from mopd_jax.rollout_store import StoreError
    from mopd_jax.run_checkpoint import RunCheckpointError
    from mopd_jax.teachers import TeacherError
    from mopd_jax.merge import MergeError
    from mopd_jax.run_dir import RunDirError
    from mopd_jax.validate import ValidationError
    return (DataError, RewardError, RunError, StoreError, RunCheckpointError, TeacherError,
            MergeError, RunDirError, ValidationError)


def enable_compilation_cache() -> None:
    """Persistent XLA cache: later runs and phases reuse compiled steps (MOPD_XLA_CACHE=0: off)."""
    path = os.environ.get("MOPD_XLA_CACHE", str(Path.home() / ".cache" / "mopd_jax" / "xla"))
    if path in ("", "0", "off"):
        return
    import jax
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def log_every_sets(value: str | None) -> list[str]:
    """``--log-every 10`` (steps) or ``--log-every 30s`` (seconds) as --set overrides."""
    from mopd_jax.errors import UsageError
    if value is None:
        return []
    v = value.strip().lower()
    try:
        if v.endswith("s"):
            secs = float(v[:-1])
            if secs > 0:
                return [f"run.log_every_s={secs}"]
        elif int(v) >= 1:
            return [f"run.log_every={int(v)}"]
    except ValueError:
        pass
    raise UsageError(f"--log-every {value!r}: give steps (e.g. 10) or seconds (e.g. 30s)")


def _train(args):
    from mopd_jax import validate
    from mopd_jax.config import load_config, raw_config
    from mopd_jax.run_dir import AlreadyFinished, allowing_config_change
    from mopd_jax.sharding import initialize_distributed
    t0 = time.perf_counter()
    sets = list(args.set) + log_every_sets(args.log_every)
    cfg = load_config(args.config, sets)
    model_keys = raw_config(args.config, sets).get("model") or {}
    validate.check_init_overrides(cfg, model_keys if isinstance(model_keys, dict) else {})
    if cfg.optimizer.warmup_steps > cfg.optimizer.total_steps:
        from mopd_jax.config import ConfigError
        raise ConfigError(validate.schedule_message(cfg))
    from mopd_jax.recipes.common import recorded_config
    from mopd_jax.run_dir import check_out_dir, check_resume
    out = check_out_dir(cfg, args.resume)
    try:  # before any work: a changed trajectory is refused, a finished run left alone
        with allowing_config_change(args.allow_config_change):
            check_resume(recorded_config(cfg), out, args.resume)
    except AlreadyFinished as e:
        print(f"mopd train: {e}", file=sys.stderr)
        print_summary(e.out, time.perf_counter() - t0, None)
        return
    initialize_distributed()  # multi-process launch: before anything touches a device
    enable_compilation_cache()
    with allowing_config_change(args.allow_config_change):
        result = recipe_fn(cfg.run.recipe)(cfg, resume=args.resume)  # checked on load
    if result.stopped:
        raise KeyboardInterrupt
    print_summary(result.out, time.perf_counter() - t0, result.elapsed)
    print(f"done: {result.out}")


def eval_table(scores: dict[str, float], title: str = "eval") -> str:
    if not scores:
        return f"{title}: no held-out scores (no evaluation set)"
    w = max(6, *(len(d) for d in scores))
    lines = [f"{title} (greedy mean reward on the held-out set):", f"  {'domain':<{w}}  score"]
    lines += [f"  {d:<{w}}  {s:.4f}" for d, s in scores.items()]
    if len(scores) > 1:
        lines.append(f"  {'mean':<{w}}  {sum(scores.values()) / len(scores):.4f}")
    return "\n".join(lines)


def print_summary(out: Path, wall_s: float, train_s: float | None) -> None:
    """What every run ends with: its eval table, the wall time and where the model is."""
    from mopd_jax.progress import fmt_duration
    path = Path(out) / "eval.json"
    scores = json.loads(path.read_text()) if path.is_file() else {}
    print(eval_table(scores))
    extra = f" (training loop {fmt_duration(train_s)})" if train_s is not None else ""
    print(f"wall time {fmt_duration(wall_s)}{extra}")
    model = Path(out) / "model"
    print(f"model: {model}" if (model / "model.json").is_file() else "model: none exported")


def _eval(args):
    from mopd_jax.config import load_config
    from mopd_jax.loading import load_model
    from mopd_jax.outputs import check_new_file, write_new_file
    from mopd_jax.recipes import common
    src = args.hf or args.checkpoint
    json_file = None if args.json in (None, "-") else args.json
    if json_file:
        check_new_file(json_file, "--json", inputs=[args.config, src])
    enable_compilation_cache()
    cfg = load_config(args.config, args.set)
    run = common.setup(cfg, resume=True, quiet=True)
    if not run.eval_records:
        raise common.RunError(f"{args.config}: no evaluation set (data.eval_files is empty and "
                              "no built-in domain is used); add data.eval_files")
    kw = {"hf": args.hf} if args.hf else {"checkpoint": args.checkpoint}
    loaded = load_model(mesh=run.mesh, role="sample", **kw)
    run = run.with_model(loaded.graphdef, loaded.params, loaded.cfg)
    scores = common.evaluate(run, loaded.params)
    text = json.dumps(scores, indent=1)
    if args.json == "-":
        print(text)
    else:
        print(eval_table(scores))
    if json_file:
        write_new_file(json_file, text + "\n")


def _inspect(args):
    from mopd_jax.inspect_run import inspect_run
    from mopd_jax.tokenizer import load_tokenizer
    decode = None
    model_dir = Path(args.run_dir) / "model"
    tok = load_tokenizer(model_dir) if model_dir.is_dir() else None
    if tok is None and (Path(args.run_dir) / "config.yaml").is_file():
        from mopd_jax.config import load_config
        from mopd_jax.recipes.common import load_tokenizer as run_tokenizer
        try:
            tok = run_tokenizer(load_config(Path(args.run_dir) / "config.yaml"))
        except Exception:  # noqa: BLE001 - decoding is a convenience; ids are printed instead
            tok = None
    if tok is not None:
        decode = tok.decode
    print(inspect_run(args.run_dir, samples=args.samples, decode=decode, step=args.step))


def _demo(args):
    from mopd_jax.recipes.demo import run_demo
    enable_compilation_cache()
    run_demo(args.out, quick=args.quick, overrides=args.set)


def _compare(args):
    from mopd_jax.recipes.compare import run_compare
    enable_compilation_cache()
    run_compare(args.config, out=args.out, quick=args.quick, seeds=args.seeds,
                overrides=args.set, second_round=True if args.second_round else None)


def _merge(args):
    from mopd_jax.merge import merge_checkpoints
    out = merge_checkpoints(args.base, args.models, args.out, args.method, lam=args.lam,
                            density=args.density)
    print(f"merged {len(args.models)} models ({args.method}) -> {out}")


def add_parsers(sub) -> None:
    p = sub.add_parser("train", help="run a recipe (sft, grpo, mopd, ...) from a YAML config",
                       description="Run the recipe named by run.recipe in CONFIG. SIGTERM/SIGINT "
                                   "save a checkpoint and exit; --resume continues from it.")
    p.add_argument("config", metavar="CONFIG.yaml")
    p.add_argument("--set", action="append", default=[], metavar="K=V",
                   help="override a config field, e.g. --set optimizer.lr=1e-5 (repeatable)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last good checkpoint in run.out_dir (a finished "
                        "run is left as it is; without a checkpoint it starts from step 0)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: accept changed fields that alter the run (e.g. "
                        "optimizer.total_steps); recorded in OUT/config_changes.jsonl")
    p.add_argument("--log-every", metavar="N|Ns",
                   help="off a terminal, a progress line every N steps or N seconds (30s); "
                        "default: about 20 lines a run, at least one a minute")
    p.set_defaults(run=_train)

    p = sub.add_parser("eval", help="held-out per-domain scores of a model",
                       description="Greedy mean reward per domain on CONFIG's evaluation set.")
    p.add_argument("config", metavar="CONFIG.yaml")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--checkpoint", metavar="DIR", help="mopd model checkpoint (e.g. RUN/model)")
    g.add_argument("--hf", metavar="DIR", help="Hugging Face model directory")
    p.add_argument("--set", action="append", default=[], metavar="K=V",
                   help="override a config field (repeatable)")
    p.add_argument("--json", metavar="FILE", nargs="?", const="-",
                   help="--json: print the scores as one JSON object instead of the table; "
                        "--json FILE: also write them to FILE (a new file)")
    p.set_defaults(run=_eval)

    p = sub.add_parser("inspect", help="samples and per-domain statistics of a run",
                       description="Print rollouts from RUN_DIR/rollouts and per-domain stats.")
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--samples", type=int, default=3, help="sample rollouts to print")
    p.add_argument("--step", type=int, default=None, help="only this training step")
    p.set_defaults(run=_inspect)

    p = sub.add_parser("demo", help="the whole method on the built-in domains (CPU, minutes)",
                       description="SFT base -> one GRPO teacher per built-in domain -> MOPD "
                                   "student -> evaluation table and OUT/report.md. Re-running "
                                   "the same command continues an interrupted demo.")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="a small budget (about 2 minutes)")
    p.add_argument("--set", action="append", default=[], metavar="K=V",
                   help="override a field of mopd_jax/assets/demo.yaml (repeatable)")
    p.set_defaults(run=_demo)

    p = sub.add_parser("compare", help="MOPD vs every baseline at an equal sample budget",
                       description="From one pi_0 and one set of teachers (trained here unless "
                                   "CONFIG names them: run.init, mopd.teachers), run MOPD, "
                                   "Mix-RL, Cascade RL, Off-Policy FT and Param-Merge (avg, "
                                   "task arithmetic, TIES) with compare.samples samples each; "
                                   "write OUT/compare.md, compare.csv and compare_samples.png. "
                                   "Finished runs are reused, so re-running continues.")
    p.add_argument("config", metavar="CONFIG",
                   help="YAML config, or 'demo' for the built-in domains (mopd_jax/assets/"
                        "demo.yaml)")
    p.add_argument("--out", default="runs/compare",
                   help="output directory (default runs/compare; pass a `mopd demo` --out to "
                        "reuse its pi_0 and teachers)")
    p.add_argument("--quick", action="store_true", help="a tiny budget (tests, smoke runs)")
    p.add_argument("--seeds", type=int, default=1,
                   help="seeds per method (mean ± spread in the table; default 1)")
    p.add_argument("--second-round", action="store_true",
                   help="also RL-train new teachers from the MOPD student and distil again")
    p.add_argument("--set", action="append", default=[], metavar="K=V",
                   help="override a config field, e.g. --set compare.samples=38400 (repeatable)")
    p.set_defaults(run=_compare)

    p = sub.add_parser("merge", help="Param-Merge checkpoints (average, task arithmetic, TIES)",
                       description="Merge models fine-tuned from one base: average of --models; "
                                   "task_arithmetic: base + lam * sum(model - base); ties: "
                                   "TIES-Merging (trim to --density, elect sign, disjoint mean).")
    p.add_argument("--base", required=True, metavar="DIR",
                   help="the common base (pi_0): mopd model dir or hf:DIR")
    p.add_argument("--models", required=True, nargs="+", metavar="DIR",
                   help="models to merge (mopd model dirs or hf:DIR)")
    p.add_argument("--method", choices=MERGE_METHODS,
                   default="task_arithmetic", help="merge method (default task_arithmetic)")
    p.add_argument("--lam", type=float, default=0.5,
                   help="task-vector scale for task_arithmetic and ties (default 0.5)")
    p.add_argument("--density", type=float, default=0.2,
                   help="TIES: fraction of each task vector kept (default 0.2)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="new output model directory (never the base, a model or an existing "
                        "model directory)")
    p.set_defaults(run=_merge)
