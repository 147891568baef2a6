"""Paged attention against a dense reference, with blocks scattered over the pool."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvbridge.engine import attention, native
from kvbridge.engine.attention import (
    AttentionBatch,
    PrefillSeq,
    cache_blocks,
    cache_rows,
    paged_attention,
    token_rows,
    write_kv,
)

NKV, G, HD, BS, NB = 2, 3, 8, 4, 32


def dense(q, k, v, first):
    """q (Q, nh, hd), k/v (ctx, nkv, hd): causal attention where query i sits at first+i."""
    kk = k.repeat_interleave(G, dim=1).transpose(0, 1)
    vv = v.repeat_interleave(G, dim=1).transpose(0, 1)
    mask = torch.arange(k.shape[0])[None, :] <= torch.arange(first, first + q.shape[0])[:, None]
    return F.scaled_dot_product_attention(q.transpose(0, 1), kk, vv, attn_mask=mask).transpose(0, 1)


@pytest.mark.parametrize(
    ("dtype", "score_elements", "use_native"),
    # 40: one query per chunk; native: every row one query of the native kernel (portable loop)
    [(torch.float32, None, False), (torch.bfloat16, None, False), (torch.bfloat16, 40, False), (torch.bfloat16, None, True)],
)
def test_paged_attention_matches_dense(dtype, score_elements, use_native, monkeypatch):
    if score_elements is not None:  # half precision chunks the queries of long prompts
        monkeypatch.setattr(attention, "SCORE_ELEMENTS", score_elements)
    torch.manual_seed(0)
    kv_layer = torch.zeros(NB, 2, NKV, BS, HD, dtype=dtype)
    perm = torch.randperm(NB).tolist()
    # request A: 9 tokens cached, 1 new (decode); request B: 5 cached, 6 new (chunk); C: fresh 7
    specs = [("A", 9, 1), ("B", 5, 6), ("C", 0, 7)]
    tables, full_k, full_v, used = {}, {}, {}, 0
    for name, cached, new in specs:
        n = -(-(cached + new) // BS)
        tables[name] = perm[used : used + n]
        used += n
        full_k[name] = torch.randn(cached + new, NKV, HD).to(dtype)
        full_v[name] = torch.randn(cached + new, NKV, HD).to(dtype)
        if cached:  # pre-fill the cache with the earlier tokens
            t = torch.tensor(tables[name])
            pos = torch.arange(cached)
            rows = token_rows(t[pos // BS], pos % BS, NKV, BS)
            kv_layer.view(-1, HD).index_copy_(0, rows, torch.stack((full_k[name][:cached], full_v[name][:cached]), 1).reshape(-1, HD))
    q_parts, k_parts, v_parts, blocks, offs, prefills = [], [], [], [], [], []
    row = 0
    for name, cached, new in specs:
        q_parts.append(torch.randn(new, NKV * G, HD).to(dtype))
        k_parts.append(full_k[name][cached:])
        v_parts.append(full_v[name][cached:])
        pos = torch.arange(cached, cached + new)
        t = torch.tensor(tables[name])
        blocks.append(t[pos // BS])
        offs.append(pos % BS)
        if name == "B":
            prefills.append(PrefillSeq(row, new, cached + new, cache_rows(t, cached + new, NKV, BS)))
        elif name == "C":
            prefills.append(PrefillSeq(row, new, new, None))
        row += new
    q, k, v = torch.cat(q_parts), torch.cat(k_parts), torch.cat(v_parts)
    ta = torch.tensor([tables["A"] + [0]])  # padded table
    batch = AttentionBatch(
        positions=torch.cat([torch.arange(c, c + n) for _, c, n in specs]),
        write_rows=token_rows(torch.cat(blocks), torch.cat(offs), NKV, BS),
        logits_indices=torch.tensor([0]),
        decode_rows=torch.tensor([0]),
        decode_kv_blocks=cache_blocks(ta, NKV),
        decode_mask=(torch.arange(ta.shape[1] * BS) < 10)[None, None, :],
        prefills=prefills,
    )
    if use_native:
        rows_of = [i for i, (_, _, n) in enumerate(specs) for _ in range(n)]
        names = [name for name, _, _ in specs]
        width = max(len(tables[x]) for x in names)
        batch.native = native.load().paged_attention
        batch.tables = torch.tensor([tables[x] + [0] * (width - len(tables[x])) for x in names])
        batch.lens, batch.max_len = batch.positions + 1, int(batch.positions.max()) + 1
        batch.row_table = torch.tensor(rows_of)
    write_kv(kv_layer, k, v, batch)
    out = paged_attention(q, k, v, kv_layer, batch, HD**-0.5)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    r = 0
    for (name, cached, new), qp in zip(specs, q_parts):
        ref = dense(qp.float(), full_k[name].float(), full_v[name].float(), cached)
        torch.testing.assert_close(out[r : r + new].float(), ref, **tol)
        r += new


@pytest.mark.parametrize(("dtype", "use_native"), [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_a_step_of_decodes_only_matches_dense(dtype, use_native):
    """Every row a decode (the steady state of serving): q is used in place, not gathered.
    ``use_native``: the native kernel's portable C loop (a head dim of 8 is no AVX-512 case)."""
    torch.manual_seed(1)
    kv_layer = torch.zeros(NB, 2, NKV, BS, HD, dtype=dtype)
    perm = torch.randperm(NB).tolist()
    cached = [9, 3, 14]  # tokens before each request's new one
    tables, full_k, full_v, slots, used = [], [], [], [], 0
    for c in cached:
        n = -(-(c + 1) // BS)
        tables.append(perm[used : used + n])
        used += n
        full_k.append(torch.randn(c + 1, NKV, HD).to(dtype))
        full_v.append(torch.randn(c + 1, NKV, HD).to(dtype))
        t = torch.tensor(tables[-1])
        pos = torch.arange(c)
        rows = token_rows(t[pos // BS], pos % BS, NKV, BS)
        kv_layer.view(-1, HD).index_copy_(0, rows, torch.stack((full_k[-1][:c], full_v[-1][:c]), 1).reshape(-1, HD))
        slots.append((t[c // BS], c % BS))
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    batch = AttentionBatch(
        positions=torch.tensor(cached),
        write_rows=token_rows(torch.stack([b for b, _ in slots]), torch.tensor([o for _, o in slots]), NKV, BS),
        logits_indices=torch.arange(3),
        decode_rows=torch.arange(3),
        decode_kv_blocks=cache_blocks(padded, NKV),
        decode_mask=(torch.arange(width * BS)[None, :] <= torch.tensor(cached)[:, None])[:, None, :],
        native=native.load().paged_attention if use_native else None,
        tables=padded,
        lens=torch.tensor(cached) + 1,
        max_len=max(cached) + 1,
    )
    assert batch.decode_only
    q = torch.randn(3, NKV * G, HD).to(dtype)
    k, v = torch.stack([x[-1] for x in full_k]), torch.stack([x[-1] for x in full_v])
    write_kv(kv_layer, k, v, batch)
    out = paged_attention(q, k, v, kv_layer, batch, HD**-0.5)
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    for i, c in enumerate(cached):
        ref = dense(q[i : i + 1].float(), full_k[i].float(), full_v[i].float(), c)
        torch.testing.assert_close(out[i : i + 1].float(), ref, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_tail_after_a_cached_prefix_gives_the_bits_of_the_whole_prompt(dtype):
    """A prefix-cache hit leaves a few new tokens to compute. float32: SDPA sums 1-3 queries
    in another order than a whole prompt's, so the tail is padded to SDPA_MIN_QUERIES queries;
    bfloat16: the grouped matmuls need nothing."""
    torch.manual_seed(3)
    total, nkv, g, hd, bs = 35, 3, 3, 64, 16
    table = torch.tensor([5, 2, 7])
    q, k, v = (torch.randn(total, n, hd).to(dtype) for n in (nkv * g, nkv, nkv))
    pos = torch.arange(total)
    rows = token_rows(table[pos // bs], pos % bs, nkv, bs)
    kv_layer = torch.zeros(8, 2, nkv, bs, hd, dtype=dtype)
    kv_layer.view(-1, hd).index_copy_(0, rows, torch.stack((k, v), 1).reshape(-1, hd))

    def batch(first: int, prefill: PrefillSeq) -> AttentionBatch:
        n = total - first
        return AttentionBatch(pos[first:], rows.view(total, -1)[first:].reshape(-1), torch.tensor([n - 1]),
                              torch.tensor([], dtype=torch.long), None, None, [prefill])  # fmt: skip

    whole = paged_attention(q, k, v, kv_layer, batch(0, PrefillSeq(0, total, total, None)), hd**-0.5)
    for new in (1, 2, 3, 4, 7):
        first = total - new
        cached = PrefillSeq(0, new, total, cache_rows(table, total, nkv, bs))
        tail = paged_attention(q[first:], k[first:], v[first:], kv_layer, batch(first, cached), hd**-0.5)
        assert torch.equal(tail, whole[first:]), f"{new} new tokens"


def test_whole_block_gather_equals_the_row_by_row_gather():
    """The decode path's block gather returns exactly the K/V of the per-token rows it replaced."""
    torch.manual_seed(2)
    kv_layer = torch.randn(NB, 2, NKV, BS, HD).to(torch.bfloat16)
    tables = torch.randperm(NB)[:12].view(3, 4)  # 3 requests x 4 blocks (the padding is blocks too)
    k_rows, v_rows = attention.read_kv(kv_layer, cache_rows(tables, 4 * BS, NKV, BS))
    k_blocks, v_blocks = attention.read_blocks(kv_layer, cache_blocks(tables, NKV))
    assert k_blocks.shape == (3, NKV, 4 * BS, HD)
    assert torch.equal(k_blocks, k_rows) and torch.equal(v_blocks, v_rows)
    # and token t of request r is at offset t % BS of its block t // BS
    r, t, h = 1, 9, 1
    assert torch.equal(k_blocks[r, h, t], kv_layer[tables[r, t // BS], 0, h, t % BS])
