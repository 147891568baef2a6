"""oneDNN-packed linear layers (engine/models/packed.py): exact, or not used at all."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvbridge.engine.models.packed import Linear, PackedLinear, pack_linears, packing_works, pad_small_batches


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 192, bias=True), nn.SiLU(), nn.Linear(192, 64, bias=False)).to(dtype)


def test_float32_keeps_torch_linear_layers():
    model = _model(torch.float32)
    assert pack_linears(model, torch.float32, torch.device("cpu")) == 0
    assert all(isinstance(m, nn.Linear) for m in (model[0], model[2]))


def test_bfloat16_packed_layers_give_the_same_bits_or_are_not_used():
    model = _model(torch.bfloat16)
    x = torch.randn(37, 64).to(torch.bfloat16)
    with torch.inference_mode():
        before = model(x)
    count = pack_linears(model, torch.bfloat16, torch.device("cpu"))
    if packing_works(torch.bfloat16):
        assert count == 2 and isinstance(model[0], PackedLinear) and isinstance(model[2], PackedLinear)
    else:
        assert count == 0 and isinstance(model[0], nn.Linear)
    with torch.inference_mode():
        for rows in (1, 8, 37):
            assert torch.equal(model(x[:rows]), before[:rows])


def test_packed_linear_keeps_leading_dimensions():
    if not packing_works(torch.bfloat16):
        assert pack_linears(_model(torch.bfloat16), torch.bfloat16, torch.device("cpu")) == 0
        return
    w, b = torch.randn(48, 32).to(torch.bfloat16), torch.randn(48).to(torch.bfloat16)
    x = torch.randn(2, 5, 32).to(torch.bfloat16)
    with torch.inference_mode():
        y = PackedLinear(w, b)(x)
    assert y.shape == (2, 5, 48)
    assert torch.equal(y, F.linear(x, w, b))


def test_a_row_gives_the_same_bits_alone_and_in_a_batch():
    """oneDNN's one-row kernel sums in another order than its many-row one (at 1536 inputs,
    ~1 row in 10 differed by an ulp); a row alone runs as two, so that a request's tokens do
    not depend on what else is in its step."""
    if not packing_works(torch.bfloat16):
        assert pack_linears(_model(torch.bfloat16), torch.bfloat16, torch.device("cpu")) == 0
        return
    gen = torch.Generator().manual_seed(1)
    w = (torch.randn(576, 1536, generator=gen) * 0.05).to(torch.bfloat16)
    x = (torch.randn(64, 1536, generator=gen) * torch.rand(64, 1, generator=gen) * 3).to(torch.bfloat16)
    linear = PackedLinear(w, None)
    with torch.inference_mode():
        batch = linear(x)
        for r in range(x.shape[0]):
            assert torch.equal(linear(x[r : r + 1]), batch[r : r + 1]), f"row {r}"


def test_float32_small_batches_pad_so_a_row_gives_the_same_bits_in_any_batch():
    """MKL multiplies fewer than 12 float32 rows with other kernels, which match larger batches
    only for multiples of 4; the engine's layers pad small batches, so that a row's bits do
    not depend on its batch."""
    gen = torch.Generator().manual_seed(2)
    layer = Linear(576, 960, bias=True)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(960, 576, generator=gen) * 0.05)
        layer.bias.copy_(torch.randn(960, generator=gen))
    model = nn.Sequential(layer)
    assert pad_small_batches(model, torch.float32, torch.device("cpu")) == 1
    assert pad_small_batches(nn.Sequential(Linear(8, 8)).to(torch.bfloat16), torch.bfloat16, torch.device("cpu")) == 0  # float32 only
    assert pad_small_batches(_model(torch.float32), torch.float32, torch.device("cpu")) == 0  # plain nn.Linear layers are left alone
    x = torch.randn(16, 576, generator=gen)
    with torch.inference_mode():
        batch = layer(x)
        for rows in range(1, 16):
            for r in range(0, 16 - rows + 1, rows):
                assert torch.equal(layer(x[r : r + rows]), batch[r : r + rows]), f"{rows} rows at {r}"
        assert layer(x.view(2, 8, 576)).shape == (2, 8, 960)
