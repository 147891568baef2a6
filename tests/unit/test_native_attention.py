"""The native paged attention kernel (bfloat16, CPU) against a float64 reference, and its rules."""

from __future__ import annotations

import logging

import pytest
import torch

from kvbridge.config import ConfigError, EngineConfig
from kvbridge.engine import native
from kvbridge.engine.engine import resolve_attention

NB, NKV, BS = 64, 3, 16


def paged_case(lens: list[int], nh: int, hd: int, seed: int = 0):
    """Random K/V in scattered blocks of one layer, the tables and scaled queries for ``lens``."""
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn(NB, 2, NKV, BS, hd, generator=gen).bfloat16()
    perm = torch.randperm(NB, generator=gen).tolist()
    tables, used = [], 0
    for n in lens:
        nb = -(-n // BS)
        tables.append(perm[used : used + nb])
        used += nb
    width = max(map(len, tables))
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    q = (torch.randn(len(lens), nh, hd, generator=gen) * hd**-0.5).bfloat16()
    return q, kv, padded, torch.tensor(lens)


def reference(q, kv, tables, lens):
    """float64 softmax(q k^T) v of each request over its own tokens, query heads grouped."""
    out = torch.empty(q.shape, dtype=torch.float64)
    g = q.shape[1] // NKV
    for b, n in enumerate(lens.tolist()):
        t = torch.arange(n)
        blocks = tables[b][t // BS]
        k = kv[blocks, 0, :, t % BS].double().transpose(0, 1)  # (nkv, n, hd)
        v = kv[blocks, 1, :, t % BS].double().transpose(0, 1)
        qq = q[b].double().view(NKV, g, -1)
        p = torch.softmax(qq @ k.transpose(-1, -2), dim=-1)
        out[b] = (p @ v).view(q.shape[1], -1)
    return out


# where the CPU has AVX-512 BF16: head dims 64 and 128 run as constants, 96 and 256 as runtime
# values; a pass of the weighted sum takes 4 heads (hd 64), 2 (128, 96) or 1 (256), so 8 and 5
# heads a group leave a short last pass; 24 runs the portable loop
@pytest.mark.parametrize("hd,g", [(64, 3), (64, 8), (128, 3), (96, 5), (256, 2), (24, 3)])
def test_matches_float64_within_one_rounding(hd, g):
    kern = native.load().paged_attention
    lens = [1, 15, 16, 17, 200, 33]
    q, kv, tables, lens_t = paged_case(lens, NKV * g, hd)
    out = kern(q, kv, tables, lens_t, max(lens))
    ref = reference(q, kv, tables, lens_t)
    # float32 arithmetic, one rounding to bfloat16: within one bfloat16 step of the exact value,
    # or within 2^-20 of it where terms of ~1 cancel to nearly 0 (float32's own error there)
    step = (ref.abs() * 2**-7).clamp(min=2**-20)
    assert ((out.double() - ref).abs() <= step).all()
    assert (out.float() == ref.bfloat16().float()).float().mean() > 0.95


def test_a_request_gives_the_same_bits_alone_and_in_any_batch():
    kern = native.load().paged_attention
    lens = [40, 7, 129, 64, 1]
    q, kv, tables, lens_t = paged_case(lens, NKV * 3, 64, seed=3)
    together = kern(q, kv, tables, lens_t, max(lens))
    for b, n in enumerate(lens):
        alone = kern(q[b : b + 1], kv, tables[b : b + 1, : -(-n // BS)], lens_t[b : b + 1], n)
        assert torch.equal(alone, together[b : b + 1])


def prompt_and_decodes(hd: int):
    """A 70-token prompt's rows, each bounded by its position, as one prompt and as 70 decode steps."""
    kern = native.load().paged_attention
    n = 70
    _, kv, tables, _ = paged_case([n, 20], NKV * 3, hd, seed=5)
    gen = torch.Generator().manual_seed(6)
    q = (torch.randn(n, NKV * 3, hd, generator=gen) * hd**-0.5).bfloat16()
    lens = torch.arange(1, n + 1)
    prompt = kern(q, kv, tables, lens, n, row_table=torch.zeros(n, dtype=torch.long))
    alone = torch.cat([kern(q[p : p + 1], kv, tables[:1], lens[p : p + 1], p + 1) for p in range(n)])
    ref = torch.cat([reference(q[p : p + 1], kv, tables[:1], lens[p : p + 1]) for p in range(n)])
    return prompt, alone, ref


@pytest.fixture
def amx_off():
    """The process's AMX tiles off (products and attention scores), as they were afterwards."""
    lib = native.load().lib
    was_on = lib.linear_bf16_available() == 2
    lib.linear_bf16_use_amx(0)
    yield
    lib.linear_bf16_use_amx(int(was_on))


@pytest.mark.parametrize("hd", [64, 128, 24])  # 64, 128: the prompt path where the CPU has AVX-512 BF16
def test_a_prompt_token_gets_the_bits_of_a_decode_step(hd):
    """Every row of a prompt equals that token computed alone as a decode step: chunked, cached
    or recomputed prompts cannot drift from decodes."""
    prompt, alone, ref = prompt_and_decodes(hd)
    for p in range(len(prompt)):
        assert torch.equal(alone[p], prompt[p]), p
    step = (ref.abs() * 2**-7).clamp(min=2**-20)  # as in the float64 test above
    assert ((prompt.double() - ref).abs() <= step).all()


@pytest.mark.parametrize("hd", [64, 128])
def test_the_scores_run_on_amx_tiles_where_they_are_on_and_both_ways_agree_with_decodes(hd, request):
    """With AMX tiles on, the scores run on them (other sums than the AVX-512 lanes', so other
    bits somewhere in 70 x 9 x hd outputs); with them off, the lanes' prompt and decode paths
    still agree to the bit."""
    on, _, ref = prompt_and_decodes(hd)
    request.getfixturevalue("amx_off")
    off, alone, _ = prompt_and_decodes(hd)
    assert torch.equal(alone, off)
    step = (ref.abs() * 2**-7).clamp(min=2**-20)
    assert ((off.double() - ref).abs() <= step).all()
    assert torch.equal(on, off) == (native.load().linear.available != 2)


def test_an_unsupported_shape_is_an_error_not_a_wrong_answer():
    kern = native.load().paged_attention
    q, kv, tables, lens = paged_case([5], 17 * NKV, 64)  # 17 query heads per KV head: over the kernel's 16
    with pytest.raises(ValueError, match="unsupported shape"):
        kern(q, kv, tables, lens, 5)


def test_the_library_is_built_once_per_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBRIDGE_CACHE_DIR", str(tmp_path))
    first = native.build()
    assert first.parent == tmp_path and first.exists()
    mtime = first.stat().st_mtime_ns
    assert native.build() == first and first.stat().st_mtime_ns == mtime  # cached, not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary file left


def test_an_unwritable_cache_folder_falls_back_to_the_temporary_one(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("KVBRIDGE_CACHE_DIR", str(blocker / "cache"))  # under a file: cannot be made
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    lib = native.build()
    assert lib.parent == tmp_path / "tmp" / f"kvbridge-{native.os.getuid()}" and lib.exists()


def test_no_compiler_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBRIDGE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")
    with pytest.raises(native.NativeUnavailable):
        native.build()
    assert list(tmp_path.iterdir()) == []


def test_backend_resolution(monkeypatch, caplog):
    cpu = torch.device("cpu")
    assert resolve_attention("torch", "bfloat16", cpu) is None
    assert resolve_attention("auto", "float32", cpu) is None  # float32 keeps SDPA (transformers' kernel)
    assert resolve_attention("auto", "bfloat16", cpu) is native.load().paged_attention
    with pytest.raises(ConfigError, match="bfloat16 on CPU"):
        resolve_attention("native", "float32", cpu)

    def broken():
        raise native.NativeUnavailable("no C compiler (cc or gcc) on PATH")

    monkeypatch.setattr(native, "load", broken)
    with caplog.at_level(logging.WARNING, logger="kvbridge.engine"):
        assert resolve_attention("auto", "bfloat16", cpu) is None
    assert "no C compiler" in caplog.text
    with pytest.raises(ConfigError, match="no C compiler"):
        resolve_attention("native", "bfloat16", cpu)


def test_an_unknown_backend_name_is_a_config_error():
    with pytest.raises(ConfigError, match="attention_backend must be one of auto, native, torch"):
        EngineConfig(attention_backend="flash")
