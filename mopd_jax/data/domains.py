"""Built-in synthetic domains: the embedded default that needs no downloads.

Exactly verifiable skills over one small character alphabet, generated deterministically from a
seed. Each record is an ordinary data record (``prompt``, ``domain``, ``answer``, ``reward``),
so the built-ins go through the same pipeline, rewards and evaluation as user data.

- ``add``:  ``"add:347+8="`` -> ``"355"``     (a three-digit number plus a digit)
- ``sort``: ``"sort:52817="`` -> ``"12578"``   (4-7 digits, ascending)
- ``rev``:  ``"rev:cagfd="``  -> ``"dfgac"``   (4-7 letters a-j, reversed)
- ``if``:   ``"if:sb+o3+v4="`` -> e.g. ``"b7a1"`` (instruction following: 2-3 verifiable
  constraints, reward ``ifeval`` = the fraction met; ``answer`` is one response meeting all)

``if`` constraint codes, each a letter and an argument: ``s``/``e`` X starts/ends with X,
``t`` X contains X, ``o`` X omits X, ``v`` N exactly N characters, ``r0`` digits only. The
record's ``constraints`` say the same in the ``instructions`` kinds. ``DOMAINS`` (the demo's)
are the first three; ``BUILTIN`` adds ``if``.

Train and evaluation problems are disjoint: a problem belongs to the evaluation split when a
hash of its prompt falls in one bucket of eight, whatever seed produced it.
"""

from __future__ import annotations

import hashlib
import random

from mopd_jax.tokenizer import CharTokenizer

ALPHABET = "0123456789abcdefghij+=:dorstv"  # digits, letters a-j, operators, domain names
ALPHABET = "".join(dict.fromkeys(ALPHABET))  # de-duplicated, order kept
DOMAINS = ("add", "sort", "rev")
IF_DOMAIN = "if"
BUILTIN = DOMAINS + (IF_DOMAIN,)
LETTERS = "abcdefghij"


def tokenizer() -> CharTokenizer:
    """The character tokenizer of the built-in domains (pad 0, eos 1, unk 2)."""
    return CharTokenizer(ALPHABET)


def _if_problem(rng: random.Random) -> tuple[str, str, list[dict]]:
    """A random response first, then 2-3 constraints true of it: always satisfiable."""
    chars = "0123456789" if rng.random() < 0.25 else "0123456789" + LETTERS
    answer = "".join(rng.choice(chars) for _ in range(rng.randint(2, 7)))
    absent = [c for c in "0123456789" + LETTERS if c not in answer]
    options = {
        "s": (answer[0], {"kind": "starts_with", "phrase": answer[0]}),
        "e": (answer[-1], {"kind": "ends_with", "phrase": answer[-1]}),
        "t": (c := rng.choice(answer), {"kind": "keywords", "keywords": [c]}),
        "o": (x := rng.choice(absent),
              {"kind": "letter_frequency", "letter": x, "n": 0, "relation": "exactly"}),
        "v": (str(len(answer)), {"kind": "length_chars", "n": len(answer),
                                 "relation": "exactly"}),
    }
    if answer.isdigit():
        options["r"] = ("0", {"kind": "script", "script": "digits"})
    codes = rng.sample(sorted(options), rng.randint(2, 3))
    prompt = "if:" + "+".join(code + options[code][0] for code in codes) + "="
    return prompt, answer, [options[code][1] for code in codes]


def _problem(domain: str, rng: random.Random) -> tuple[str, str]:
    if domain == "add":
        a, b = rng.randrange(100, 1000), rng.randrange(10)
        return f"add:{a}+{b}=", str(a + b)
    if domain == "sort":
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(4, 7)))
        return f"sort:{digits}=", "".join(sorted(digits))
    if domain == "rev":
        letters = "".join(rng.choice(LETTERS) for _ in range(rng.randint(4, 7)))
        return f"rev:{letters}=", letters[::-1]
    raise ValueError(f"unknown built-in domain {domain!r}; choose from {BUILTIN}")


def is_eval_problem(prompt: str) -> bool:
    """Whether a prompt belongs to the held-out evaluation split (1 in 8, by hash)."""
    return hashlib.sha256(prompt.encode()).digest()[0] % 8 == 0


def generate(domain: str, n: int, *, seed: int = 0, split: str = "train") -> list[dict]:
    """Up to ``n`` distinct records of one built-in domain from ``split`` ('train' or 'eval').

    A domain with fewer distinct problems (``add`` has 9,000 in all: about 7,900 train /
    1,100 eval) returns all of them."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rng = random.Random(f"{domain}/{split}/{seed}")
    out, seen = [], set()
    for _ in range(200 * n + 1000):
        if domain == IF_DOMAIN:
            prompt, answer, constraints = _if_problem(rng)
            extra = {"reward": "ifeval", "constraints": constraints}
        else:
            (prompt, answer), extra = _problem(domain, rng), {"reward": "exact_match"}
        if prompt in seen or is_eval_problem(prompt) != (split == "eval"):
            continue
        seen.add(prompt)
        out.append({"prompt": prompt, "domain": domain, "answer": answer, **extra})
        if len(out) == n:
            return out
    return out


def builtin_records(domains=DOMAINS, n: int = 4096, *, seed: int = 0,
                    split: str = "train") -> dict[str, list[dict]]:
    """``{domain: records}`` for the named built-in domains."""
    return {d: generate(d, n, seed=seed, split=split) for d in domains}
