"""A decode step's products on the GGUF file's own 4-bit codes (``native/linear_q4.c``).

A decode step streams every weight from memory for its few rows. The default model's layers
are stored as Q4_1 in its GGUF (0.625 bytes a weight); the engine computes with their
bfloat16 values (2 bytes). Where the native products run on AMX tiles, each fused layer
(q|k|v, o, gate|up, down) whose parts are all Q4_1 also keeps the codes, packed once at load,
and up to 32 rows run on them: each B tile is rebuilt from the codes into exactly the packed
bfloat16 tile, so a row's bits are the same as on the bfloat16 weights (a prompt's many rows
keep those: there the tiles' arithmetic, not the memory, sets the pace). Every rebuilt tile
is compared with the packed one at load; a layer with one that differs keeps its bfloat16
weights only.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import torch
from torch import nn

from kvbridge.engine.host_memory import host_region
from kvbridge.engine.models.packed import NativeLinear
from kvbridge.engine.native import Kernels, pack_q4_1

log = logging.getLogger("kvbridge.engine.quantized")

Codes = dict[str, tuple[str, np.ndarray]]  # HF name -> (ggml type, blocks one row per output)

# each fused product and the checkpoint tensors whose rows it stacks, in order
_PARTS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}


def _stacked(codes: Codes, prefix: str, parts: tuple[str, ...]) -> np.ndarray | None:
    """The Q4_1 blocks of the fused product's rows, or None when a part is not Q4_1."""
    found = [codes.get(f"{prefix}{p}.weight") for p in parts]
    if not all(c is not None and c[0] == "Q4_1" for c in found):
        return None
    return np.concatenate([c[1] for c in found if c is not None])


def attach_q4_codes(model: nn.Module, codes: Codes, kernels: Kernels) -> int:
    """Give every ``NativeLinear`` of ``model.layers`` whose weight is all Q4_1 in ``codes``
    its packed codes (``q4``), on huge pages where granted; returns how many got them. Only
    where the products run on AMX tiles (``linear_q4.c`` needs them)."""
    if kernels.linear.available != 2 or not codes:
        return 0
    lib = kernels.lib
    chosen: list[tuple[NativeLinear, np.ndarray]] = []
    for i, layer in enumerate(model.layers):
        for name, parts in _PARTS.items():
            linear = layer.get_submodule(name)
            blocks = _stacked(codes, f"model.layers.{i}.", parts)
            if isinstance(linear, NativeLinear) and blocks is not None and linear.in_features % 32 == 0:
                chosen.append((linear, blocks))
    if not chosen:
        return 0
    sizes = [lib.q4_1_packed_bytes(m.out_features, m.in_features) for m, _ in chosen]
    spans = [-(-n // 64) * 64 for n in sizes]
    _, region = host_region(sum(spans))
    count = 0
    for (linear, blocks), at, n in zip(chosen, itertools.accumulate([0, *spans[:-1]]), sizes, strict=True):
        q4 = region[at : at + n]
        pack_q4_1(lib, blocks, linear.out_features, linear.in_features, q4)
        bad = lib.q4_1_matches(q4.data_ptr(), linear.packed.data_ptr(), linear.out_features, linear.in_features)
        if bad:  # another rounding made the bfloat16 weights: the codes would give other bits
            log.warning("a %dx%d layer's Q4_1 codes differ from its weights in %d tiles: it keeps its bfloat16 weights",
                        linear.out_features, linear.in_features, bad)  # fmt: skip
            continue
        linear.q4 = q4
        count += 1
    return count


def q4_pointer(linear: nn.Module) -> int | None:
    """The address of a product's packed codes, or None."""
    q4: torch.Tensor | None = getattr(linear, "q4", None)
    return None if q4 is None else q4.data_ptr()
