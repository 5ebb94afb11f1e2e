"""Tokenizers from local files: tokenizer.json + chat template agree with transformers."""

import json

from mopd_jax.tokenizer import CharTokenizer, HFTokenizer, load_tokenizer

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _write_tokenizer(d):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|im_start|>": 0, "<|im_end|>": 1, "[UNK]": 2}
    for w in "user assistant system hello world what is 2 + ? \n".split(" "):
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": TEMPLATE, "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
        "tokenizer_class": "PreTrainedTokenizerFast"}))


def test_hf_tokenizer_and_chat_template_match_transformers(tmp_path):
    import transformers

    _write_tokenizer(tmp_path)
    ours = load_tokenizer(tmp_path)
    assert isinstance(ours, HFTokenizer) and ours.eos_id == 1
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    msgs = [{"role": "user", "content": "what is 2 + 2 ?"}]
    text = ours.apply_chat_template(msgs)
    assert text == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ours.encode("hello world") == ref.encode("hello world", add_special_tokens=False)
    assert ours.decode(ours.encode("hello world")) == ref.decode(ref.encode(
        "hello world", add_special_tokens=False))


def test_char_tokenizer_roundtrip():
    tok = CharTokenizer("0123456789+-=", vocab_size=32)
    ids = tok.encode("12+7=19")
    assert all(3 <= i < 16 for i in ids) and tok.decode(ids + [tok.eos_id, 5]) == "12+7=19"
