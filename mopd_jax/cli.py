"""mopd: multi-teacher on-policy distillation in JAX, one command per step of the workflow.

Every verb has --help with an example. A mistake you can fix (a flag, a config field, a data
file, an output that exists) prints one line naming it and the fix, and exits with status 2.
--json means the same everywhere: machine-readable output, one JSON object on stdout instead
of the table (--json FILE, where a verb takes one, writes it to a new FILE instead). SIGTERM or
Ctrl-C stop a training run at the next step with a checkpoint (exit 143 / 130).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import sys

from mopd_jax.errors import UsageError


def _user_errors():
    from models.config import ModelConfigError
    from models.hf import HFCheckpointError
    from mopd_jax.checkpoint import CheckpointError
    from mopd_jax.config import ConfigError
    from mopd_jax.sharding import MeshError
    from mopd_jax.recipes.cli import user_errors
    return (ConfigError, ModelConfigError, HFCheckpointError, CheckpointError, MeshError,
            FileNotFoundError, UsageError, *user_errors())


PRESET_HELP = ("a named architecture with random weights, for smoke tests and benchmarks "
               "(tiny, tiny-moe, demo-moe, qwen3-0.6b, qwen3-30b-a3b, ...)")


def _add_model_source(p, required=True):
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--hf", metavar="DIR", help="local Hugging Face model directory")
    g.add_argument("--checkpoint", metavar="DIR", help="mopd (Orbax) model checkpoint")
    g.add_argument("--preset", metavar="NAME", help=PRESET_HELP)


def parse_tokens(text: str, vocab_size: int, flag: str = "--tokens") -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated integer token ids, "
                         "e.g. --tokens 1,2,3") from None
    if not ids:
        raise UsageError(f"{flag}: empty; give at least one token id")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise UsageError(f"{flag}: ids {bad[:5]} are outside the model's vocabulary "
                         f"[0, {vocab_size})")
    return ids


# --------------------------------------------------------------------------- score
def _score(args):
    import jax.numpy as jnp
    from mopd_jax.loading import load_model
    from mopd_jax.steps import token_logprobs_step

    loaded = load_model(hf=args.hf, checkpoint=args.checkpoint, preset=args.preset,
                        role="teacher")
    flag = "--tokens"
    if args.text is not None:
        flag = "--text"
        if loaded.tokenizer is None:
            raise UsageError("--text: this model has no tokenizer (tokenizer.json or "
                             "char_tokenizer.json beside it); pass --tokens 1,2,3")
        ids = list(loaded.tokenizer.encode(args.text))
    else:
        ids = parse_tokens(args.tokens, loaded.cfg.vocab_size)
    if len(ids) < 2:
        raise UsageError(f"{flag}: need at least two tokens to score x_t given x_<t")
    lp = token_logprobs_step(loaded.graphdef, loaded.params, jnp.asarray([ids], jnp.int32))
    lp = [float(x) for x in lp[0]]
    if args.json:
        print(json.dumps({"tokens": ids, "logprobs": [None] + lp}))
    else:
        print(f"{'t':>4} {'token':>8} {'log p(x_t|x_<t)':>18}")
        print(f"{0:>4} {ids[0]:>8} {'-':>18}")
        for t, (tok, v) in enumerate(zip(ids[1:], lp), start=1):
            print(f"{t:>4} {tok:>8} {v:>18.6f}")
        print(f"sum {sum(lp):.6f}  mean {sum(lp) / len(lp):.6f}")


# --------------------------------------------------------------------------- convert
def _convert(args):
    from pathlib import Path

    from models.hf import save_hf
    from mopd_jax.checkpoint import save_model
    from mopd_jax.loading import load_model

    from mopd_jax.outputs import atomic_dir, check_new_dir

    src, dst = Path(args.src), Path(args.dst)
    if not src.is_dir():
        raise UsageError(f"SRC {src}: not a directory")
    check_new_dir(dst, "DST", inputs=[src])
    if (src / "model.json").is_file():
        loaded = load_model(checkpoint=str(src))
    elif (src / "config.json").is_file():
        loaded = load_model(hf=str(src))
    else:
        raise UsageError(f"SRC {src}: neither a mopd checkpoint (model.json) nor a Hugging Face "
                         "directory (config.json)")
    with atomic_dir(dst) as tmp:  # whole or absent: written beside DST, renamed into place
        if args.to == "hf":
            save_hf(loaded.params, loaded.cfg, tmp)
        else:
            save_model(tmp, loaded.params, loaded.cfg)
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                     "char_tokenizer.json", "generation_config.json"):
            if (src / name).is_file():
                (tmp / name).write_bytes((src / name).read_bytes())
    print(f"wrote {args.to} checkpoint of {loaded.cfg.name} "
          f"({loaded.cfg.num_params() / 1e6:.2f}M params) to {dst}")


# --------------------------------------------------------------------------- main
# PCI ids of TPU chips (as jax._src.hardware_utils lists them) and of any GPU's device files.
_TPU_PCI = ("0x1ae0", {"0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076"})
_ACCEL_FILES = ("/dev/accel[0-9]*", "/dev/vfio/[0-9]*",  # TPU chips (v2-v4; v5e and newer)
                "/dev/nvidia[0-9]*", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")  # GPUs


def _machine_has_accelerator() -> bool:
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f, open(os.path.join(os.path.dirname(vendor), "device")) as g:
                if f.read().strip() == _TPU_PCI[0] and g.read().strip() in _TPU_PCI[1]:
                    return True
        except OSError:
            pass
    return any(glob.glob(pattern) for pattern in _ACCEL_FILES)


def _libtpu_installed() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def skip_absent_tpu(environ=os.environ) -> None:
    """With libtpu installed (the test or tpu-aot extra) JAX tries its TPU backend first, and
    on a machine without TPU chips libtpu prints initialisation errors before falling back to
    the CPU. There, unless JAX_PLATFORMS is set (``JAX_PLATFORMS=`` keeps JAX's own choice) or
    JAX_FORCE_TPU_INIT is, use the CPU directly: it is what JAX would pick. Machines with a TPU
    or GPU are left alone; ``mopd compile-check`` loads libtpu for its compile-only topology
    either way. Called before anything imports jax."""
    if "JAX_PLATFORMS" in environ or "JAX_FORCE_TPU_INIT" in environ:
        return
    if not _libtpu_installed() or _machine_has_accelerator():
        return
    environ["JAX_PLATFORMS"] = "cpu"


def build_parser() -> argparse.ArgumentParser:
    from mopd_jax import __version__
    from mopd_jax.cli_support import finish_help

    parser = argparse.ArgumentParser(prog="mopd", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"mopd-jax {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = sub.add_parser("score", help="per-token log-probs log p(x_t | x_<t) of a sequence",
                       description="Print log p(x_t | x_<t) for t >= 1 under a model.")
    _add_model_source(p)
    seq = p.add_mutually_exclusive_group(required=True)
    seq.add_argument("--tokens", help="comma-separated token ids, e.g. 1,2,3")
    seq.add_argument("--text", help="text, encoded with the model's own tokenizer")
    p.add_argument("--json", action="store_true",
                   help='print {"tokens": [...], "logprobs": [null, ...]} instead of the table')
    p.set_defaults(run=_score)

    p = sub.add_parser("convert", help="convert between Hugging Face and Orbax checkpoints",
                       description="Convert SRC (HF dir or mopd checkpoint) to DST.")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.add_argument("--to", choices=["hf", "orbax"], required=True, help="output format")
    p.set_defaults(run=_convert)

    try:
        from mopd_jax.sampling.cli import add_generate_parser
        add_generate_parser(sub)
    except ImportError:
        pass

    from mopd_jax.recipes.cli import add_parsers
    add_parsers(sub)

    p = sub.add_parser("bench", help="benchmarks (ratios against a reference in the same run)",
                       description="Benchmarks; each prints ratios against a reference "
                                   "measured in the same run.")
    bsub = p.add_subparsers(dest="bench", metavar="BENCH", required=True)
    from mopd_jax.bench import moe
    moe.add_parser(bsub)
    for mod in ("sample", "loss", "step", "pipeline", "replay", "all", "report"):
        try:
            __import__(f"mopd_jax.bench.{mod}", fromlist=["add_parser"]).add_parser(bsub)
        except ImportError:
            pass
    from mopd_jax import compile_check
    compile_check.add_parser(sub)
    finish_help(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mopd_jax.cli_support import run_verb

    skip_absent_tpu()
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_verb(args, _user_errors())


if __name__ == "__main__":
    sys.exit(main())
