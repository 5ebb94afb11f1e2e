"""Reward functions: ``fn(response, record) -> float`` in [0, 1], looked up by name.

A record is a prompt data record (see ``sources``); it picks its reward by ``record["reward"]``
and carries what the reward needs: ``answer`` (``exact_match``, ``math``), ``tests`` or
``input_output`` (``code``), ``constraints`` (``ifeval``). ``score_batch`` scores a batch,
running subprocess-bound rewards (``code``) in a thread pool. Add a reward with
``@register("name")``; ``configure`` sets the run-wide knobs (``rewards:`` in the config).

Built-ins:

* ``exact_match``: stripped response == stripped ``str(answer)``.
* ``math``: the final answer (last ``\\boxed{...}``, else the last number) equals ``answer``
  as an exact rational (``0.5`` == ``\\frac{1}{2}`` == ``1/2``, ``1,000`` == ``1000``) or,
  when either side is not a number, as a normalised LaTeX string (``\\dfrac``/``\\tfrac``,
  ``\\left(``/``\\right)``, ``$``, spaces, ``\\text{}``, ``%`` and a leading ``x =`` removed).
  No symbolic algebra: ``\\sqrt{8}`` and ``2\\sqrt{2}`` differ. A response boxing several
  different answers (``\\boxed{4} or \\boxed{5}``) scores 0, as strict graders do
  (``rewards.math.distinct_answers: last`` grades the last one instead; a record may set
  ``distinct_answers`` too).
* ``code``: the last fenced python block of the response (else the last untagged block, else
  the whole response) runs in a sandboxed child against the record's tests (assert snippets,
  call cases, stdin/stdout cases, APPS-style ``input_output``; see ``code_tests``). The child
  only computes; the expected values stay in this process, which compares (``code_judge``).
  Reward = fraction of tests passing; 0 on a crash, a timeout, or a tampered report. Optional
  record fields ``timeout_s`` (whole candidate, default 5) and ``memory_mb`` (default 512)
  tune the sandbox; ``rewards.code.isolation`` picks its OS isolation (``isolation``).
* ``ifeval`` / ``ifeval_loose``: the fraction of the record's verifiable instructions the
  response follows (``instructions``), strict or IFEval's loose variant.
"""

from __future__ import annotations

import concurrent.futures
import re
from fractions import Fraction
from typing import Callable

import numpy as np

from mopd_jax.data import code_judge, code_tests, instructions
from mopd_jax.data import isolation as iso
from mopd_jax.data import sandbox

RewardFn = Callable[[str, dict], float]
REWARDS: dict[str, RewardFn] = {}
_PARALLEL: set[str] = set()  # rewards that wait on a subprocess: score_batch threads them


class RewardError(ValueError):
    """Unknown reward, a record missing what its reward needs, or a reward out of [0, 1]."""


DISTINCT_ANSWERS = ("zero", "last")
_SETTINGS = {"isolation": "auto", "distinct_answers": "zero"}


def configure(settings=None, *, isolation: str | None = None,
              distinct_answers: str | None = None) -> str:
    """Set the run-wide reward knobs; returns the run-header line saying what they give here.

    ``settings`` is the config's ``rewards`` section (``.code.isolation``,
    ``.math.distinct_answers``); keywords override it. An OS isolation that does not work on
    this machine raises ``RewardError`` naming the fix.
    """
    if settings is not None:
        isolation = isolation or settings.code.isolation
        distinct_answers = distinct_answers or settings.math.distinct_answers
    if isolation is not None:
        try:
            sandbox.resolve(isolation)  # fail now, at start-up, not at the first code prompt
        except iso.IsolationError as e:
            raise RewardError(str(e)) from None
        _SETTINGS["isolation"] = isolation
    if distinct_answers is not None:
        _SETTINGS["distinct_answers"] = _check_distinct(distinct_answers,
                                                        "rewards.math.distinct_answers")
    return (f"rewards: code sandbox isolation {sandbox.describe(_SETTINGS['isolation'])}; "
            f"math distinct answers -> {_SETTINGS['distinct_answers']}")


def _check_distinct(value, where: str) -> str:
    if value not in DISTINCT_ANSWERS:
        raise RewardError(f"{where}: {value!r} is not one of {', '.join(DISTINCT_ANSWERS)} "
                          "(zero: several different boxed answers score 0; last: grade the "
                          "last)")
    return value


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


def boxed_all(text: str) -> list[str]:
    """Contents of every complete ``\\boxed{...}`` in ``text``, in order."""
    out = []
    for m in _BOXED.finditer(text):
        depth = 1
        for j in range(m.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                out.append(text[m.end():j])
                break
    return out


@register("math")
def math_reward(response: str, record: dict) -> float:
    """1.0 iff the response's final answer equals ``record['answer']`` (see module doc)."""
    target = str(_field(record, "answer", "math"))
    target = final_answer(target) if ("\\boxed" in target or "####" in target) else target
    predicted = final_answer(response)
    if predicted is None or target is None:
        return 0.0
    distinct = record.get("distinct_answers", _SETTINGS["distinct_answers"])
    if _check_distinct(distinct, "record['distinct_answers']") == "zero" and any(
            not math_equal(b, predicted) for b in boxed_all(response)):
        return 0.0  # hedged: several different final answers
    return float(math_equal(predicted, target))


# --- code ----------------------------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = ("python", "py", "python3")

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
    """Fraction of the record's tests passing against the response's code (module doc)."""
    if "input_output" not in record:
        tests = _field(record, "tests", "code")
        if not tests or not isinstance(tests, (str, dict, list)):
            raise RewardError(f"reward 'code' needs record['tests'] = a test (an assert "
                              f"snippet or a case object) or a non-empty list of them, got "
                              f"{tests!r:.200}")
    try:
        plan = code_tests.plan_for(record)
    except code_tests.TestFormatError as e:
        raise RewardError(f"reward 'code': record {str(record.get('prompt'))[:60]!r}: {e}; "
                          "see mopd_jax/data/code_tests.py for the formats") from None
    passed = code_judge.judge(extract_code(response), plan,
                              timeout_s=float(record.get("timeout_s", 5.0)),
                              memory_mb=int(record.get("memory_mb", 512)),
                              isolation=_SETTINGS["isolation"])
    return sum(passed) / len(passed)


# --- instruction following -----------------------------------------------------------------

@register("ifeval")
def ifeval_reward(response: str, record: dict) -> float:
    """Fraction of ``record['constraints']`` (or IFEval's ``instruction_id_list`` +
    ``kwargs``) the response meets, strictly."""
    return _instructions(response, record, loose=False)


@register("ifeval_loose")
def ifeval_loose_reward(response: str, record: dict) -> float:
    """As ``ifeval``, IFEval's loose variant: a constraint counts as met when it holds after
    dropping the first and/or last line or the markdown ``*``."""
    return _instructions(response, record, loose=True)


def _instructions(response: str, record: dict, loose: bool) -> float:
    try:
        return instructions.score(response, record, loose=loose)
    except instructions.InstructionError as e:
        raise RewardError(f"reward {'ifeval_loose' if loose else 'ifeval'}: {e}") from None
