"""What every ``mopd`` verb shares: help with an example and the defaults, and the one-line
error contract (a fixable mistake prints one line naming the flag/field/file and the fix, and
exits 2; a stopped run exits 128 + the signal: 143 for SIGTERM, 130 for Ctrl-C)."""

from __future__ import annotations

import argparse
import errno
import os
import re
import sys

# One example per verb (``mopd <verb> --help`` ends with it).
EXAMPLES = {
    "train": "mopd train configs/tiny.yaml --set run.recipe=sft --set 'data.builtin=[add,sort]' "
             "--set run.out_dir=runs/sft\n  mopd train runs/sft/config.yaml --resume "
             "--log-every 30s > runs/sft/log 2>&1",
    "eval": "mopd eval runs/sft/config.yaml --checkpoint runs/sft/model --json scores.json",
    "inspect": "mopd inspect runs/mopd --samples 5 --step 100 | less",
    "demo": "mopd demo --quick --out runs/demo-quick",
    "compare": "mopd compare demo --out runs/demo --seeds 2",
    "merge": "mopd merge --base runs/sft/model --models runs/t_add/model runs/t_sort/model "
             "--method ties --density 0.2 --out runs/merged",
    "score": "mopd score --checkpoint runs/sft/model --text 'add:12+3=15' --json",
    "generate": "mopd generate --checkpoint runs/sft/model --prompt 'add:12+3=' --greedy "
                "--max-new-tokens 8",
    "convert": "mopd convert /models/qwen3-0.6b runs/qwen3-0.6b --to orbax",
    "compile-check": "mopd compile-check configs/qwen3_30b_a3b_v5p64.yaml --topology v5p-64 "
                     "--steps train",
    "bench": "mopd bench moe",
    "bench moe": "mopd bench moe",
    "bench loss": "mopd bench loss",
    "bench sample": "mopd bench sample --json",
    "bench step": "mopd bench step --json",
    "bench all": "mopd bench all --json measured.json",
    "bench report": "mopd bench report measured.json",
}


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; each option's default appended unless it says it already or
    there is nothing to say (flags, None, empty lists)."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if ("default" in text or d in (None, False, argparse.SUPPRESS) or d == []
                or not action.option_strings or isinstance(action, argparse._VersionAction)):
            return text
        return f"{text} (default: %(default)s)"


def _plain(text: str | None) -> str | None:
    """A module docstring as help: ``code`` marks and reST roles dropped."""
    if not text:
        return text
    text = re.sub(r":\w+:`([^`]*)`", r"\1", text)
    return text.replace("``", "").replace("`", "")


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def finish_help(parser: argparse.ArgumentParser, path: str = "") -> None:
    """Every sub-command: the shared formatter, plain descriptions, its example."""
    for name, sub in _subparsers(parser):
        key = f"{path} {name}".strip()
        sub.formatter_class = Formatter
        sub.description = _plain(sub.description)
        example = EXAMPLES.get(key)
        if example and not sub.epilog:
            sub.epilog = f"example:\n  {example}"
        finish_help(sub, key)


# ----------------------------------------------------------------------------- errors
_PATH_ERRNOS = {errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.EACCES, errno.EPERM,
                errno.EEXIST, errno.ENOSPC, errno.EROFS, errno.ENAMETOOLONG}


def _out_of_memory(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    name = type(e).__name__
    text = str(e)
    return (name in ("XlaRuntimeError", "JaxRuntimeError")
            and ("RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()))


def _first_line(e: BaseException, limit: int = 200) -> str:
    line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    return line[:limit]


def run_verb(args, user_errors: tuple) -> int:
    """Run ``args.run(args)`` under the error contract; returns the exit status."""
    verb = args.verb + (f" {args.bench}" if getattr(args, "bench", None) else "")
    try:
        args.run(args)
    except user_errors as e:
        print(f"mopd {verb}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `mopd inspect RUN | head`: the reader has gone
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        print(f"mopd {verb}: output closed early (broken pipe); the rest was not printed",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from mopd_jax.run_checkpoint import last_signal
        return 128 + last_signal()
    except OSError as e:
        if e.errno not in _PATH_ERRNOS:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"mopd {verb}: error: {where}{e.strerror or _first_line(e)}; check the path "
              "(outputs must be new paths in a writable directory)", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - only allocation failures are handled here
        if not _out_of_memory(e):
            raise
        print(f"mopd {verb}: error: out of memory ({_first_line(e, 160)}); lower rollout.slots, "
              "rollout.max_new_tokens or the batch (sft.batch_size / grpo.prompts_per_step / "
              "mopd.prompts_per_step), or raise optimizer.microbatches", file=sys.stderr)
        return 2
    return 0
