"""Tokenizer and chat template, from a GGUF file's metadata or a Hugging Face folder.

The BPE itself is the ``tokenizers`` library (Rust): from GGUF it is rebuilt as GPT-2 style
byte-level BPE from ``tokenizer.ggml.tokens`` and ``merges``, control tokens added as special.
The chat template is the model's own jinja, rendered in a sandbox the way HF renders it.
"""

from __future__ import annotations

import codecs
import json
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _RustTokenizer

# Tokens that end a chat turn; added to the stop set when the template writes them.
CHAT_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}


class TokenizerError(ValueError):
    """The tokenizer or its chat template cannot be loaded or used; the message says why."""


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's printable spelling of bytes, inverted: char -> byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    """Split text the way llama.cpp does for this ``tokenizer.ggml.pre``."""
    if pre in _SPLITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if pre == "smollm":  # digits one by one, then GPT-2 (as SmolLM's own tokenizer.json)
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def _rust_from_gguf(md: dict[str, Any]) -> _RustTokenizer:
    """Byte-level BPE (GPT-2 style) from ``tokenizer.ggml.*``, as transformers builds it from GGUF."""
    if (model := md.get("tokenizer.ggml.model")) != "gpt2":
        raise TokenizerError(f"unsupported GGUF tokenizer model {model!r}; supported: gpt2 (byte-level BPE)")
    alphabet = _byte_alphabet()
    tokens: list[str] = md["tokenizer.ggml.tokens"]
    spelled = [set(t) <= alphabet.keys() for t in tokens]  # written in the byte alphabet
    # A token spelled outside the byte alphabet (a raw added token) is respelled, as HF does.
    spelling = {b: c for c, b in alphabet.items()}
    vocab = {t if ok else "".join(spelling[b] for b in t.encode()): i for i, (t, ok) in enumerate(zip(tokens, spelled))}
    merges = [tuple(m.split(" ", 1)) for m in md.get("tokenizer.ggml.merges", [])]
    tok = _RustTokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=False))
    tok.pre_tokenizer = _pre_tokenizer(md.get("tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    types = md.get("tokenizer.ggml.token_type") or [0] * len(tokens)
    # Control tokens (<|im_start|>) are special; user-defined ones (<think>) are matched whole, not special.
    added = [(t, k) for t, k, ok in zip(tokens, types, spelled) if ok and k in (_CONTROL, _USER_DEFINED)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in added if k == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in added if k == _USER_DEFINED])
    bos = md.get("tokenizer.ggml.bos_token_id")
    if md.get("tokenizer.ggml.add_bos_token") and bos is not None:
        b = tokens[bos]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{b} $A", pair=f"{b} $A $B", special_tokens=[(b, bos)]
        )
    return tok


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or ``{"content": ...}``."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    """Text <-> token ids, plus the model's chat template and its stop tokens."""

    def __init__(self, rust: _RustTokenizer, *, name: str, chat_template: str | None,
                 bos_token: str | None, eos_token: str, extra_eos_ids: tuple[int, ...] = ()) -> None:
        self._tok, self.name, self.chat_template = rust, name, chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        eos = rust.token_to_id(eos_token) if eos_token is not None else None
        if eos is None:
            raise TokenizerError(f"{name}: eos token {eos_token!r} is not in the vocabulary")
        self._eos = eos
        ends = {rust.token_to_id(t) for t in CHAT_END_TOKENS if chat_template and t in chat_template}
        self._eos_ids = frozenset({eos, *extra_eos_ids, *ends} - {None})

    # -- loading ----------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load from a ``.gguf`` file or a HF folder (tokenizer.json + tokenizer_config.json)."""
        p = Path(path)
        if p.is_dir():
            return cls._from_hf(p)
        if not p.is_file():
            raise TokenizerError(f"tokenizer not found: {p} (give a .gguf file or a Hugging Face folder)")
        from kvbridge.engine.model_files import WeightsError, read_gguf

        try:
            md = read_gguf(p).metadata
        except WeightsError as e:
            raise TokenizerError(str(e)) from None
        if "tokenizer.ggml.tokens" not in md:
            raise TokenizerError(f"{p}: no tokenizer in the GGUF metadata")
        tokens, get = md["tokenizer.ggml.tokens"], md.get
        bos, eos = get("tokenizer.ggml.bos_token_id"), get("tokenizer.ggml.eos_token_id")
        if eos is None:
            raise TokenizerError(f"{p}: the GGUF metadata names no eos token")
        extra = tuple(i for k in ("eot", "eom") if (i := get(f"tokenizer.ggml.{k}_token_id")) is not None)
        return cls(_rust_from_gguf(md), name=p.name.removesuffix(".gguf"), chat_template=get("tokenizer.chat_template"),
                   bos_token=tokens[bos] if bos is not None else None, eos_token=tokens[eos], extra_eos_ids=extra)

    @classmethod
    def _from_hf(cls, folder: Path) -> Tokenizer:
        files = {n: folder / n for n in ("tokenizer.json", "tokenizer_config.json")}
        for n, f in files.items():
            if not f.is_file():
                raise TokenizerError(f"{folder}: {n} not found")
        cfg = json.loads(files["tokenizer_config.json"].read_text())
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        gen = folder / "generation_config.json"
        gen_eos = json.loads(gen.read_text()).get("eos_token_id") if gen.is_file() else None
        extra = tuple(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        return cls(_RustTokenizer.from_file(str(files["tokenizer.json"])), name=folder.resolve().name,
                   chat_template=template, bos_token=_token_text(cfg.get("bos_token")),
                   eos_token=_token_text(cfg.get("eos_token")), extra_eos_ids=extra)

    # -- properties -------------------------------------------------------------------------

    @property
    def eos_token_id(self) -> int:
        """The id of the EOS token the model was configured with."""
        return self._eos

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Every id that ends generation: EOS plus the chat template's end-of-turn token."""
        return self._eos_ids

    @property
    def bos_token_id(self) -> int | None:
        return self._tok.token_to_id(self.bos_token) if self.bos_token else None

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    # -- text -------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; special-token text (``<|im_start|>``) becomes its id."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (invalid UTF-8 becomes U+FFFD)."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The prompt text for ``messages`` (dicts with ``role`` and ``content``), as HF renders it."""
        if not self.chat_template:
            raise TokenizerError(f"{self.name}: the model has no chat template")
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token, **kwargs)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"{self.name}: chat template failed: {e}") from None

    @cached_property
    def _template(self) -> jinja2.Template:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])

        def raise_exception(message: str) -> None:
            raise jinja2.TemplateError(message)

        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, separators=None, sort_keys=False: json.dumps(
            x, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.chat_template)

    # -- streaming --------------------------------------------------------------------------

    def detokenizer(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        """A fresh streaming decoder for one sequence."""
        return IncrementalDetokenizer(self, skip_special_tokens)

    @cached_property
    def _token_bytes(self) -> list[bytes] | None:
        """id -> bytes for byte-level vocabularies (None for other decoders)."""
        if not isinstance(self._tok.decoder, decoders.ByteLevel):
            return None
        alphabet = _byte_alphabet()
        to_latin1 = {ord(c): b for c, b in alphabet.items()}  # each char -> the byte it spells
        out = [b""] * self.vocab_size
        for token, i in self._tok.get_vocab(with_added_tokens=True).items():
            ok = set(token) <= alphabet.keys()
            out[i] = token.translate(to_latin1).encode("latin-1") if ok else token.encode()
        return out

    @cached_property
    def _special_ids(self) -> frozenset[int]:
        return frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)


class IncrementalDetokenizer:
    """Streams text for a growing list of ids; the deltas concatenate to ``decode(all ids)``.

    Bytes of a character split across tokens are held back until the character is complete.
    Call ``flush()`` at the end to get any held-back remainder (as U+FFFD when incomplete).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer, self._skip = tokenizer, skip_special_tokens
        self._table, self._special = tokenizer._token_bytes, tokenizer._special_ids
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []
        self._emitted = ""

    def add(self, token_ids: list[int]) -> str:
        """Append ``token_ids``; return the text they complete (may be empty)."""
        if self._table is not None:  # byte-level: exact and O(new tokens)
            data = b"".join(self._table[i] for i in token_ids if not (self._skip and i in self._special))
            return self._utf8.decode(data)
        self._ids.extend(token_ids)  # generic: re-decode, hold back a trailing U+FFFD
        text = self._tokenizer.decode(self._ids, self._skip)
        if text.endswith("\ufffd") or not text.startswith(self._emitted):
            return ""
        delta, self._emitted = text[len(self._emitted):], text
        return delta

    def flush(self) -> str:
        """Whatever is still held back (incomplete bytes become U+FFFD)."""
        if self._table is not None:
            return self._utf8.decode(b"", final=True)
        text = self._tokenizer.decode(self._ids, self._skip)
        delta, self._emitted = text[len(self._emitted):], text
        return delta
