"""Tokenizers: Hugging Face ``tokenizer.json`` (via ``tokenizers``) with its chat template, and
a character-level tokenizer for the built-in synthetic domains. Local files only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, Sequence


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int | None
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class HFTokenizer:
    """``tokenizer.json`` + optional ``tokenizer_config.json`` (chat template, special tokens)."""

    def __init__(self, directory: str | Path):
        from tokenizers import Tokenizer as _Tok

        d = Path(directory)
        self.directory = d  # exported models carry its files
        self._tok = _Tok.from_file(str(d / "tokenizer.json"))
        conf = {}
        if (d / "tokenizer_config.json").is_file():
            conf = json.loads((d / "tokenizer_config.json").read_text())
        self.chat_template = conf.get("chat_template")
        if (d / "chat_template.jinja").is_file():
            self.chat_template = (d / "chat_template.jinja").read_text()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_token = _token_str(conf.get("eos_token"))
        self.eos_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        pad = _token_str(conf.get("pad_token"))
        self.pad_id = (self._tok.token_to_id(pad) if pad else None) or (self.eos_id or 0)
        unk = _token_str(conf.get("unk_token")) or getattr(self._tok.model, "unk_token", None)
        self.unk_id = self._tok.token_to_id(unk) if unk else None  # byte-level BPE: none

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render chat ``messages`` with the checkpoint's Jinja template (as transformers does)."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat_template; pass plain-text prompts")
        import jinja2.sandbox

        def raise_exception(msg):
            raise jinja2.exceptions.TemplateError(msg)

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            eos_token=self.eos_token or "")


def _token_str(tok) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


class CharTokenizer:
    """One id per character of a fixed alphabet; id 0 = pad, 1 = eos, 2 = unknown."""

    PAD, EOS, UNK = 0, 1, 2

    def __init__(self, alphabet: str, vocab_size: int | None = None):
        self.alphabet = alphabet
        self._ids = {c: i + 3 for i, c in enumerate(alphabet)}
        self.vocab_size = vocab_size or len(alphabet) + 3
        if self.vocab_size < len(alphabet) + 3:
            raise ValueError(f"vocab_size {self.vocab_size} < alphabet size + 3 specials")
        self.eos_id, self.pad_id, self.unk_id = self.EOS, self.PAD, self.UNK

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(c, self.UNK) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == self.EOS:
                break
            if i >= 3 and i - 3 < len(self.alphabet):
                out.append(self.alphabet[i - 3])
        return "".join(out)


def load_tokenizer(directory: str | Path) -> Tokenizer | None:
    """The tokenizer stored beside a model, or None when the directory has none."""
    d = Path(directory)
    if (d / "tokenizer.json").is_file():
        return HFTokenizer(d)
    if (d / "char_tokenizer.json").is_file():
        conf = json.loads((d / "char_tokenizer.json").read_text())
        return CharTokenizer(conf["alphabet"], conf.get("vocab_size"))
    return None
