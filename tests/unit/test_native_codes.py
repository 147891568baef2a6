"""A decode step's products on GGUF codes (native/linear_codes.c, models/quantized.py): the
codes rebuild exactly the packed bfloat16 tiles, and a few rows on them get the bits they get
on the bfloat16 weights."""

from __future__ import annotations

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
KINDS = ["Q4_1", "Q8_0"]


def blocks_of(kind: str, n: int, k: int, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """Random GGUF blocks of an (n, k) weight (one row of blocks per output) with some edge
    scales and minimums (zero, -0, float16 subnormals, negative), and the loader's bfloat16
    weight made from them."""
    rng = np.random.default_rng(seed)
    nb = n * k // 32
    d = (rng.standard_normal(nb) * 0.01).astype(np.float16)
    d[:4] = [0.0, -0.0, 6e-8, -3e-6]
    parts = [d.view(np.uint8).reshape(nb, 2)]
    if kind == "Q4_1":
        m = (rng.standard_normal(nb) * 0.05).astype(np.float16)
        m[2:6] = [0.0, -1e-7, -0.0, 2e-5]
        parts += [m.view(np.uint8).reshape(nb, 2), rng.integers(0, 256, (nb, 16), dtype=np.uint8)]
    else:
        parts.append(rng.integers(0, 256, (nb, 32), dtype=np.uint8))  # int8 codes, -128..127
    blocks = np.concatenate(parts, axis=1)
    w = dequantize(blocks.reshape(-1), GGMLQuantizationType[kind], (n, k))
    return blocks.reshape(n, -1), torch.from_numpy(w).bfloat16()


def packed_codes(kind: str, blocks: np.ndarray, n: int, k: int) -> torch.Tensor:
    ggml = native.CODE_KINDS[kind]
    codes = torch.empty(LIB.codes_packed_bytes(ggml, n, k), dtype=torch.uint8)
    native.pack_codes(LIB, ggml, blocks, n, k, codes)
    return codes


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("n", "k"), [(40, 96), (64, 576)])
def test_the_codes_rebuild_every_packed_tile_exactly_and_the_check_sees_a_changed_code(kind, n, k):
    """40 outputs: the last block of 16 is padded (weight 0 from d = m = 0, as linear.c pads)."""
    blocks, w = blocks_of(kind, n, k)
    packed = native.pack_linear_weight(w)
    tiles = -(-n // 16) * (k // 32)
    codes = packed_codes(kind, blocks, n, k)
    matches = LIB.codes_matches(native.CODE_KINDS[kind], codes.data_ptr(), packed.data_ptr(), n, k)
    if not KERNEL.available:  # no AVX512-BF16: it cannot rebuild tiles, so none counts as equal
        assert matches == tiles
        return
    assert matches == 0
    changed = blocks.copy()
    per_block = blocks.shape[1] // (k // 32)
    changed[5, per_block + per_block - 13] ^= 0x10  # output 5, second block of 32 inputs: one code
    codes = packed_codes(kind, changed, n, k)
    assert LIB.codes_matches(native.CODE_KINDS[kind], codes.data_ptr(), packed.data_ptr(), n, k) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_a_few_rows_on_the_codes_get_the_bits_of_the_bfloat16_weights(kind):
    """Up to 32 rows run on the codes where the tiles are AMX (one or two row tiles, a pair of
    output blocks and a lone last one); more rows, and CPUs without AMX, run on the bfloat16
    weights. Either way a row's bits are those of the bfloat16 weights, with the bias too."""
    n, k = 40, 96
    blocks, w = blocks_of(kind, n, k, seed=1)
    b = torch.randn(n, generator=torch.Generator().manual_seed(1)).bfloat16()
    plain = NativeLinear(w, b, KERNEL)
    coded = NativeLinear(w, b, KERNEL)
    coded.codes, coded.codes_kind = packed_codes(kind, blocks, n, k), native.CODE_KINDS[kind]
    x = torch.randn(40, k, generator=torch.Generator().manual_seed(2)).bfloat16()
    if not KERNEL.available:  # no AVX512-BF16: the engine never runs native products there
        with pytest.raises(ValueError, match="cannot run"):
            coded(x)
        return
    y = torch.empty(16, n, dtype=torch.bfloat16)
    rc = LIB.linear_codes_amx(coded.codes_kind, x.data_ptr(), coded.codes.data_ptr(), coded.bias.data_ptr(), y.data_ptr(), 16, n, k, 2)
    assert rc == (0 if AMX_ON else 2)  # the codes' kernel runs only on AMX tiles
    if AMX_ON:
        assert torch.equal(y, plain(x[:16]))
    for m in (1, 2, 15, 16, 17, 31, 32, 33, 40):
        assert torch.equal(coded(x[:m]), plain(x[:m])), m


def test_codes_of_another_shape_or_type_are_refused():
    blocks, _ = blocks_of("Q4_1", 32, 64)
    q4 = native.CODE_KINDS["Q4_1"]
    with pytest.raises(ValueError, match="of a 32x96 weight"):
        native.pack_codes(LIB, q4, blocks, 32, 96, torch.empty(LIB.codes_packed_bytes(q4, 32, 96), dtype=torch.uint8))
    with pytest.raises(ValueError, match="codes of type 2"):  # Q4_0: not taken
        native.pack_codes(LIB, 2, blocks, 32, 64, torch.empty(0, dtype=torch.uint8))
    assert LIB.codes_packed_bytes(2, 32, 64) == 0
