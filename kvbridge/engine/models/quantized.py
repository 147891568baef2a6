"""A decode step's products on the GGUF file's own codes (``native/linear_codes.c``).

A decode step streams every weight from memory for its few rows. The default model's layers
are stored as Q4_1 in its GGUF (0.625 bytes a weight) and its output head (the tied
embedding) as Q8_0 (1.06 bytes); the engine computes with their bfloat16 values (2 bytes).
Where the native products run on AMX tiles, each fused product (q|k|v, o, gate|up, down) whose
parts are all of one such type, and the head, also keep the codes, packed once at load, and
up to 32 rows run on them: each B tile is rebuilt from the codes into exactly the packed
bfloat16 tile, so a row's bits are the same as on the bfloat16 weights (a prompt's many rows
keep those: there the tiles' arithmetic, not the memory, sets the pace). Every rebuilt tile
is compared with the packed one at load; a product with one that differs keeps its bfloat16
weights only.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
from torch import nn

from kvbridge.engine.host_memory import host_region
from kvbridge.engine.models.packed import NativeLinear
from kvbridge.engine.native import CODE_KINDS, Kernels, pack_codes
from kvbridge.engine.weights import Codes

log = logging.getLogger("kvbridge.engine.quantized")

# each fused product of a layer and the checkpoint tensors whose rows it stacks, in order
_PARTS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}


def _stacked(codes: Codes, names: list[str]) -> tuple[int, np.ndarray] | None:
    """(ggml type id, blocks of the stacked rows) when every tensor is of one type taken, else None."""
    found = [c for name in names if (c := codes.get(name)) is not None]
    kinds = {kind for kind, _ in found}
    if len(found) != len(names) or len(kinds) != 1 or (kind := next(iter(kinds))) not in CODE_KINDS:
        return None
    return CODE_KINDS[kind], np.concatenate([blocks for _, blocks in found])


def _products(model: nn.Module, codes: Codes, tied: bool) -> list[tuple[NativeLinear, int, np.ndarray]]:
    out = []
    for i, layer in enumerate(model.layers):
        for name, parts in _PARTS.items():
            out.append((layer.get_submodule(name), _stacked(codes, [f"model.layers.{i}.{p}.weight" for p in parts])))
    out.append((model.lm_head, _stacked(codes, ["model.embed_tokens.weight" if tied else "lm_head.weight"])))
    return [(m, *found) for m, found in out if isinstance(m, NativeLinear) and found is not None and m.in_features % 32 == 0]


def attach_codes(model: nn.Module, codes: Codes, kernels: Kernels, tied: bool) -> int:
    """Give every ``NativeLinear`` of ``model`` (its layers' products, its head; ``tied``: the
    head is the embedding) whose weight is all Q4_1 or all Q8_0 in ``codes`` its packed codes,
    on huge pages where granted; returns how many got them. Only where the products run on
    AMX tiles (``linear_codes.c`` needs them)."""
    if kernels.linear.available != 2 or not codes:
        return 0
    lib = kernels.lib
    chosen = _products(model, codes, tied)
    if not chosen:
        return 0
    sizes = [lib.codes_packed_bytes(kind, m.out_features, m.in_features) for m, kind, _ in chosen]
    spans = [-(-n // 64) * 64 for n in sizes]
    _, region = host_region(sum(spans))
    count = 0
    for (linear, kind, blocks), at, n in zip(chosen, itertools.accumulate([0, *spans[:-1]]), sizes, strict=True):
        packed = region[at : at + n]
        pack_codes(lib, kind, blocks, linear.out_features, linear.in_features, packed)
        bad = lib.codes_matches(kind, packed.data_ptr(), linear.packed.data_ptr(), linear.out_features, linear.in_features)
        if bad:  # another rounding made the bfloat16 weights: the codes would give other bits
            log.warning("a %dx%d product's GGUF codes differ from its weights in %d tiles: it keeps its bfloat16 weights",
                        linear.out_features, linear.in_features, bad)  # fmt: skip
            continue
        linear.codes, linear.codes_kind = packed, kind
        count += 1
    return count
