"""Verifiable instructions (IFEval-style): the ``ifeval`` / ``ifeval_loose`` rewards.

A record lists its constraints, either as ``constraints``::

    {"prompt": "...", "domain": "if", "reward": "ifeval",
     "constraints": [{"kind": "words", "n": 50, "relation": "at most"},
                     {"kind": "keywords", "keywords": ["ocean"]}, {"kind": "lowercase"}]}

or in IFEval's own format, ``instruction_id_list`` + ``kwargs`` (``null`` kwargs ignored, as
the Hugging Face copy of IFEval has them). The reward is the fraction of constraints met. The
loose variant (IFEval's) counts a constraint as met when it holds for the response or for it
without its first line, its last line, both, or the markdown ``*``.

Kinds (``relation``: at least | at most | less than | more than | exactly):

========================  ==========================================================
words n relation          ``\\w+`` tokens (IFEval's count)
sentences n relation      sentences ending in ``.``, ``!`` or ``?`` (a regex, not nltk)
paragraphs n relation     paragraphs split by blank lines, or ``separator: "***"``
nth_paragraph_first_word  n paragraphs (blank-line separated), paragraph ``nth`` starts
                          with ``first_word``
length_chars n relation   characters of the stripped response
keywords keywords         each keyword occurs (case-insensitive)
keyword_frequency         ``keyword`` occurs n times (relation)
forbidden_words words     none of them occurs as a whole word
letter_frequency          ``letter`` occurs n times (relation; n=0 "exactly": absent)
lowercase / uppercase     no upper-case / no lower-case letters
capital_words n relation  words written in capitals
json                      the response (``````json`` fences allowed) is JSON
bullets n relation        markdown bullet lines (``*`` or ``-``)
highlights n              at least n ``*highlighted*`` spans
sections n splitter       at least n sections headed ``splitter`` + number
title                     a ``<<title>>``
starts_with / ends_with   the stripped response starts / ends with ``phrase``
                          (case-insensitive, as IFEval's end check)
quotation                 wrapped in double quotes
no_comma                  no ``,``
placeholders n            at least n ``[placeholders]``
postscript marker         a line starting with ``marker`` (e.g. ``P.S.``)
constrained_response      one of "My answer is yes./no./maybe."
two_responses             two different responses separated by ``******``
repeat_prompt prompt      starts with the prompt, repeated verbatim
script script             every letter is of ``script`` (latin, greek, cyrillic, arabic,
                          hebrew, devanagari, bengali, thai, hangul, cjk), at least
                          ``min_fraction`` of them (default 1); ``digits``: only digits
========================  ==========================================================

IFEval's ``language:response_language`` maps to ``script`` with ``min_fraction: 0.9`` (so
languages sharing a script, e.g. English and French, are not told apart).
"""

from __future__ import annotations

import inspect
import json
import operator
import re
import unicodedata
from typing import Callable


class InstructionError(ValueError):
    """A constraint that is unknown or has missing / wrong arguments."""


RELATIONS = {"at least": operator.ge, "at most": operator.le, "less than": operator.lt,
             "more than": operator.gt, "exactly": operator.eq}
CONSTRAINTS: dict[str, Callable[..., bool]] = {}


def constraint(fn):
    CONSTRAINTS[fn.__name__.removesuffix("_")] = fn
    return fn


def _count(value: int, n: int, relation: str) -> bool:
    if relation not in RELATIONS:
        raise InstructionError(f"relation {relation!r} is not one of {', '.join(RELATIONS)}")
    return RELATIONS[relation](value, n)


def _paragraphs(text: str, separator: str = "blank_line") -> list[str]:
    if separator == "***":
        parts = re.split(r"\s?\*\*\*\s?", text)
    else:
        parts = re.split(r"\n\s*\n", text)
    return [p for p in (q.strip() for q in parts) if p]


@constraint
def words(text, n: int, relation: str = "at least") -> bool:
    return _count(len(re.findall(r"\w+", text)), n, relation)


@constraint
def sentences(text, n: int, relation: str = "at least") -> bool:
    found = [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if re.search(r"\w", s)]
    return _count(len(found), n, relation)


@constraint
def paragraphs(text, n: int, relation: str = "exactly", separator: str = "blank_line") -> bool:
    if separator == "***" and re.search(r"\*\*\*\s*\*\*\*", text):
        return False  # an empty paragraph between two dividers
    return _count(len(_paragraphs(text, separator)), n, relation)


@constraint
def nth_paragraph_first_word(text, n: int, nth: int, first_word: str) -> bool:
    paras = _paragraphs(text)
    if len(paras) != n or not 1 <= nth <= n:
        return False
    word = re.sub(r"[^\w]", "", (paras[nth - 1].split() or [""])[0]).lower()
    return word == first_word.lower()


@constraint
def length_chars(text, n: int, relation: str = "at least") -> bool:
    return _count(len(text.strip()), n, relation)


@constraint
def keywords(text, keywords: list) -> bool:
    return all(re.search(re.escape(k), text, re.IGNORECASE) for k in keywords)


@constraint
def keyword_frequency(text, keyword: str, n: int, relation: str = "at least") -> bool:
    return _count(len(re.findall(re.escape(keyword), text, re.IGNORECASE)), n, relation)


@constraint
def forbidden_words(text, words: list) -> bool:
    return not any(re.search(r"\b" + re.escape(w) + r"\b", text, re.IGNORECASE) for w in words)


@constraint
def letter_frequency(text, letter: str, n: int, relation: str = "at least") -> bool:
    if len(letter) != 1:
        raise InstructionError(f"letter_frequency: 'letter' must be one character, got "
                               f"{letter!r}")
    return _count(text.lower().count(letter.lower()), n, relation)


@constraint
def lowercase(text) -> bool:
    return text == text.lower()


@constraint
def uppercase(text) -> bool:
    return text == text.upper()


@constraint
def capital_words(text, n: int, relation: str = "at least") -> bool:
    caps = [w for w in re.findall(r"\w+", text) if w.isupper()]
    return _count(len(caps), n, relation)


@constraint
def json_(text) -> bool:
    body = text.strip()
    body = re.sub(r"^```(?:json|JSON|Json)?\s*", "", body)
    body = re.sub(r"\s*```$", "", body)
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


@constraint
def bullets(text, n: int, relation: str = "exactly") -> bool:
    found = re.findall(r"^\s*(?:\*[^\*]|-\s).*$", text, re.MULTILINE)
    return _count(len(found), n, relation)


@constraint
def highlights(text, n: int) -> bool:
    spans = re.findall(r"\*[^\n\*]+\*", text) + re.findall(r"\*\*[^\n\*]+\*\*", text)
    return sum(1 for s in spans if s.strip("*").strip()) >= n


@constraint
def sections(text, n: int, splitter: str = "Section") -> bool:
    parts = re.split(r"\s?" + re.escape(splitter) + r"\s?\d+\s?", text)
    return len(parts) - 1 >= n


@constraint
def title(text) -> bool:
    return any(t.strip() for t in re.findall(r"<<([^\n]+?)>>", text))


@constraint
def starts_with(text, phrase: str) -> bool:
    return text.strip().lower().startswith(phrase.strip().lower())


@constraint
def ends_with(text, phrase: str) -> bool:
    return text.strip().lower().endswith(phrase.strip().lower())


@constraint
def quotation(text) -> bool:
    t = text.strip()
    return len(t) > 1 and t[0] == '"' and t[-1] == '"'


@constraint
def no_comma(text) -> bool:
    return "," not in text


@constraint
def placeholders(text, n: int) -> bool:
    return len(re.findall(r"\[.*?\]", text)) >= n


@constraint
def postscript(text, marker: str = "P.S.") -> bool:
    pattern = r"\s*p\.\s?p\.\s?s.*$" if marker.upper() == "P.P.S" else \
        r"\s*" + re.escape(marker.lower()) + r".*$"
    return re.search(pattern, text.lower(), re.MULTILINE) is not None


@constraint
def constrained_response(text) -> bool:
    return any(a in text for a in ("My answer is yes.", "My answer is no.",
                                   "My answer is maybe."))


@constraint
def two_responses(text) -> bool:
    parts = [p.strip() for p in text.split("******")]
    return len(parts) == 2 and all(parts) and parts[0] != parts[1]


@constraint
def repeat_prompt(text, prompt: str) -> bool:
    return text.strip().lower().startswith(prompt.strip().lower())


_SCRIPTS = {"latin": ("LATIN",), "greek": ("GREEK",), "cyrillic": ("CYRILLIC",),
            "arabic": ("ARABIC",), "hebrew": ("HEBREW",), "devanagari": ("DEVANAGARI",),
            "bengali": ("BENGALI",), "thai": ("THAI",), "hangul": ("HANGUL",),
            "cjk": ("CJK", "HIRAGANA", "KATAKANA")}


@constraint
def script(text, script: str, min_fraction: float = 1.0) -> bool:
    if script == "digits":
        chars = [c for c in text if not c.isspace()]
        return bool(chars) and all("0" <= c <= "9" for c in chars)
    if script not in _SCRIPTS:
        raise InstructionError(f"script {script!r} is not one of digits, {', '.join(_SCRIPTS)}")
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return False
    ours = sum(unicodedata.name(c, "").startswith(_SCRIPTS[script]) for c in letters)
    return ours / len(letters) >= min_fraction - 1e-9


_LANGUAGE_SCRIPT = {**dict.fromkeys(("ru", "uk", "bg", "sr", "mk", "be", "kk"), "cyrillic"),
                    **dict.fromkeys(("ar", "fa", "ur", "ps"), "arabic"), "he": "hebrew",
                    **dict.fromkeys(("hi", "mr", "ne"), "devanagari"), "bn": "bengali",
                    "th": "thai", "ko": "hangul", "ja": "cjk", "zh": "cjk", "el": "greek"}

# IFEval instruction id -> (kind, {IFEval kwarg: our argument}, fixed arguments)
IFEVAL = {
    "keywords:existence": ("keywords", {"keywords": "keywords"}, {}),
    "keywords:frequency": ("keyword_frequency",
                           {"keyword": "keyword", "frequency": "n", "relation": "relation"}, {}),
    "keywords:forbidden_words": ("forbidden_words", {"forbidden_words": "words"}, {}),
    "keywords:letter_frequency": ("letter_frequency", {"letter": "letter", "let_frequency": "n",
                                                       "let_relation": "relation"}, {}),
    "language:response_language": ("script", {"language": "script"}, {"min_fraction": 0.9}),
    "length_constraints:number_sentences": ("sentences", {"num_sentences": "n",
                                                          "relation": "relation"}, {}),
    "length_constraints:number_paragraphs": ("paragraphs", {"num_paragraphs": "n"},
                                             {"separator": "***"}),
    "length_constraints:number_words": ("words", {"num_words": "n", "relation": "relation"}, {}),
    "length_constraints:nth_paragraph_first_word": (
        "nth_paragraph_first_word",
        {"num_paragraphs": "n", "nth_paragraph": "nth", "first_word": "first_word"}, {}),
    "detectable_content:number_placeholders": ("placeholders", {"num_placeholders": "n"}, {}),
    "detectable_content:postscript": ("postscript", {"postscript_marker": "marker"}, {}),
    "detectable_format:number_bullet_lists": ("bullets", {"num_bullets": "n"}, {}),
    "detectable_format:constrained_response": ("constrained_response", {}, {}),
    "detectable_format:number_highlighted_sections": ("highlights", {"num_highlights": "n"},
                                                      {}),
    "detectable_format:multiple_sections": ("sections", {"section_spliter": "splitter",
                                                         "num_sections": "n"}, {}),
    "detectable_format:json_format": ("json", {}, {}),
    "detectable_format:title": ("title", {}, {}),
    "combination:two_responses": ("two_responses", {}, {}),
    "combination:repeat_prompt": ("repeat_prompt", {"prompt_to_repeat": "prompt"}, {}),
    "startend:end_checker": ("ends_with", {"end_phrase": "phrase"}, {}),
    "startend:quotation": ("quotation", {}, {}),
    "change_case:capital_word_frequency": ("capital_words", {"capital_frequency": "n",
                                                             "capital_relation": "relation"},
                                           {}),
    "change_case:english_capital": ("uppercase", {}, {}),
    "change_case:english_lowercase": ("lowercase", {}, {}),
    "punctuation:no_comma": ("no_comma", {}, {}),
}


def constraints_of(record: dict) -> list[dict]:
    """The record's constraints as ``[{"kind": ..., **arguments}]`` (IFEval ids translated),
    each checked against its kind's arguments."""
    if "constraints" in record:
        raw = record["constraints"]
        if not isinstance(raw, list) or not raw or not all(isinstance(c, dict) for c in raw):
            raise InstructionError(f"record['constraints'] must be a non-empty list of "
                                   f"{{'kind': ..., ...}} objects, got {raw!r:.200}")
        out = [dict(c) for c in raw]
    elif "instruction_id_list" in record:
        ids, kwargs = record["instruction_id_list"], record.get("kwargs") or [{}] * len(
            record["instruction_id_list"])
        if not isinstance(ids, list) or not ids or len(kwargs) != len(ids):
            raise InstructionError("IFEval records need instruction_id_list and kwargs of the "
                                   "same length")
        out = [_from_ifeval(i, k or {}, record) for i, k in zip(ids, kwargs)]
    else:
        raise InstructionError(f"reward 'ifeval' needs record['constraints'] (or IFEval's "
                               f"instruction_id_list + kwargs); the record has {sorted(record)}")
    for c in out:
        _check_args(c)
    return out


def _from_ifeval(iid: str, kwargs: dict, record: dict) -> dict:
    if iid not in IFEVAL:
        raise InstructionError(f"unknown IFEval instruction {iid!r}; known: "
                               f"{', '.join(sorted(IFEVAL))}")
    kind, names, fixed = IFEVAL[iid]
    c = {"kind": kind, **fixed}
    for k, v in kwargs.items():
        if v is None:
            continue
        if k not in names:
            raise InstructionError(f"IFEval instruction {iid!r}: unexpected argument {k!r}")
        c[names[k]] = v
    if kind == "script":
        c["script"] = _LANGUAGE_SCRIPT.get(c.get("script"), "latin")
    return c


def _check_args(c: dict) -> None:
    kind = c.get("kind")
    if kind not in CONSTRAINTS:
        raise InstructionError(f"unknown constraint kind {kind!r}; known: "
                               f"{', '.join(sorted(CONSTRAINTS))}")
    params = inspect.signature(CONSTRAINTS[kind]).parameters
    args = {k: v for k, v in c.items() if k != "kind"}
    unknown = sorted(set(args) - (set(params) - {"text"}))
    missing = [p for p, spec in params.items() if p != "text" and
               spec.default is inspect.Parameter.empty and p not in args]
    if unknown or missing:
        raise InstructionError(f"constraint {kind!r}: " + "; ".join(
            ([f"unknown argument(s) {unknown}"] if unknown else [])
            + ([f"missing argument(s) {missing}"] if missing else []))
            + f" (takes {', '.join(p for p in params if p != 'text')})")
    if "relation" in args and args["relation"] not in RELATIONS:
        raise InstructionError(f"constraint {kind!r}: relation {args['relation']!r} is not one "
                               f"of {', '.join(RELATIONS)}")


def met(response: str, c: dict, *, loose: bool = False) -> bool:
    """Whether ``response`` meets constraint ``c`` (strict, or IFEval's loose variants)."""
    fn, args = CONSTRAINTS[c["kind"]], {k: v for k, v in c.items() if k != "kind"}
    if not loose:
        return bool(fn(response, **args))
    lines = response.split("\n")
    cuts = [response, "\n".join(lines[1:]), "\n".join(lines[:-1]), "\n".join(lines[1:-1])]
    variants = cuts + [v.replace("*", "") for v in cuts]
    return any(v.strip() and fn(v, **args) for v in variants)


def score(response: str, record: dict, *, loose: bool = False) -> float:
    """Fraction of the record's constraints ``response`` meets."""
    cs = constraints_of(record)
    return sum(met(response, c, loose=loose) for c in cs) / len(cs)
