"""Tokenizer: encode/decode and chat template equal to transformers' own GGUF tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvbridge.config import default_model_path
from kvbridge.engine.tokenizer import Tokenizer, TokenizerError

TEXTS = [
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "héllo wörld — ça va? naïve café ß ÆØÅ",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 😀👍🏽 family 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵",
    "def f(x):\n    return x ** 2  # square\n\n\tif x != 0: pass",
    "   leading spaces, trailing spaces   ",
    "tabs\t\tand\n\n\nnewlines\r\n and  double  spaces",
    "numbers 0 1 12 123 1234 3.14159 -42 1e10 2026-11-21 $1,000,000",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after special<repo_name>x<file_sep>",
    "I'm sure they're fine; we'll see, you've said, he'd go",
    "a" * 300,
    "Mixed: Ωmega ∑ ∫ √2 ≈ 1.414, arrows → ← ↔",
]

MESSAGES = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "Tell me a joke 😀"},
    ],
]


@pytest.fixture(scope="module")
def gguf_path() -> str:
    return default_model_path()


@pytest.fixture(scope="module")
def tok(gguf_path: str) -> Tokenizer:
    return Tokenizer.load(gguf_path)


@pytest.fixture(scope="module")
def hf_tok(gguf_path: str):
    transformers = pytest.importorskip("transformers")
    p = Path(gguf_path)
    return transformers.AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


def test_properties(tok: Tokenizer) -> None:
    assert tok.name == "SmolLM2-135M-Instruct.Q4_1"
    assert tok.vocab_size == 49152
    assert tok.bos_token_id == 1  # <|im_start|>
    assert tok.eos_token_id == 2  # <|im_end|>
    assert tok.eos_token_ids == frozenset({2})


def test_special_ids_match_hf(tok: Tokenizer, hf_tok) -> None:
    assert tok.eos_token_id == hf_tok.eos_token_id
    assert tok.bos_token_id == hf_tok.bos_token_id
    assert len(hf_tok) == tok.vocab_size


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_hf(tok: Tokenizer, hf_tok, text: str) -> None:
    ids = tok.encode(text)
    assert ids == hf_tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    assert tok.decode(ids, skip_special_tokens=False) == hf_tok.decode(ids, skip_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_special_token_text_is_one_id(tok: Tokenizer) -> None:
    assert tok.encode("<|im_start|>") == [1]
    assert tok.encode("<|im_end|>") == [2]
    assert tok.decode([1, 2]) == ""


def test_add_special_tokens_matches_hf(tok: Tokenizer, hf_tok) -> None:
    # SmolLM2's GGUF says add_bos_token = false: nothing is added.
    assert tok.encode("hi", add_special_tokens=True) == hf_tok.encode("hi", add_special_tokens=True)


@pytest.mark.parametrize("messages", MESSAGES)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_hf(tok: Tokenizer, hf_tok, messages, add_generation_prompt: bool) -> None:
    ours = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs


def test_chat_template_text(tok: Tokenizer) -> None:
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.encode(prompt)[0] == 1


@pytest.mark.parametrize("text", TEXTS)
def test_detokenizer_one_by_one(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    d = tok.detokenizer()
    deltas = [d.add([i]) for i in ids]
    assert "".join(deltas) + d.flush() == tok.decode(ids)
    assert all("\ufffd" not in delta for delta in deltas)  # split characters are held back


def test_detokenizer_holds_back_split_character(tok: Tokenizer) -> None:
    ids = tok.encode("😀")
    assert len(ids) > 1  # one emoji, several byte tokens
    d = tok.detokenizer()
    assert [d.add([i]) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert d.add(ids[-1:]) == "😀"


def test_detokenizer_chunks_and_specials(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>assistant\nSure — 日本 😀!<|im_end|>")
    for skip in (True, False):
        d = tok.detokenizer(skip_special_tokens=skip)
        out = "".join(d.add(ids[i : i + 3]) for i in range(0, len(ids), 3)) + d.flush()
        assert out == tok.decode(ids, skip_special_tokens=skip)


def test_detokenizer_incomplete_tail_flushes_replacement(tok: Tokenizer) -> None:
    ids = tok.encode("😀")[:-1]
    d = tok.detokenizer()
    assert d.add(ids) == ""
    assert d.flush() == tok.decode(ids)  # U+FFFD, as decode() gives


def test_long_text_encodes_as_transformers_does(tok: Tokenizer, hf_tok) -> None:
    # a prompt of a few thousand tokens, as the serving benchmarks send (how fast it encodes is
    # for benchmarks to print, not for a timed test)
    text = " ".join(TEXTS) * 12
    ids = tok.encode(text)
    assert len(ids) > 2000
    assert ids == hf_tok.encode(text, add_special_tokens=False)


def test_hf_folder_roundtrip(tok: Tokenizer, hf_tok, tmp_path: Path) -> None:
    hf_tok.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    folder = Tokenizer.load(tmp_path)
    assert folder.vocab_size == tok.vocab_size and folder.eos_token_id == 2 and folder.bos_token_id == 1
    assert folder.eos_token_ids == frozenset({0, 2})
    for text in TEXTS:
        ids = folder.encode(text)
        assert ids == tok.encode(text)
        d = folder.detokenizer()
        assert "".join(d.add([i]) for i in ids) + d.flush() == folder.decode(ids)
    assert folder.apply_chat_template(MESSAGES[2]) == tok.apply_chat_template(MESSAGES[2])


def test_errors(tmp_path: Path, tok: Tokenizer) -> None:
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.load(tmp_path / "nope.gguf")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(20))
    with pytest.raises(TokenizerError, match="not a GGUF"):
        Tokenizer.load(bad)
    with pytest.raises(TokenizerError, match="no chat template"):
        Tokenizer(tok._tok, name="t", chat_template=None, bos_token=None, eos_token="<|im_end|>").apply_chat_template([])
    with pytest.raises(TokenizerError, match="eos token"):
        Tokenizer(tok._tok, name="t", chat_template=None, bos_token=None, eos_token="<nope>")
    failing = "{{ raise_exception('only user roles') }}"
    with pytest.raises(TokenizerError, match="only user roles"):
        Tokenizer(tok._tok, name="t", chat_template=failing, bos_token=None, eos_token="<|im_end|>").apply_chat_template([])
