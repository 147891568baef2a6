"""Linear layers whose weights were packed once, at load (CPU, bfloat16): for oneDNN's
kernels (``PackedLinear``) or for kvbridge's own (``NativeLinear``, engine/native/linear.c).

``F.linear`` hands oneDNN the weight in its plain (out, in) layout, and oneDNN reorders it
into its blocked layout on every call: for the few rows of a decode step, that reorder costs
about as much as the product. Reordered once, the products of a decode step run 1.5-2x
faster and those of a prompt ~5-10% faster (measured on this 2-core AVX-512 VM, bfloat16:
gate|up 3072x576 at 8 rows 430 → 235 µs; the 49152x576 output head 5.8 → 2.8 ms), with
results bit-identical to ``F.linear`` (``pack_linears`` checks that before using it), except
that a single row runs as two (``pad_rows``: a row must give the same bits in any batch).

torch exposes the two oneDNN calls as ``torch.ops.mkldnn._reorder_linear_weight`` and
``_linear_pointwise`` (what its compiler uses for frozen CPU models). Where they are
missing or differ, the model keeps ``nn.Linear``: float32 keeps it always (MKL's products,
which transformers' also are), and so do CUDA and float16 without AVX-512 FP16.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from kvbridge.engine.host_memory import host_region
from kvbridge.engine.native import LinearKernel, pack_linear_weight, packed_linear_bytes

log = logging.getLogger("kvbridge.engine.packed")


def pad_rows(product, x: torch.Tensor, run_rows, in_features: int, out_features: int) -> torch.Tensor:
    """``product`` of x's rows, where n rows run as ``run_rows(n)`` (the last row repeated).

    CPU kernels multiply a few rows in another way than many, and sum in another order:
    oneDNN's bfloat16 one-row kernel (at 1536 inputs ~1 row in 10 came out 1 ulp apart) and
    MKL's float32 kernels for fewer than 12 rows, whose rows past a multiple of 4 differed in
    the last bit, every one. A row must give the same bits whatever else is in its batch:
    disaggregated output = aggregated output, one request = many, rest on it."""
    lead = x.shape[:-1]
    rows = x.reshape(-1, in_features)
    n = rows.shape[0]
    m = run_rows(n)
    if m > n:
        return product(torch.cat((rows, rows[-1:].expand(m - n, -1))))[:n].view(*lead, out_features)
    return product(rows).view(*lead, out_features)


def plain_rows(n: int) -> int:
    return n


def float32_rows(n: int) -> int:
    """MKL (AVX-512), float32: below 12 rows only multiples of 4 match larger batches."""
    return n if n >= 12 else -(-n // 4) * 4


def packed_rows(n: int) -> int:
    """oneDNN, packed bfloat16 weights: every batch but a single row matches larger ones."""
    return 2 if n == 1 else n


class Linear(nn.Linear):
    """``nn.Linear`` whose small batches run padded (see ``pad_rows``) when ``run_rows`` says
    so; the engine sets ``float32_rows`` on CPU in float32 (``pad_small_batches``)."""

    run_rows = staticmethod(plain_rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.run_rows is plain_rows:
            return super().forward(x)
        return pad_rows(super().forward, x, self.run_rows, self.in_features, self.out_features)


class PackedLinear(nn.Module):
    """``x @ weight.T + bias`` with the weight in oneDNN's blocked layout (an opaque mkldnn
    tensor, not a parameter)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pad_rows(self._product, x, packed_rows, self.in_features, self.out_features)

    def _product(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(rows, self.packed, self.bias, "none", [], "")


class NativeLinear(nn.Module):
    """``x @ weight.T + bias`` by the native kernel (bfloat16, AVX512-BF16): a decode step's
    rows share each weight load, and every row's sum runs in the same order in any batch, so
    no padding of small batches is needed. Measured on this 2-core VM, the default model's
    products for 8 rows with weights streaming from memory: 11-13.6 ms per step against
    oneDNN's 19.7-21.1; for 512 rows 349 against 304-363 GFLOP/s."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernel: LinearKernel, into: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = pack_linear_weight(weight.detach(), into)
        self.bias = None
        if bias is not None:
            self.bias = torch.zeros(self.packed.shape[0] * 16, dtype=torch.float32)
            self.bias[: self.out_features] = bias.detach().float()
        self.kernel = kernel
        self.codes: torch.Tensor | None = None  # the weight's GGUF codes, for a few rows (models/quantized.py)
        self.codes_kind = 0  # their ggml type id

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows = x.reshape(-1, self.in_features).contiguous()
        out = self.kernel(rows, self.packed, self.bias, self.out_features, self.codes, self.codes_kind)
        return out.view(*lead, self.out_features)


def replace_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> int:
    """Put ``make(layer)`` in place of every ``nn.Linear`` of ``model``; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, make(child))
                count += 1
    return count


def native_linears(model: nn.Module, kernel: LinearKernel) -> tuple[int, bool]:
    """Replace every ``nn.Linear`` of ``model`` (bfloat16) by a ``NativeLinear``; returns (how
    many, whether their weights are on huge pages).

    The packed weights go into one region (``host_region``: transparent huge pages where the
    kernel grants them), in the order the layers run, each 64-byte aligned. A decode step
    streams every weight from memory; on 4 KiB pages the hardware prefetcher stops at each
    page's end and every page costs a TLB miss (a one-core read of 268 MB: 15-16 ms on small
    pages, 11 ms on huge ones, on the test VM)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        return 0, False
    sizes = [packed_linear_bytes(*m.weight.shape) for m in linears]
    spans = [-(-n // 64) * 64 for n in sizes]
    huge, region = host_region(sum(spans))
    slots = {id(m): region[at : at + n] for m, at, n in zip(linears, itertools.accumulate([0, *spans[:-1]]), sizes)}
    return replace_linears(model, lambda m: NativeLinear(m.weight, m.bias, kernel, slots[id(m)])), huge


def packing_works(dtype: torch.dtype) -> bool:
    """Whether packed products run here and equal ``F.linear``'s exactly (a small trial)."""
    if dtype == torch.float32 or not torch.backends.mkldnn.is_available():
        return False
    try:
        gen = torch.Generator().manual_seed(0)  # not the global generator: seeded callers keep their sequence
        # a layer of the default model's size: on AMX CPUs oneDNN's packed and plain products
        # part from 33 rows at 960 x 576 (not at 80 x 96)
        weight, bias = torch.randn(960, 576, generator=gen).to(dtype), torch.randn(960, generator=gen).to(dtype)
        packed = PackedLinear(weight, bias)
        with torch.inference_mode():
            for rows in (1, 7, 33, 64, 200):
                x = torch.randn(rows, 576, generator=gen).to(dtype)
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
    return replace_linears(model, lambda m: PackedLinear(m.weight, m.bias))


def pad_small_batches(model: nn.Module, dtype: torch.dtype, device: torch.device) -> int:
    """float32 on CPU: every ``Linear`` of ``model`` pads small batches (``float32_rows``), so
    that no row depends on its batch; returns how many layers pad."""
    if device.type != "cpu" or dtype != torch.float32:
        return 0
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    for m in layers:
        m.run_rows = float32_rows
    return len(layers)
