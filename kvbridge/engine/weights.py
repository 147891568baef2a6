"""Model weights from a GGUF file or a Hugging Face safetensors folder, in Hugging Face names.

Both paths end in the same place: a ``ModelSpec`` and a dict of tensors named as in
``LlamaForCausalLM`` (``model.layers.{i}.self_attn.q_proj.weight`` …), each ``[out, in]``.

GGUF headers and specs are read by ``model_files.py`` (torch-free); tensors are dequantized
block-wise with numpy, whole tensors at once. llama.cpp permutes the rows of q and k for its
interleaved RoPE; this module undoes that, so the weights are the ones HF's rotate-half RoPE expects.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from kvbridge.engine.model_files import (  # noqa: F401  (re-exported with the loader)
    SUPPORTED_ARCHITECTURES,
    GGUFFile,
    GGUFTensorInfo,
    WeightsError,
    gguf_spec,
    hf_spec,
    read_gguf,
)
from kvbridge.engine.models.spec import ModelSpec

# -- dequantization: blocks (n_blocks, type_size) uint8 -> (n_blocks, block_size) float32 -----

def _f16(b: np.ndarray) -> np.ndarray:
    return b.view(np.float16).astype(np.float32)  # (n, 2) bytes -> (n, 1)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    # (n, 16) bytes -> (n, 32): low nibbles are elements 0..15, high nibbles 16..31
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _deq_q8_0(b: np.ndarray) -> np.ndarray:
    return _f16(b[:, :2]) * b[:, 2:].view(np.int8)


def _deq_q4_0(b: np.ndarray) -> np.ndarray:
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:]).view(np.int8) - np.int8(8))


def _deq_q4_1(b: np.ndarray) -> np.ndarray:
    return _f16(b[:, :2]) * _nibbles(b[:, 4:]) + _f16(b[:, 2:4])


def _deq_bf16(b: np.ndarray) -> np.ndarray:
    return (b.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


_OWN: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "F32": lambda b: b.view(np.float32),
    "F16": lambda b: b.view(np.float16).astype(np.float32),
    "BF16": _deq_bf16,
    "Q8_0": _deq_q8_0,
    "Q4_0": _deq_q4_0,
    "Q4_1": _deq_q4_1,
}
# Served by the gguf package's own (vectorized numpy) dequantizers.
_DELEGATED = ("Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
SUPPORTED_QUANT_TYPES = tuple(_OWN) + _DELEGATED


def quant_type(qtype: int, what: str = "tensor") -> GGMLQuantizationType:
    """The ggml type for ``qtype``, or ``WeightsError`` naming it when this loader cannot read it."""
    try:
        kind = GGMLQuantizationType(qtype)
    except ValueError:
        raise WeightsError(f"{what}: unknown ggml tensor type id {qtype}") from None
    if kind.name not in SUPPORTED_QUANT_TYPES:
        raise WeightsError(f"{what}: unsupported quantization type {kind.name}; "
                           f"supported: {', '.join(SUPPORTED_QUANT_TYPES)}")
    return kind


# load_model's ``codes``: HF name -> (ggml type name, its blocks as stored, one row per output)
Codes = dict[str, tuple[str, np.ndarray]]


def dequantize(raw: np.ndarray, qtype: int, shape: tuple[int, ...]) -> np.ndarray:
    """Dequantize the bytes of one tensor of ggml type ``qtype`` to float32 of ``shape``."""
    kind = quant_type(qtype)
    blocks = raw.reshape(-1, GGML_QUANT_SIZES[kind][1])  # (n_blocks, type_size)
    if kind.name in _OWN:
        return _OWN[kind.name](blocks).reshape(shape)
    import gguf.quants

    return gguf.quants.dequantize(blocks, kind).reshape(shape).astype(np.float32, copy=False)


def gguf_tensor(f: GGUFFile, name: str) -> np.ndarray:
    """One tensor of a GGUF file as float32 numpy, in numpy (HF) shape order."""
    raw, info = gguf_blocks(f, name)
    return dequantize(raw, info.qtype, info.shape)


def gguf_blocks(f: GGUFFile, name: str) -> tuple[np.ndarray, GGUFTensorInfo]:
    """One tensor's bytes as stored (its ggml blocks, a view of the file), and its info."""
    info = f.tensors.get(name)
    if info is None:
        raise WeightsError(f"{f.path}: missing tensor {name}")
    block, size = GGML_QUANT_SIZES[quant_type(info.qtype, f"{f.path}: tensor {name}")]
    nbytes = int(np.prod(info.shape)) // block * size
    return f.raw(info, nbytes), info


# -- names and specs --------------------------------------------------------------------------

_GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_BIAS_NAMES = {f"attn_{x}.bias": f"self_attn.{x}_proj.bias" for x in "qkv"}


def hf_tensor_names(spec: ModelSpec) -> list[str]:
    """Every tensor name ``load_model`` returns for ``spec``."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    per_layer = list(_GGUF_LAYER_NAMES.values()) + (list(_GGUF_BIAS_NAMES.values()) if spec.attention_bias else [])
    names += [f"model.layers.{i}.{n}" for i in range(spec.num_layers) for n in per_layer]
    return names + ([] if spec.tie_word_embeddings else ["lm_head.weight"])


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved -> rotate-half RoPE)."""
    # (n_head * hd, in) -> (n_head, hd/2, 2, in) -> (n_head, 2, hd/2, in)
    return w.reshape(n_head, -1, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _load_gguf(
    path: Path, dtype: torch.dtype, device: str | torch.device, codes: Codes | None = None
) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    f = read_gguf(path)
    spec = gguf_spec(f)
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    if not spec.tie_word_embeddings:
        names["output.weight"] = "lm_head.weight"
    layer_names = _GGUF_LAYER_NAMES | (_GGUF_BIAS_NAMES if spec.attention_bias else {})
    for i in range(spec.num_layers):
        names |= {f"blk.{i}.{g}": f"model.layers.{i}.{h}" for g, h in layer_names.items()}
    out = {}
    for gname, hname in names.items():
        raw, info = gguf_blocks(f, gname)
        w = dequantize(raw, info.qtype, info.shape)
        rows = raw.reshape(info.shape[0], -1) if len(info.shape) == 2 else None  # a row's blocks
        if spec.architecture == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):
            heads = spec.num_heads if "attn_q" in gname else spec.num_kv_heads
            w = _unpermute(w, heads)
            rows = _unpermute(rows, heads) if rows is not None else None
        out[hname] = torch.from_numpy(np.require(w, requirements=["C", "W"])).to(device=device, dtype=dtype)
        if codes is not None and rows is not None:
            codes[hname] = (GGMLQuantizationType(info.qtype).name, rows)
    return spec, out


# -- Hugging Face folder ----------------------------------------------------------------------

def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in files]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{folder}: no *.safetensors files")
    return files


def _load_hf(folder: Path, dtype: torch.dtype, device: str | torch.device) -> tuple[ModelSpec, dict[str, torch.Tensor]]:
    from safetensors import safe_open

    config = folder / "config.json"
    if not config.is_file():
        raise WeightsError(f"{folder}: config.json not found")
    spec = hf_spec(folder, json.loads(config.read_text()))
    wanted, out = set(hf_tensor_names(spec)), {}
    for file in _safetensors_files(folder):
        if not file.is_file():
            raise WeightsError(f"{folder}: missing shard {file.name}")
        with safe_open(str(file), framework="pt") as st:
            for name in wanted.intersection(st.keys()):
                out[name] = st.get_tensor(name).to(device=device, dtype=dtype)
    missing = [name for name in hf_tensor_names(spec) if name not in out]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(f"{folder}: missing tensor {missing[0]}{more}")
    return spec, out


def load_model(
    path: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    codes: Codes | None = None,
) -> tuple[ModelSpec, dict[str, torch.Tensor]]:  # fmt: skip
    """Load a model's spec and weights (HF Llama names, ``[out, in]``, cast to ``dtype``).

    ``path`` is a ``.gguf`` file (architectures llama, qwen2) or a Hugging Face folder with
    ``config.json`` and ``*.safetensors``. Raises ``WeightsError`` with the reason. ``codes``:
    a dict that receives, for every 2-D tensor of a GGUF file, its ggml type name and its
    blocks as stored, one row of blocks per output, rows in the order of the returned weight
    (``quantized.py`` runs a decode step's products on them).
    """
    p = Path(path)
    if p.is_dir():
        return _load_hf(p, dtype, device)
    if not p.exists():
        raise WeightsError(f"model not found: {p} (give a .gguf file or a Hugging Face folder)")
    return _load_gguf(p, dtype, device, codes)
