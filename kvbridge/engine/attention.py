"""Paged attention on top of the block-indexed KV layout of kv_cache.py.

One layer's KV: ``kv_layer`` (num_blocks, 2, nkv, bs, hd). Token t of a request lives in
block ``block_ids[t // bs]`` at offset ``t % bs``.

Requests in a step fall in two groups:
  - decode: exactly one new token; batched together over a padded block table.
  - prefill: a chunk of new tokens; one attention call each. A chunk with no earlier
    context attends to its own fresh K/V (causal); otherwise K/V come from the cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PrefillSeq:
    start: int  # first row of this request's tokens in the flattened batch
    num_new: int  # query tokens in this chunk
    ctx_len: int  # tokens with KV after this chunk (earlier context + new)
    kv_rows: torch.Tensor | None  # (2, nkv, ctx_len) rows of the cache (None: fresh chunk)


@dataclass
class AttentionBatch:
    """Built once per step; every layer uses the same indices (layers share block ids)."""

    positions: torch.Tensor  # (T,) position of each new token
    write_rows: torch.Tensor  # (T*2*nkv,) cache rows receiving the new tokens' K|V per head
    logits_indices: torch.Tensor  # (N,) rows whose logits are sampled
    decode_rows: torch.Tensor  # (B,) rows of single-token requests
    decode_kv_rows: torch.Tensor | None  # (2, B, nkv, L) cache rows of their K/V, padded
    decode_mask: torch.Tensor | None  # (B, 1, L) True where a key is valid
    prefills: list[PrefillSeq] = field(default_factory=list)


def cache_rows(block_ids: torch.Tensor, length: int, nkv: int, bs: int) -> torch.Tensor:
    """Rows of one layer's cache viewed as (num_blocks*2*nkv*bs, hd) that hold tokens
    0..length-1 of a request: (..., M) block ids → (2, ..., nkv, length)."""
    lead = block_ids.shape[:-1]
    base = (block_ids * (2 * nkv * bs)).unsqueeze(0)[..., None, :, None]  # (1, ..., 1, M, 1)
    kv = torch.arange(2, device=block_ids.device).view(2, *([1] * len(lead)), 1, 1, 1) * (nkv * bs)
    head = torch.arange(nkv, device=block_ids.device).view(nkv, 1, 1) * bs
    off = torch.arange(bs, device=block_ids.device)
    rows = (base + kv + head + off).reshape(2, *lead, nkv, -1)  # (2, ..., nkv, M*bs)
    return rows[..., :length]


def token_rows(blocks: torch.Tensor, offsets: torch.Tensor, nkv: int, bs: int) -> torch.Tensor:
    """Cache rows of tokens at (block, offset): (T,) → (T*2*nkv,) in (T, K|V, head) order."""
    kv_head = torch.arange(2 * nkv, device=blocks.device) * bs  # (2*nkv,)
    return ((blocks * (2 * nkv * bs) + offsets)[:, None] + kv_head[None, :]).reshape(-1)


def write_kv(kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: AttentionBatch) -> None:
    """Store the new tokens' K and V (T, nkv, hd) into their slots."""
    hd = k.shape[-1]
    kv_layer.view(-1, hd).index_copy_(0, batch.write_rows, torch.stack((k, v), dim=1).reshape(-1, hd))


def read_kv(kv_layer: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One gather straight into the matmul layout: rows (2, ..., nkv, L) → K, V (..., nkv, L, hd)."""
    hd = kv_layer.shape[-1]
    g = kv_layer.view(-1, hd).index_select(0, rows.reshape(-1)).view(*rows.shape, hd)
    return g[0], g[1]


# Half-precision prefill computes scores for at most this many (head, query, key) elements at a
# time (float32: 4 MiB, so the softmax and casts run in cache), chunking the queries of long
# prompts. 16 MiB chunks made every pass over the scores go to memory: a 2048-token prompt's
# attention took 74 ms per layer instead of 34, and a 512-token prompt's prefill 0.72 s, not 0.43.
SCORE_ELEMENTS = 1 << 20


def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, mask_from: int = 0
) -> torch.Tensor:
    """Plain softmax(q k^T) v with grouped heads, scores in float32.

    q (..., nkv, g, Q, hd), k/v (..., nkv, L, hd); ``mask`` covers the keys from ``mask_from``
    on (keys before it are visible to every query) and broadcasts to (..., nkv, g, Q, L - mask_from).
    On CPU the fused SDPA kernel is slow for half precision; this is two batched matmuls in
    the model's dtype.
    """
    *lead, nkv, g, nq, hd = q.shape
    qf = (q * scale).reshape(*lead, nkv, g * nq, hd)
    s = torch.matmul(qf, k.transpose(-1, -2)).float()  # (..., nkv, g*Q, L)
    s = s.view(*lead, nkv, g, nq, -1)
    if mask is not None:
        s[..., mask_from:].masked_fill_(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).to(v.dtype).view(*lead, nkv, g * nq, -1)
    return torch.matmul(p, v).view(*lead, nkv, g, nq, hd)


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, batch: AttentionBatch, scale: float
) -> torch.Tensor:
    """q (T, nh, hd), fresh k/v (T, nkv, hd) → attention output (T, nh, hd).

    float32 uses torch's fused SDPA (bit-compatible with transformers' default path);
    bfloat16/float16 use ``grouped_attention``: torch's fused CPU kernel is several times
    slower in half precision, for decode and for long prompts alike."""
    out = torch.empty_like(q)
    T, nh, hd = q.shape
    nkv = k.shape[1]
    g = nh // nkv
    fused = q.dtype == torch.float32
    if batch.decode_kv_rows is not None:
        kd, vd = read_kv(kv_layer, batch.decode_kv_rows)  # (B, nkv, L, hd)
        qd = q[batch.decode_rows]  # (B, nh, hd)
        mask = batch.decode_mask
        if fused:
            od = F.scaled_dot_product_attention(qd.unsqueeze(2), kd, vd, attn_mask=mask[:, None], scale=scale, enable_gqa=True)
            out[batch.decode_rows] = od.squeeze(2)
        else:
            od = grouped_attention(qd.view(-1, nkv, g, 1, hd), kd, vd, mask[:, None, None], scale)  # (B, nkv, g, 1, hd)
            out[batch.decode_rows] = od.reshape(-1, nh, hd)
    for p in batch.prefills:
        rows = slice(p.start, p.start + p.num_new)
        fresh = p.kv_rows is None  # no earlier context: attend to the chunk itself
        if fresh:
            kp, vp = k[rows].transpose(0, 1), v[rows].transpose(0, 1)  # (nkv, Q, hd)
        else:
            kp, vp = read_kv(kv_layer, p.kv_rows)  # (nkv, ctx, hd)
        first = p.ctx_len - p.num_new  # position of the first query
        if fused:
            qp = q[rows].transpose(0, 1)  # (nh, Q, hd)
            if fresh:
                op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=True)
            else:
                mask = _causal_mask(first, p.ctx_len, q.device)
                op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale, enable_gqa=True)
            out[rows] = op.transpose(0, 1)
            continue
        # half precision: query chunks small enough that a chunk's scores stay a few MB
        step = max(1, SCORE_ELEMENTS // (nh * p.ctx_len))
        for q0 in range(0, p.num_new, step):
            q1 = min(p.num_new, q0 + step)
            ctx = first + q1  # keys past the chunk's last query are never seen
            qp = q[p.start + q0 : p.start + q1].view(q1 - q0, nkv, g, hd).permute(1, 2, 0, 3)  # (nkv, g, Qc, hd)
            diag = _causal_mask(first + q0, ctx, q.device)[:, first + q0 :]  # (Qc, Qc): earlier keys all visible
            op = grouped_attention(qp, kp[:, :ctx], vp[:, :ctx], diag, scale, mask_from=first + q0)  # (nkv, g, Qc, hd)
            out[p.start + q0 : p.start + q1] = op.permute(2, 0, 1, 3).reshape(q1 - q0, nh, hd)
    return out


def _causal_mask(first: int, ctx_len: int, device: torch.device) -> torch.Tensor:
    """(Q, ctx) True where query at position first+i may see key j (j <= first+i)."""
    qpos = torch.arange(first, ctx_len, device=device)[:, None]
    return torch.arange(ctx_len, device=device)[None, :] <= qpos
