"""Linear layers whose weights oneDNN reordered once, at load (CPU, bfloat16).

``F.linear`` hands oneDNN the weight in its plain (out, in) layout, and oneDNN reorders it
into its blocked layout on every call: for the few rows of a decode step, that reorder costs
about as much as the product. Reordered once, the products of a decode step run 1.5-2x
faster and those of a prompt ~5-10% faster (measured on this 2-core AVX-512 VM, bfloat16:
gate|up 3072x576 at 8 rows 430 → 235 µs; the 49152x576 output head 5.8 → 2.8 ms), with
results bit-identical to ``F.linear`` (``pack_linears`` checks that before using it), except
that a single row runs as two: oneDNN's one-row kernel sums in another order, and a row must
give the same bits whatever else is in its batch.

torch exposes the two oneDNN calls as ``torch.ops.mkldnn._reorder_linear_weight`` and
``_linear_pointwise`` (what its compiler uses for frozen CPU models). Where they are
missing or differ, the model keeps ``nn.Linear``: float32 keeps it always (its products
must match transformers' bit for bit), and so do CUDA and float16 without AVX-512 FP16.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("kvbridge.engine.packed")


class PackedLinear(nn.Module):
    """``x @ weight.T + bias`` with the weight in oneDNN's blocked layout (an opaque mkldnn
    tensor, not a parameter)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] == 1:
            # oneDNN's one-row kernel sums in another order than its many-row one: at 1536
            # inputs (the default model's down projection) 1 row in ~10 came out 1 ulp apart.
            # A row must not depend on the batch it is in (disaggregated = aggregated output,
            # one request = many), so one row runs as two; the matrix kernel is as fast here.
            y = self._product(rows.expand(2, -1).contiguous())[:1]
        else:
            y = self._product(rows)
        return y.view(*lead, self.out_features)

    def _product(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")


def packing_works(dtype: torch.dtype) -> bool:
    """Whether packed products run here and equal ``F.linear``'s exactly (a small trial)."""
    if dtype == torch.float32 or not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)  # not the global generator: seeded callers keep their sequence
        weight, bias = torch.randn(80, 96, generator=gen).to(dtype), torch.randn(80, generator=gen).to(dtype)
        packed = PackedLinear(weight, bias)
        with torch.inference_mode():
            for rows in (1, 7, 33):
                x = torch.randn(rows, 96, generator=gen).to(dtype)
                if not torch.equal(packed(x), F.linear(x, weight, bias)):
                    return False
        return True
    except (RuntimeError, AttributeError) as e:  # op missing, or this CPU lacks the ISA
        log.debug("packed linear layers unavailable: %s", e)
        return False


def pack_linears(model: nn.Module, dtype: torch.dtype, device: torch.device) -> int:
    """Replace every ``nn.Linear`` of ``model`` by a ``PackedLinear`` where that is exact
    and available (CPU); returns how many were replaced."""
    if device.type != "cpu" or not packing_works(dtype):
        return 0
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, PackedLinear(child.weight, child.bias))
                count += 1
    return count
