"""Reward functions: ``fn(response, record) -> float`` in [0, 1], looked up by name.

A record is a prompt data record (see ``sources``); it picks its reward by ``record["reward"]``
and carries what the reward needs: ``answer`` (``exact_match``, ``math``) or ``tests``
(``code``). ``score_batch`` scores a batch, running subprocess-bound rewards (``code``) in a
thread pool. Add a reward with ``@register("name")``.

Built-ins:

* ``exact_match``: stripped response == stripped ``str(answer)``.
* ``math``: the final answer (last ``\\boxed{...}``, else the last number) equals ``answer``
  as an exact rational (``0.5`` == ``\\frac{1}{2}`` == ``1/2``, ``1,000`` == ``1000``) or,
  when either side is not a number, as a normalised LaTeX string (``\\dfrac``/``\\tfrac``,
  ``\\left(``/``\\right)``, ``$``, spaces, ``\\text{}``, ``%`` and a leading ``x =`` removed).
  No symbolic algebra: ``\\sqrt{8}`` and ``2\\sqrt{2}`` differ.
* ``code``: the last fenced python block of the response (else the last untagged block, else
  the whole response) runs in ``sandbox.run_python`` with the test snippets ``tests`` (a string
  of asserts or a list of them): reward = fraction of snippets that pass, 0 on a crash, a
  timeout, or no report. Optional record fields ``timeout_s`` and ``memory_mb`` tune the
  sandbox. The tests run in the candidate's process, so a deliberately adversarial candidate
  can fake passing (e.g. objects whose ``__eq__`` is always True); only the report channel is
  protected by a random token.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import secrets
from fractions import Fraction
from typing import Callable

import numpy as np

from mopd_jax.data import sandbox

RewardFn = Callable[[str, dict], float]
REWARDS: dict[str, RewardFn] = {}
_PARALLEL: set[str] = set()  # rewards that wait on a subprocess: score_batch threads them


class RewardError(ValueError):
    """Unknown reward, a record missing what its reward needs, or a reward out of [0, 1]."""


def register(name: str, *, parallel: bool = False) -> Callable[[RewardFn], RewardFn]:
    """Decorator adding ``fn`` to ``REWARDS`` as ``name``.

    ``parallel``: the reward mostly waits (on a subprocess or I/O), so ``score_batch`` runs it
    in its thread pool.
    """
    def add(fn: RewardFn) -> RewardFn:
        if name in REWARDS:
            raise RewardError(f"reward {name!r} is already registered ({REWARDS[name]!r})")
        REWARDS[name] = fn
        if parallel:
            _PARALLEL.add(name)
        return fn
    return add


def get_reward(name: str) -> RewardFn:
    """The reward registered as ``name``; an unknown name raises ``RewardError`` listing all."""
    try:
        return REWARDS[name]
    except (KeyError, TypeError):
        raise RewardError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARDS))}"
                          " (register more with @mopd_jax.data.rewards.register)") from None


def score_batch(responses: list[str], records: list[dict], default: str | None = None,
                max_workers: int = 2) -> np.ndarray:
    """Rewards of ``responses[i]`` for ``records[i]`` as float32 ``[B]``.

    Each record's reward is ``record["reward"]``, else ``default``. Rewards registered with
    ``parallel=True`` (``code``) run ``max_workers`` at a time in threads; the rest run inline.
    """
    if len(responses) != len(records):
        raise ValueError(f"score_batch: {len(responses)} responses but {len(records)} records")
    names = []
    for i, record in enumerate(records):
        name = record.get("reward", default)
        if name is None:
            raise RewardError(f"record {i} has no 'reward' field and score_batch got no default; "
                              f"set record['reward'] or pass default= one of "
                              f"{', '.join(sorted(REWARDS))}")
        get_reward(name)
        names.append(name)
    scores_B = np.zeros(len(responses), np.float32)
    threaded = [i for i, name in enumerate(names) if name in _PARALLEL]
    inline = [i for i, name in enumerate(names) if name not in _PARALLEL]
    for i in inline:
        scores_B[i] = _score(names[i], responses[i], records[i])
    if threaded and max_workers > 1:
        with concurrent.futures.ThreadPoolExecutor(max_workers) as pool:
            futures = {i: pool.submit(_score, names[i], responses[i], records[i])
                       for i in threaded}
            for i, future in futures.items():
                scores_B[i] = future.result()
    else:
        for i in threaded:
            scores_B[i] = _score(names[i], responses[i], records[i])
    return scores_B


def _score(name: str, response: str, record: dict) -> float:
    value = float(REWARDS[name](response, record))
    if not 0.0 <= value <= 1.0:
        raise RewardError(f"reward {name!r} returned {value}; rewards must lie in [0, 1]")
    return value


def _field(record: dict, key: str, reward: str):
    if key not in record:
        raise RewardError(f"reward {reward!r} needs record[{key!r}], but the record has only "
                          f"{sorted(record)}; add {key!r} to the data or pick another reward")
    return record[key]


# --- exact_match ---------------------------------------------------------------------------

@register("exact_match")
def exact_match(response: str, record: dict) -> float:
    """1.0 iff the stripped response equals the stripped ``str(record['answer'])``."""
    return float(response.strip() == str(_field(record, "answer", "exact_match")).strip())


# --- math ----------------------------------------------------------------------------------

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUMBER = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?|[-+]?\d+(?:\.\d+)?(?:/\d+)?|[-+]?\.\d+")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_DECIMAL = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)")
_RATIO = re.compile(r"([-+]?)(?:\\frac\{([-+]?[\d.]+)\}\{([-+]?[\d.]+)\}|([\d.]+)/([\d.]+))")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox|mathbf)\{([^{}]*)\}")
_STRIP = ("\\left", "\\right", "\\displaystyle", "\\!", "\\,", "\\;", "\\:", "\\ ", "$",
          "^\\circ", "^{\\circ}", "\\%", "%", "\\$")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (nested braces kept); None if there is none."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    depth = 1
    for j in range(starts[-1], len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[starts[-1]:j]
    return None  # unbalanced: the generation was cut off


def final_answer(text: str) -> str | None:
    """The answer a solution commits to: last ``\\boxed{}``, text after ``####``, last number."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    if _BOXED.search(text):
        return None  # cut off inside the box: no committed answer
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    numbers = _NUMBER.findall(text.replace("{,}", ","))
    return numbers[-1] if numbers else None


def normalize_answer(answer: str) -> str:
    """Canonical string form of a final answer (LaTeX spacing and wrappers removed)."""
    s = _TEXT.sub(r"\1", answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac"))
    for token in _STRIP:
        s = s.replace(token, "")
    s = s.replace("{,}", ",").replace(" ", "").rstrip(".")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", s)
    s = re.sub(r"^[a-zA-Z]=", "", s)  # "x=5" -> "5"
    if s.startswith("{") and s.endswith("}") and last_boxed("\\boxed" + s) == s[1:-1]:
        s = s[1:-1]
    return s.removeprefix("+")


def to_rational(s: str) -> Fraction | None:
    """``s`` (normalised) as an exact rational, or None; bounded length, no exponents."""
    if len(s) > 64:
        return None
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    try:
        if _DECIMAL.fullmatch(s):
            return Fraction(s)
        m = _RATIO.fullmatch(s)
        if m:
            num, den = (m.group(2), m.group(3)) if m.group(2) else (m.group(4), m.group(5))
            value = Fraction(num) / Fraction(den)
            return -value if m.group(1) == "-" else value
    except (ValueError, ZeroDivisionError):
        return None
    return None


def math_equal(predicted: str, target: str) -> bool:
    """Final-answer equivalence: exact rationals when both parse, else normalised strings."""
    a, b = normalize_answer(predicted), normalize_answer(target)
    ra, rb = to_rational(a), to_rational(b)
    if ra is not None and rb is not None:
        return ra == rb
    return a == b and a != ""


@register("math")
def math_reward(response: str, record: dict) -> float:
    """1.0 iff the response's final answer equals ``record['answer']`` (see module doc)."""
    target = str(_field(record, "answer", "math"))
    target = final_answer(target) if ("\\boxed" in target or "####" in target) else target
    predicted = final_answer(response)
    if predicted is None or target is None:
        return 0.0
    return float(math_equal(predicted, target))


# --- code ----------------------------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = ("python", "py", "python3")

# Runs in the sandbox: candidate first (as module "solution", so `if __name__ == "__main__"`
# blocks stay quiet), then each snippet in a copy of its namespace. Candidate output goes to
# /dev/null; one report line, prefixed by a random token, goes to the saved real stdout, then
# os._exit skips atexit handlers and non-daemon threads the candidate may have left.
_HARNESS = r'''
def _harness(candidate, tests, token, *, _dumps=__import__("json").dumps,
             _write=__import__("os").write, _exit=__import__("os")._exit):
    import os, sys, types
    report = os.dup(1)
    sink = os.open(os.devnull, os.O_WRONLY)
    os.dup2(sink, 1)
    os.dup2(sink, 2)
    solution = types.ModuleType("solution")
    sys.modules["solution"] = solution
    passed = []
    try:
        exec(compile(candidate, "solution.py", "exec"), solution.__dict__)
        loaded = True
    except BaseException:
        loaded = False
    for test in tests:
        try:
            if not loaded:
                raise RuntimeError("candidate failed")
            exec(compile(test, "test.py", "exec"), dict(solution.__dict__))
            passed.append(True)
        except BaseException:
            passed.append(False)
    _write(report, (token + _dumps(passed) + "\n").encode())
    _exit(0)
'''


def extract_code(response: str) -> str:
    """Last ```python block (an unclosed final block counts), else last untagged block, else
    the whole response."""
    blocks = _FENCE.findall(response)
    for tags in (_PYTHON_TAGS, ("",)):
        tagged = [body for tag, body in blocks if tag.lower() in tags]
        if tagged:
            return tagged[-1]
    return response


@register("code", parallel=True)
def code_reward(response: str, record: dict) -> float:
    """Fraction of ``record['tests']`` snippets passing against the response's code."""
    tests = _field(record, "tests", "code")
    tests = [tests] if isinstance(tests, str) else list(tests)
    if not tests or not all(isinstance(t, str) for t in tests):
        raise RewardError(f"reward 'code' needs record['tests'] = a string of Python test code "
                          f"or a non-empty list of them, got {record['tests']!r:.200}")
    token = "@@mopd-report-" + secrets.token_hex(16) + "@@"
    program = f"{_HARNESS}\n_harness({extract_code(response)!r}, {tests!r}, {token!r})\n"
    result = sandbox.run_python(program, timeout_s=float(record.get("timeout_s", 5.0)),
                                memory_mb=int(record.get("memory_mb", 512)))
    if not result.ok:
        return 0.0
    reports = [line[len(token):] for line in result.stdout.splitlines()
               if line.startswith(token)]
    try:
        passed = json.loads(reports[-1])
    except (IndexError, ValueError):
        return 0.0
    if not isinstance(passed, list) or len(passed) != len(tests):
        return 0.0
    return sum(p is True for p in passed) / len(tests)
