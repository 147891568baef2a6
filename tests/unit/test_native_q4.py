"""A decode step's products on GGUF Q4_1 codes (native/linear_q4.c, models/quantized.py): the
codes rebuild exactly the packed bfloat16 tiles, and a few rows on them get the bits they get
on the bfloat16 weights."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType

from kvbridge.engine import native
from kvbridge.engine.models.packed import NativeLinear
from kvbridge.engine.weights import dequantize

KERNEL = native.load().linear
LIB = native.load().lib
AMX_ON = KERNEL.available == 2


def q4_1(n: int, k: int, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """Random Q4_1 blocks of an (n, k) weight (one row of blocks per output) with some edge
    scales and minimums (zero, -0, float16 subnormals, negative), and the loader's bfloat16
    weight made from them."""
    rng = np.random.default_rng(seed)
    nb = n * k // 32
    d = (rng.standard_normal(nb) * 0.01).astype(np.float16)
    m = (rng.standard_normal(nb) * 0.05).astype(np.float16)
    d[:4] = [0.0, -0.0, 6e-8, -3e-6]
    m[2:6] = [0.0, -1e-7, -0.0, 2e-5]
    qs = rng.integers(0, 256, (nb, 16), dtype=np.uint8)
    blocks = np.concatenate([d.view(np.uint8).reshape(nb, 2), m.view(np.uint8).reshape(nb, 2), qs], axis=1)
    w = dequantize(blocks.reshape(-1), GGMLQuantizationType.Q4_1, (n, k))
    return blocks.reshape(n, -1), torch.from_numpy(w).bfloat16()


def packed_codes(blocks: np.ndarray, n: int, k: int) -> torch.Tensor:
    q4 = torch.empty(LIB.q4_1_packed_bytes(n, k), dtype=torch.uint8)
    native.pack_q4_1(LIB, blocks, n, k, q4)
    return q4


@pytest.mark.parametrize(("n", "k"), [(40, 96), (64, 576)])
def test_the_codes_rebuild_every_packed_tile_exactly_and_the_check_sees_a_changed_code(n, k):
    """40 outputs: the last block of 16 is padded (weight 0 from d = m = 0, as linear.c pads)."""
    blocks, w = q4_1(n, k)
    packed = native.pack_linear_weight(w)
    tiles = -(-n // 16) * (k // 32)
    q4 = packed_codes(blocks, n, k)
    matches = LIB.q4_1_matches(q4.data_ptr(), packed.data_ptr(), n, k)
    if not KERNEL.available:  # no AVX512-BF16: it cannot rebuild tiles, so none counts as equal
        assert matches == tiles
        return
    assert matches == 0
    changed = blocks.copy()
    changed[5, 20 + 4 + 3] ^= 0x10  # output 5, second block of 32 inputs: one code, input 32 + 19
    q4 = packed_codes(changed, n, k)
    assert LIB.q4_1_matches(q4.data_ptr(), packed.data_ptr(), n, k) == 1


def test_a_few_rows_on_the_codes_get_the_bits_of_the_bfloat16_weights():
    """Up to 32 rows run on the codes where the tiles are AMX (one or two row tiles, a pair of
    output blocks and a lone last one); more rows, and CPUs without AMX, run on the bfloat16
    weights. Either way a row's bits are those of the bfloat16 weights, with the bias too."""
    n, k = 40, 96
    blocks, w = q4_1(n, k, seed=1)
    b = torch.randn(n, generator=torch.Generator().manual_seed(1)).bfloat16()
    plain = NativeLinear(w, b, KERNEL)
    coded = NativeLinear(w, b, KERNEL)
    coded.q4 = packed_codes(blocks, n, k)
    x = torch.randn(40, k, generator=torch.Generator().manual_seed(2)).bfloat16()
    if not KERNEL.available:  # no AVX512-BF16: the engine never runs native products there
        with pytest.raises(ValueError, match="cannot run"):
            coded(x)
        return
    y = torch.empty(16, n, dtype=torch.bfloat16)
    rc = LIB.linear_q4_1_amx(x.data_ptr(), coded.q4.data_ptr(), coded.bias.data_ptr(), y.data_ptr(), 16, n, k, ctypes.c_int(2))
    assert rc == (0 if AMX_ON else 2)  # the codes' kernel runs only on AMX tiles
    if AMX_ON:
        assert torch.equal(y, plain(x[:16]))
    for m in (1, 2, 15, 16, 17, 31, 32, 33, 40):
        assert torch.equal(coded(x[:m]), plain(x[:m])), m


def test_codes_of_another_shape_are_refused():
    blocks, _ = q4_1(32, 64)
    with pytest.raises(ValueError, match="Q4_1 codes of a 32x96 weight"):
        native.pack_q4_1(LIB, blocks, 32, 96, torch.empty(LIB.q4_1_packed_bytes(32, 96), dtype=torch.uint8))
