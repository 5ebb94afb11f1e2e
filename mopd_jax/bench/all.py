"""``mopd bench all``: every benchmark the README quotes, in one run, into one JSON file.

Each run is a ``mopd bench`` verb with the arguments listed in ``RUNS`` (``--iters`` and the
0.6B sampling shape's ``--layers`` can be changed here); the file holds, per run, its exact
command, its result (environment included), its wall time, the load average at its end and
the cores other processes kept busy meanwhile (``other_cores``), and is rewritten after every run, so an interrupted ``all`` keeps what it measured.
``--update --only NAMES`` re-measures those runs into an existing file and keeps the others
(the file lists every command that wrote it). ``mopd bench report FILE --readme README.md``
(``mopd_jax.bench.report``) writes the README's tables from it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import time

from mopd_jax.bench import cpu_snapshot, other_cores, print_environment

# (name, arguments of `mopd bench`): the README's figures. Timed runs take ``--iters``.
RUNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("loss",)),
    ("step-sft", ("step", "--model", "qwen3-0.6b", "--layers", "2", "--batch", "4", "--seq",
                  "128")),
    ("step-mopd", ("step", "--model", "qwen3-0.6b", "--layers", "2", "--batch", "4", "--seq",
                   "128", "--objective", "mopd-A")),
    ("sample-tiny", ("sample", "--models", "tiny", "--batches", "1,16")),
    ("sample-0.6b", ("sample", "--models", "qwen3-0.6b", "--batches", "1,16", "--profile")),
    ("step-sft-28", ("step", "--model", "qwen3-0.6b", "--layers", "0", "--batch", "4",
                     "--seq", "128", "--optimizer", "sgd", "--scan-layers", "off")),
    ("moe", ("moe", "--tokens", "512", "--layers", "1", "--impls", "blocked")),
)
TIMED = {"step", "sample", "moe"}
# --quick: the same runs at toy sizes (seconds, for a smoke test of the pipeline); what a run
# measures (objective, optimizer, layer scan, profile) is kept, its sizes are replaced.
KEPT = {"--objective": 1, "--optimizer": 1, "--scan-layers": 1,  # flag: number of values
        "--profile": 0}
QUICK = {
    "loss": ("--vocab", "4096", "--batch", "2", "--seq", "256", "--hidden", "64",
             "--vocab-chunk", "1024", "--seq-chunk", "128", "--topk", "8"),
    "step": ("--model", "tiny", "--layers", "0", "--batch", "2", "--seq", "16",
             "--peak-size", "256"),
    "sample": ("--models", "tiny", "--batches", "1,2", "--prompt-len", "8", "--new-tokens",
               "4", "--copy-mb", "16"),
    "moe": ("--tokens", "16", "--experts", "8", "--top-k", "2", "--hidden", "64",
            "--expert-ffn", "32", "--impls", "blocked"),
}


def add_parser(sub):
    p = sub.add_parser("all", help="every benchmark the README quotes, into one JSON file",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True, metavar="OUT", help="file to write the results to")
    p.add_argument("--iters", type=int, default=3, help="interleaved rounds of timed benches")
    p.add_argument("--layers", type=int, default=None,
                   help="num_layers of the qwen3-0.6b sampling shape (default: its 28)")
    p.add_argument("--only", default=None,
                   help=f"comma-separated subset of {','.join(n for n, _ in RUNS)}")
    p.add_argument("--update", action="store_true",
                   help="re-measure the --only runs into the existing OUT, keep its others")
    p.add_argument("--quick", action="store_true",
                   help="toy sizes (a smoke test of the pipeline; figures mean nothing)")
    p.add_argument("--readme", default=None, metavar="README",
                   help="then rewrite this README's generated benchmark block from OUT")
    p.set_defaults(run=run)


def bench_argv(name: str, argv: tuple[str, ...], args) -> list[str]:
    """The ``mopd bench`` arguments of run ``name`` under ``all``'s options."""
    argv = list(argv)
    verb = argv[0]
    if args.quick:
        kept = [a for i, flag in enumerate(argv) if flag in KEPT
                for a in argv[i:i + 1 + KEPT[flag]]]
        argv = [verb] + list(QUICK[verb]) + kept
    elif verb == "sample" and "qwen3-0.6b" in argv and args.layers:
        argv += ["--layers", str(args.layers)]
    if verb in TIMED:
        argv += ["--iters", str(args.iters)]
    return argv


def command(args) -> str:
    """``all``'s own command line, as run."""
    parts = ["mopd", "bench", "all", "--json", args.json, "--iters", str(args.iters)]
    parts += ["--layers", str(args.layers)] if args.layers else []
    parts += ["--only", args.only] if args.only else []
    parts += ["--quick"] if args.quick else []
    parts += ["--update"] if args.update else []
    return shlex.join(parts)


def _bench_parser() -> argparse.ArgumentParser:
    from mopd_jax.bench import loss, moe, sample, step
    parser = argparse.ArgumentParser(prog="mopd bench")
    sub = parser.add_subparsers(dest="bench", required=True)
    for mod in (loss, moe, sample, step):
        mod.add_parser(sub)
    return parser


def run(args) -> dict:
    names = [n for n, _ in RUNS]
    only = names if not args.only else args.only.split(",")
    unknown = sorted(set(only) - set(names))
    if unknown:
        raise ValueError(f"mopd bench all --only: unknown run(s) {unknown}; choose from "
                         f"{','.join(names)}")
    if args.update and not args.only:
        raise ValueError("mopd bench all --update: name the runs to re-measure with --only")
    env = print_environment()
    parser = _bench_parser()
    doc = {"command": command(args), "env": env, "quick": args.quick, "runs": []}
    if args.update:
        with open(args.json) as f:
            old = json.load(f)
        if old.get("quick") != args.quick:
            raise ValueError(f"mopd bench all --update: {args.json} was measured with"
                             f"{'' if old.get('quick') else 'out'} --quick; match it")
        doc = dict(old, commands=old.get("commands", [old["command"]]) + [command(args)])
    t_all = time.perf_counter()
    for name, argv in RUNS:
        if name not in only:
            continue
        argv = bench_argv(name, argv, args)
        cmd = shlex.join(["mopd", "bench"] + argv)
        print(f"\n=== {name}: {cmd}", flush=True)
        t0, cpu0 = time.perf_counter(), cpu_snapshot()
        sub = parser.parse_args(argv)
        result = sub.run(sub)
        run = {"name": name, "bench": argv[0], "command": cmd, "result": result,
               "wall_s": time.perf_counter() - t0,
               "load_end": [round(x, 2) for x in os.getloadavg()],
               "other_cores": other_cores(cpu0, cpu_snapshot())}
        if run["other_cores"] is not None:
            print(f"=== {name}: other processes kept {run['other_cores']:.2f} cores busy on "
                  "average during this run", flush=True)
        doc["runs"] = [r for r in doc["runs"] if r["name"] != name] + [run]
        doc["runs"].sort(key=lambda r: names.index(r["name"]))
        if not args.update:
            doc["wall_s"] = time.perf_counter() - t_all
            doc["load_end"] = run["load_end"]
        _write(args.json, doc)
    print(f"\nwrote {args.json} ({time.perf_counter() - t_all:.0f} s)")
    if args.readme:
        from mopd_jax.bench.report import markdown, update_readme
        update_readme(args.readme, markdown(doc, source=args.json))
        print(f"rewrote the generated benchmark block of {args.readme}")
    return doc


def _write(path: str, doc: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=float)
        f.write("\n")
    os.replace(tmp, path)
