"""Model files' metadata, without torch: the GGUF container (header, metadata, tensor
directory over ``mmap``) and the ``ModelSpec`` of a GGUF file or a Hugging Face folder.

The tokenizer and the frontend need only this; ``weights.py`` adds the tensors.
GGUF is read with a small header parser (the ``gguf`` package's reader builds a numpy view
per metadata item, ~2 s for a 49k vocabulary).
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvbridge.engine.models.spec import ModelSpec

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


class WeightsError(ValueError):
    """The weights cannot be loaded; the message names the file, tensor or type at fault."""


# -- GGUF container ---------------------------------------------------------------------------

# GGUF metadata value types: id -> struct format (8 = string, 9 = array, below).
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NP_SCALARS = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
               6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    qtype: int  # ggml type id (GGMLQuantizationType)
    shape: tuple[int, ...]  # numpy order: (rows, cols) = (out, in) for a matrix
    offset: int  # absolute byte offset in the file


@dataclass
class GGUFFile:
    """A parsed GGUF file: metadata, tensor directory, and the mapped bytes."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]
    buffer: mmap.mmap

    def raw(self, info: GGUFTensorInfo, nbytes: int) -> np.ndarray:
        """The tensor's bytes, zero-copy, as uint8."""
        if info.offset + nbytes > len(self.buffer):
            raise WeightsError(f"{self.path}: truncated file, tensor {info.name} ends past the end")
        return np.frombuffer(self.buffer, dtype=np.uint8, count=nbytes, offset=info.offset)


class _Cursor:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("Q")
        s = self.buf[self.pos : self.pos + n].decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        if vtype == 8:
            return self.string()
        if vtype == 9:
            itype, count = self.scalar("I"), self.scalar("Q")
            if itype in _NP_SCALARS:  # numeric arrays in one read
                arr = np.frombuffer(self.buf, dtype=_NP_SCALARS[itype], count=count, offset=self.pos)
                self.pos += arr.nbytes
                return arr.tolist()
            return [self.value(itype) for _ in range(count)]
        if vtype not in _SCALARS:
            raise WeightsError(f"unknown GGUF metadata type {vtype}")
        return self.scalar(_SCALARS[vtype])


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's header (metadata and tensor directory); tensor data stays mapped."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"model file not found: {path}")
    if path.stat().st_size < 24:
        raise WeightsError(f"{path} is not a GGUF file (too short)")
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if buf[:4] != b"GGUF":
        raise WeightsError(f"{path} is not a GGUF file (bad magic)")
    try:
        return _parse_gguf(path, buf)
    except (struct.error, ValueError, IndexError) as e:
        if isinstance(e, WeightsError):
            raise
        raise WeightsError(f"{path}: truncated or corrupt GGUF header ({e})") from None


def _parse_gguf(path: Path, buf: mmap.mmap) -> GGUFFile:
    cur = _Cursor(buf)
    cur.pos = 4
    version, n_tensors, n_kv = cur.scalar("I"), cur.scalar("Q"), cur.scalar("Q")
    if version not in (2, 3):
        raise WeightsError(f"{path}: unsupported GGUF version {version} (need 2 or 3, little-endian)")
    metadata = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar("I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.scalar("Q") for _ in range(cur.scalar("I"))]
        infos.append((name, dims, cur.scalar("I"), cur.scalar("Q")))
    align = int(metadata.get("general.alignment", 32))
    start = (cur.pos + align - 1) // align * align
    tensors = {n: GGUFTensorInfo(n, t, tuple(reversed(d)), start + o) for n, d, t, o in infos}
    return GGUFFile(path, metadata, tensors, buf)


def gguf_spec(f: GGUFFile) -> ModelSpec:
    md = f.metadata
    arch = md.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(SUPPORTED_ARCHITECTURES)
        raise WeightsError(f"{f.path}: unsupported architecture {arch!r}; supported: {supported}")

    def get(key: str, default: Any = None) -> Any:
        value = md.get(f"{arch}.{key}", default)
        if value is None:
            raise WeightsError(f"{f.path}: missing metadata {arch}.{key}")
        return value

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    vocab = md.get(f"{arch}.vocab_size") or len(md.get("tokenizer.ggml.tokens", ()))
    if not vocab and "token_embd.weight" in f.tensors:
        vocab = f.tensors["token_embd.weight"].shape[0]
    return ModelSpec(
        architecture=arch, vocab_size=int(vocab), hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")), num_layers=int(get("block_count")),
        num_heads=heads, num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(get("attention.key_length", hidden // heads)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=int(get("context_length", 2048)),
        tie_word_embeddings="output.weight" not in f.tensors,
        attention_bias="blk.0.attn_q.bias" in f.tensors,
        name=f.path.name.removesuffix(".gguf"),
    )


def hf_spec(folder: Path, cfg: dict[str, Any]) -> ModelSpec:
    archs = cfg.get("architectures") or []
    arch = next((HF_ARCHITECTURES[a] for a in archs if a in HF_ARCHITECTURES), None)
    if arch is None:
        raise WeightsError(f"{folder}: unsupported architecture {archs or cfg.get('model_type')!r}; "
                           f"supported: {', '.join(HF_ARCHITECTURES)}")
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    rope = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0
    return ModelSpec(
        architecture=arch, vocab_size=cfg["vocab_size"], hidden_size=hidden,
        intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
        num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or hidden // heads, rope_theta=float(rope),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
        name=folder.resolve().name,
    )


def read_spec(path: str) -> ModelSpec:
    """The model's shape from its metadata alone (GGUF header or config.json): no weights
    are read, so a frontend can learn the context length cheaply."""
    p = Path(path)
    if p.is_dir():
        config = p / "config.json"
        if not config.is_file():
            raise WeightsError(f"{p}: config.json not found")
        return hf_spec(p, json.loads(config.read_text()))
    if not p.exists():
        raise WeightsError(f"model not found: {p} (give a .gguf file or a Hugging Face folder)")
    return gguf_spec(read_gguf(p))
