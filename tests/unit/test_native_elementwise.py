"""The native element-wise ops (bfloat16, CPU) against torch's, and row by row."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvbridge.engine import native
from kvbridge.engine.attention import AttentionBatch, token_rows, write_kv
from kvbridge.engine.models.llama import RMSNorm, Rotary

OPS = native.load().elementwise
GEN = torch.Generator().manual_seed(0)


def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=GEN) * scale).bfloat16()


def norm_layer(d: int) -> RMSNorm:
    norm = RMSNorm(d, 1e-5)
    norm.weight.data = rand(d)
    return norm


def test_rmsnorm_matches_transformers_sequence():
    """torch's ops in transformers' order (RMSNorm.forward without ops): equal but for a sum
    of squares in another order (a bfloat16 step at most, and rarely)."""
    norm = norm_layer(576)
    x = rand(300, 576, scale=3)
    with torch.inference_mode():
        ref, out = norm(x), OPS.rmsnorm(x, norm.weight, norm.eps)
    assert (out == ref).float().mean() > 0.999
    assert ((out.float() - ref.float()).abs() <= ref.float().abs() * 2**-7).all()


def test_add_rmsnorm_gives_the_sum_and_its_norm():
    norm = norm_layer(96)
    x, a = rand(40, 96), rand(40, 96, scale=10)
    with torch.inference_mode():
        h, out = OPS.add_rmsnorm(x, a, norm.weight, norm.eps)
        assert torch.equal(h, x + a)
        assert torch.equal(out, OPS.rmsnorm(x + a, norm.weight, norm.eps))


def test_rmsnorm_is_the_arithmetic_its_kernel_states():
    """Bit for bit, elementwise.c's arithmetic written with torch: the sum of squares in 16
    float32 partial sums (a bf16 value's square is exact), added in sum16's tree; then
    bf16(w * bf16(x * r)). Rows of 576 run in AVX-512 lanes where the CPU has them, element
    by element elsewhere."""
    D = 576
    norm = norm_layer(D)
    x = rand(64, D, scale=3)
    x[0] *= 1e-20  # tiny squares, next to an eps that dominates
    x[1, ::7] = 0.0
    part = torch.zeros(x.shape[0], 16, dtype=torch.float32)
    for chunk in x.float().split(16, dim=1):
        part = part + chunk**2
    for w in (8, 4, 2, 1):
        part = part[:, :w] + part[:, w : 2 * w]
    r = 1.0 / torch.sqrt(part / D + norm.eps)
    ref = (norm.weight.float() * (x.float() * r).bfloat16().float()).bfloat16()
    out = OPS.rmsnorm(x, norm.weight, norm.eps)
    assert torch.equal(out.view(torch.int16), ref.view(torch.int16))


def test_silu_mul_matches_torch():
    gu = rand(50, 2 * 200, scale=4)
    gu[0, :8] = torch.tensor([0.0, -0.0, 90.0, -90.0, 1e-30, -1e-30, 3e38, -3e38])  # exp's ends
    assert torch.equal(OPS.silu_mul(gu), F.silu(gu[:, :200]) * gu[:, 200:])


def test_silu_mul_lanes_and_tail_agree_on_every_gate():
    """Rows of 16 run in AVX-512 lanes, rows of 8 element by element (where the CPU has
    AVX-512; elsewhere both run element by element): every bf16 gate, subnormals included,
    gives the same bits both ways, and the NaN gates NaN."""
    gates = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    ups = rand(65536, scale=3)

    def run(width: int) -> torch.Tensor:
        return OPS.silu_mul(torch.cat((gates.view(-1, width), ups.view(-1, width)), 1)).view(-1)

    lanes, tail = run(16), run(8)
    nan = lanes.isnan()
    assert torch.equal(nan, tail.isnan()) and nan.sum() >= 2 * 127  # a NaN's payload may differ
    assert torch.equal(lanes[~nan].view(torch.int16), tail[~nan].view(torch.int16))


def test_rope_matches_torch_and_leaves_v_alone():
    T, nh, nkv, hd = 37, 9, 3, 64
    rot = Rotary(hd, 10000.0, 512, torch.device("cpu"))
    positions = torch.randint(0, 512, (T,), generator=GEN)
    tables = rot.tables(positions, torch.bfloat16)
    qkv = rand(T, (nh + 2 * nkv) * hd)
    ref = Rotary.apply(qkv[:, : (nh + nkv) * hd].view(T, nh + nkv, hd), tables)
    out = qkv.clone()
    OPS.rope_(out, nh + nkv, hd, *tables)
    assert torch.equal(out[:, : (nh + nkv) * hd].view(T, nh + nkv, hd), ref)
    assert torch.equal(out[:, (nh + nkv) * hd :], qkv[:, (nh + nkv) * hd :])


def test_rope_store_gives_what_rope_scale_and_write_kv_give():
    """The fused call = rope_, then q * scale and write_kv (torch), bit for bit: q, and the
    cache with the new tokens' K|V in their (scattered) slots and every other slot as it was."""
    T, nh, nkv, hd, bs, num_blocks = 21, 9, 3, 64, 16, 40
    rot = Rotary(hd, 10000.0, 512, torch.device("cpu"))
    tables = rot.tables(torch.randint(0, 512, (T,), generator=GEN), torch.bfloat16)
    qkv = rand(T, (nh + 2 * nkv) * hd, scale=3)
    slots = torch.randperm(num_blocks * bs, generator=GEN)[:T]  # any block, any offset
    rows = token_rows(slots // bs, slots % bs, nkv, bs)
    batch = AttentionBatch(torch.zeros(T, dtype=torch.long), rows, torch.arange(T), torch.arange(T), None, None)
    cache = rand(num_blocks, 2, nkv, bs, hd)
    scale = hd**-0.5 * 1.1  # not a power of two: q * scale rounds
    ref_cache, rotated = cache.clone(), qkv.clone()
    OPS.rope_(rotated, nh + nkv, hd, *tables)
    q, k, v = (part.view(T, -1, hd) for part in rotated.split((nh * hd, nkv * hd, nkv * hd), dim=-1))
    write_kv(ref_cache, k, v, batch)
    before = qkv.clone()
    out = OPS.rope_store(qkv, nh, nkv, hd, *tables, scale, cache, rows)
    assert torch.equal(out, q * scale)
    assert torch.equal(cache, ref_cache)
    assert torch.equal(qkv, before)


def test_each_row_gives_the_same_bits_alone():
    """Many rows run on several threads, few on one: the same bits."""
    norm = norm_layer(576)
    x, a, gu = rand(200, 576), rand(200, 576), rand(200, 3072)
    whole_n, whole_h = OPS.rmsnorm(x, norm.weight, norm.eps), OPS.add_rmsnorm(x, a, norm.weight, norm.eps)[1]
    whole_s = OPS.silu_mul(gu)
    for i in (0, 77, 199):
        assert torch.equal(OPS.rmsnorm(x[i : i + 1], norm.weight, norm.eps)[0], whole_n[i])
        assert torch.equal(OPS.add_rmsnorm(x[i : i + 1], a[i : i + 1], norm.weight, norm.eps)[1][0], whole_h[i])
        assert torch.equal(OPS.silu_mul(gu[i : i + 1])[0], whole_s[i])
