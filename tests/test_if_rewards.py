"""Instruction-following rewards (ifeval, ifeval_loose) and the built-in ``if`` domain."""

import pytest

from mopd_jax.data import domains, instructions
from mopd_jax.data.rewards import RewardError, get_reward, score_batch

# kind -> [(response, arguments, met?)]: every kind met once and missed once, at least
TABLE = {
    "words": [("one two three", {"n": 3}, True), ("one two", {"n": 3}, False),
              ("a b c d", {"n": 3, "relation": "less than"}, False),
              ("it's a cat", {"n": 4, "relation": "exactly"}, True)],
    "sentences": [("Hi. How are you? Fine!", {"n": 3, "relation": "exactly"}, True),
                  ("One sentence only.", {"n": 2}, False)],
    "paragraphs": [("First.\n\nSecond.\n\n\nThird.", {"n": 3}, True),
                   ("First.\nstill first.", {"n": 2}, False),
                   ("A\n***\nB\n***\nC", {"n": 3, "separator": "***"}, True),
                   ("A\n***\n***\nB", {"n": 2, "separator": "***"}, False)],
    "nth_paragraph_first_word": [("Intro here.\n\nSecond para.", {"n": 2, "nth": 2,
                                                                   "first_word": "second"},
                                  True),
                                 ("Intro.\n\nOther para.", {"n": 2, "nth": 2,
                                                            "first_word": "second"}, False)],
    "length_chars": [(" abcd ", {"n": 4, "relation": "exactly"}, True),
                     ("abc", {"n": 4}, False)],
    "keywords": [("The Ocean is blue", {"keywords": ["ocean", "blue"]}, True),
                 ("The sea is blue", {"keywords": ["ocean"]}, False)],
    "keyword_frequency": [("cat cat dog cat", {"keyword": "cat", "n": 3,
                                               "relation": "exactly"}, True),
                          ("cat dog", {"keyword": "cat", "n": 2}, False)],
    "forbidden_words": [("I like dogs", {"words": ["dog"]}, True),
                        ("I like a Dog", {"words": ["dog"]}, False)],
    "letter_frequency": [("banana", {"letter": "a", "n": 3, "relation": "exactly"}, True),
                         ("banana", {"letter": "z", "n": 1}, False)],
    "lowercase": [("all lower 123", {}, True), ("Not all", {}, False)],
    "uppercase": [("ALL UPPER 1", {}, True), ("ALMOST all", {}, False)],
    "capital_words": [("NASA and ESA met", {"n": 2}, True),
                      ("NASA met", {"n": 2}, False)],
    "json": [('{"a": [1, 2]}', {}, True), ('```json\n{"a": 1}\n```', {}, True),
             ("{'a': 1}", {}, False)],
    "bullets": [("* one\n* two\n- three", {"n": 3}, True),
                ("* one\n** bold", {"n": 2}, False)],
    "highlights": [("This is *important* and *key*.", {"n": 2}, True),
                   ("No highlights **", {"n": 1}, False)],
    "sections": [("Section 1\nintro\nSection 2\nbody", {"n": 2}, True),
                 ("SECTION X only", {"n": 1, "splitter": "SECTION"}, False)],
    "title": [("<<My Poem>>\nroses", {}, True), ("<< >> untitled", {}, False)],
    "starts_with": [("  Hello world", {"phrase": "hello"}, True),
                    ("Say hello", {"phrase": "hello"}, False)],
    "ends_with": [("Any other questions?  ", {"phrase": "Any other questions?"}, True),
                  ("Questions? No.", {"phrase": "questions?"}, False)],
    "quotation": [('"wrapped in quotes"', {}, True), ('"open only', {}, False)],
    "no_comma": [("no commas here", {}, True), ("one, two", {}, False)],
    "placeholders": [("Send to [name] at [address]", {"n": 2}, True),
                     ("Send to [name]", {"n": 2}, False)],
    "postscript": [("Body.\nP.S. see you", {}, True),
                   ("Body.\nPPS no", {"marker": "P.S."}, False)],
    "constrained_response": [("Hmm. My answer is maybe.", {}, True),
                             ("My answer is perhaps.", {}, False)],
    "two_responses": [("First take.\n******\nSecond take.", {}, True),
                      ("Same.\n******\nSame.", {}, False)],
    "repeat_prompt": [("Write a haiku. Here it is", {"prompt": "Write a haiku."}, True),
                      ("Here: Write a haiku.", {"prompt": "Write a haiku."}, False)],
    "script": [("Привет, мир", {"script": "cyrillic"}, True),
               ("Привет, world", {"script": "cyrillic"}, False),
               ("Привет, мир, ok", {"script": "cyrillic", "min_fraction": 0.8}, True),
               ("こんにちは世界", {"script": "cjk"}, True),
               ("Ελληνικά", {"script": "greek"}, True),
               ("12 34", {"script": "digits"}, True), ("12a", {"script": "digits"}, False)],
}


def test_every_kind_is_tabled():
    assert sorted(TABLE) == sorted(instructions.CONSTRAINTS)


@pytest.mark.parametrize("kind", sorted(TABLE))
def test_constraint_kind(kind):
    for response, args, expected in TABLE[kind]:
        c = {"kind": kind, **args}
        assert instructions.met(response, c) is expected, (kind, response, args)
        record = {"reward": "ifeval", "constraints": [c]}
        assert get_reward("ifeval")(response, record) == float(expected)


def test_fraction_met_strict_and_loose():
    record = {"constraints": [{"kind": "starts_with", "phrase": "dear"},
                              {"kind": "lowercase"}, {"kind": "words", "n": 3,
                                                      "relation": "at most"}]}
    assert get_reward("ifeval")("dear all, hi", record) == 1.0
    assert get_reward("ifeval")("Dear All, hello there friends", record) == pytest.approx(1 / 3)
    # loose (IFEval): a preamble line or markdown stars do not count against the response
    wrapped = "Sure! Here it is:\ndear *all*"
    assert get_reward("ifeval")(wrapped, record) == 0.0
    assert get_reward("ifeval_loose")(wrapped, record) == 1.0
    scores = score_batch(["dear x", "no"], [dict(record, reward="ifeval")] * 2)
    assert list(scores) == [1.0, pytest.approx(2 / 3)]


def test_ifeval_format_records():
    """Google's IFEval records: instruction_id_list + kwargs (HF copy: unused kwargs null)."""
    record = {"prompt": "p", "domain": "if", "reward": "ifeval",
              "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words",
                                      "language:response_language", "startend:end_checker"],
              "kwargs": [{"num_words": None}, {"relation": "less than", "num_words": 6},
                         {"language": "ru"}, {"end_phrase": "Конец."}]}
    assert get_reward("ifeval")("Коротко и ясно. Конец.", record) == 1.0
    assert get_reward("ifeval")("Short, English, and much too long for it.", record) == 0.0
    cs = instructions.constraints_of(record)
    assert cs[2] == {"kind": "script", "min_fraction": 0.9, "script": "cyrillic"}


@pytest.mark.parametrize("record, message", [
    ({"constraints": [{"kind": "haiku"}]}, "unknown constraint kind 'haiku'"),
    ({"constraints": [{"kind": "words"}]}, "missing argument"),
    ({"constraints": [{"kind": "words", "n": 3, "count": 2}]}, "unknown argument"),
    ({"constraints": [{"kind": "words", "n": 3, "relation": "about"}]}, "relation 'about'"),
    ({"constraints": []}, "non-empty list"),
    ({"instruction_id_list": ["detectable_format:haiku"], "kwargs": [{}]},
     "unknown IFEval instruction"),
    ({"instruction_id_list": ["punctuation:no_comma"], "kwargs": [{"x": 1}]},
     "unexpected argument 'x'"),
    ({"prompt": "p"}, "needs record\\['constraints'\\]"),
])
def test_bad_constraints(record, message):
    with pytest.raises(RewardError, match=message):
        get_reward("ifeval")("text", record)


def test_builtin_if_domain():
    train = domains.generate("if", 2000)
    evals = domains.generate("if", 300, split="eval")
    assert len(train) == 2000 and len(evals) == 300
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evals}
    tok = domains.tokenizer()
    for r in train[:200] + evals[:50]:
        assert r["domain"] == "if" and r["reward"] == "ifeval"
        assert tok.decode(tok.encode(r["prompt"])) == r["prompt"]  # the built-in alphabet
        assert tok.decode(tok.encode(r["answer"])) == r["answer"]
        assert len(r["prompt"]) <= 16 and 2 <= len(r["constraints"]) <= 3
    answers = score_batch([r["answer"] for r in train], train)
    assert answers.min() == 1.0  # every prompt is satisfiable, and the answer satisfies it
    blank = score_batch(["0"] * len(train), train)
    assert 0.0 < blank.mean() < 0.5  # a fixed response meets few constraints: room to learn
    assert domains.generate("if", 5, seed=3) == domains.generate("if", 5, seed=3)
    assert domains.BUILTIN == domains.DOMAINS + ("if",) and "if" not in domains.DOMAINS


def test_builtin_if_domain_in_a_run_config():
    from mopd_jax.config import load_config
    from mopd_jax.recipes.common import load_records

    cfg = load_config(None, ["data.builtin=[if]", "data.builtin_size=64", "data.eval_size=8"])
    train, evals = load_records(cfg)
    assert len(train["if"]) == 64 and len(evals["if"]) == 8
