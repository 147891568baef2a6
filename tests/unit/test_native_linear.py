"""The native linear kernel (bfloat16, CPU): its arithmetic, batch invariance and its rules."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvbridge.config import ConfigError, EngineConfig
from kvbridge.engine import native
from kvbridge.engine.engine import resolve_linear
from kvbridge.engine.models.packed import NativeLinear, native_linears

KERNEL = native.load().linear
LIB = native.load().lib
AMX_ON = KERNEL.available == 2  # as the library was loaded: AMX tiles where the CPU has them


@pytest.fixture(params=["avx512", "amx"])
def tiles(request):
    """Each test below runs with linear.c's AVX512-BF16 tiles and with linear_amx.c's AMX tiles
    (on a CPU without AMX, turning them on must say no, and the AVX512-BF16 tiles run twice)."""
    on = LIB.linear_bf16_use_amx(request.param == "amx")
    assert on == (request.param == "amx" and AMX_ON)
    yield request.param
    assert LIB.linear_bf16_use_amx(AMX_ON) == AMX_ON


def layer(n: int, k: int, bias: bool, seed: int = 0) -> tuple[NativeLinear, torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=gen) * 0.05).bfloat16()
    b = torch.randn(n, generator=gen).bfloat16() if bias else None
    return NativeLinear(w, b, KERNEL), w, b


def refused_here(lin: NativeLinear, x: torch.Tensor) -> bool:
    """A CPU without AVX512-BF16 (the engine never uses the kernel there): it must refuse."""
    if KERNEL.available:
        return False
    with pytest.raises(ValueError, match="cannot run"):
        lin(x)
    return True


@pytest.mark.parametrize(("n", "k", "bias"), [(1152, 576, False), (40, 96, True), (576, 1536, False)])
def test_float32_sums_rounded_once(n, k, bias, tiles):
    """float32 accumulation of exact bf16 products, one rounding: within one bfloat16 step
    (plus the float32 sum's own error) of the float64 value, and nearly always equal to
    torch's float32 product rounded."""
    lin, w, b = layer(n, k, bias)
    x = torch.randn(40, k, generator=torch.Generator().manual_seed(1)).bfloat16()
    if refused_here(lin, x):
        return
    y = lin(x)
    ref = x.double() @ w.double().T + (b.double() if b is not None else 0)
    bound = ref.abs() * 2**-8 + (x.double().abs() @ w.double().abs().T) * k * 2**-24
    assert ((y.double() - ref).abs() <= bound).all()
    f32 = (x.float() @ w.float().T + (b.float() if b is not None else 0)).bfloat16()
    assert (y == f32).float().mean() > 0.999


@pytest.mark.parametrize(("n", "k", "bias"), [(1152, 576, False), (40, 96, True), (200, 64, True), (24, 80, True)])
def test_a_row_gives_the_same_bits_in_any_batch(n, k, bias, tiles):
    """Every tile (4x4 up to 4 rows, 8x4 up to 8 and again for rows 9-16, 6x4 beyond), each in its full-tile copy
    and its copy for fewer rows, and the masked last block of outputs (40, 200: not multiples of 16) sum each
    output in the same order; so do the AMX tiles (16 or 32 rows, one or two blocks of outputs, any rows), and a
    layer whose inputs are not a multiple of 32 (80) keeps the AVX512-BF16 tiles for every batch."""
    lin, _, _ = layer(n, k, bias)
    x = torch.randn(40, k, generator=torch.Generator().manual_seed(2)).bfloat16()
    if refused_here(lin, x):
        return
    whole = lin(x)
    for m in (1, 2, 3, 4, 5, 8, 9, 12, 13, 16, 17, 25):
        assert torch.equal(lin(x[:m]), whole[:m]), m
    for i in range(40):
        assert torch.equal(lin(x[i : i + 1])[0], whole[i]), i


def test_a_model_s_weights_are_packed_side_by_side_into_one_region_with_the_same_bits():
    """native_linears packs every layer's weights into one (huge-page) region, in the order the
    layers run, each 64-byte aligned; products equal those of weights packed on their own."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(576, 96, True), (1152, 576, False), (40, 1152, True)]  # (out, in, bias), a chain
    model = torch.nn.Sequential(*(torch.nn.Linear(k, n, bias=b).bfloat16() for n, k, b in shapes))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    alone = [NativeLinear(m.weight, m.bias, KERNEL) for m in model]
    count, _ = native_linears(model, KERNEL)
    assert count == 3 and all(isinstance(m, NativeLinear) for m in model)
    addresses = [m.packed.data_ptr() for m in model]
    assert all(a % 64 == 0 for a in addresses) and addresses == sorted(addresses)
    for m, lone in zip(model, alone):
        assert torch.equal(m.packed, lone.packed)
        assert m.packed.untyped_storage().data_ptr() == model[0].packed.untyped_storage().data_ptr()  # one region
    x = torch.randn(9, 96, generator=gen).bfloat16()
    if refused_here(alone[0], x):
        return
    y, want = x, x
    for m, lone in zip(model, alone):
        y, want = m(y), lone(want)
    assert torch.equal(y, want)


def test_rows_of_another_dtype_or_width_are_refused():
    lin, _, _ = layer(32, 16, False)
    with pytest.raises(ValueError, match="bfloat16 rows"):
        lin(torch.randn(3, 16))
    with pytest.raises(ValueError, match="packed for 16"):
        lin.kernel(torch.randn(3, 18).bfloat16(), lin.packed, None, 32)


def test_an_odd_number_of_inputs_is_refused_at_packing():
    with pytest.raises(ValueError, match="even number of inputs"):
        native.pack_linear_weight(torch.zeros(16, 7, dtype=torch.bfloat16))


def test_backend_resolution(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_linear("torch", "bfloat16", cpu, [576]) is None
    assert resolve_linear("auto", "float32", cpu, [576]) is None  # float32 keeps MKL's products
    with pytest.raises(ConfigError, match="bfloat16 on CPU"):
        resolve_linear("native", "float32", cpu, [576])
    with pytest.raises(ConfigError, match="even number of inputs"):
        resolve_linear("native", "bfloat16", cpu, [576, 7])

    real = native.load()

    def kernels(available: int) -> native.Kernels:
        return dataclasses.replace(real, linear=native.LinearKernel(real.linear.fn, available))

    monkeypatch.setattr(native, "load", lambda: kernels(1))
    assert resolve_linear("auto", "bfloat16", cpu, [576]) is not None
    monkeypatch.setattr(native, "load", lambda: kernels(2))  # AMX: native too (oneDNN's AMX rows depend on the batch)
    assert resolve_linear("auto", "bfloat16", cpu, [576]) is not None
    assert resolve_linear("native", "bfloat16", cpu, [576]) is not None
    monkeypatch.setattr(native, "load", lambda: kernels(0))
    assert resolve_linear("auto", "bfloat16", cpu, [576]) is None
    with pytest.raises(ConfigError, match="AVX512-BF16"):
        resolve_linear("native", "bfloat16", cpu, [576])


def test_an_unknown_backend_name_is_a_config_error():
    with pytest.raises(ConfigError, match="layer_backend must be one of auto, native, torch"):
        EngineConfig(layer_backend="mkl")
