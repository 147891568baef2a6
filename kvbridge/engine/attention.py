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
    block_ids: torch.Tensor  # (ceil(ctx_len / bs),) long


@dataclass
class AttentionBatch:
    positions: torch.Tensor  # (T,) position of each new token
    slot_blocks: torch.Tensor  # (T,) block id where its KV goes
    slot_offsets: torch.Tensor  # (T,) offset inside that block
    logits_indices: torch.Tensor  # (N,) rows whose logits are sampled
    decode_rows: torch.Tensor  # (B,) rows of single-token requests
    decode_block_tables: torch.Tensor  # (B, M) block ids, padded with 0
    decode_mask: torch.Tensor | None  # (B, 1, 1, M*bs) True where a key is valid
    prefills: list[PrefillSeq] = field(default_factory=list)


def write_kv(kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: AttentionBatch) -> None:
    """Store the new tokens' K and V (T, nkv, hd) into their slots."""
    kv_layer[batch.slot_blocks, :, :, batch.slot_offsets, :] = torch.stack((k, v), dim=1)  # (T, 2, nkv, hd)


def gather_kv(kv_layer: torch.Tensor, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks (..., M) → K, V as (..., nkv, M*bs, hd)."""
    g = kv_layer[block_ids]  # (..., M, 2, nkv, bs, hd)
    *lead, m, two, nkv, bs, hd = g.shape
    nlead = len(lead)
    order = (nlead + 1, *range(nlead), nlead + 2, nlead, nlead + 3, nlead + 4)
    g = g.permute(order).reshape(two, *lead, nkv, m * bs, hd)  # (2, ..., nkv, M*bs, hd)
    return g[0], g[1]


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, batch: AttentionBatch, scale: float
) -> torch.Tensor:
    """q (T, nh, hd), fresh k/v (T, nkv, hd) → attention output (T, nh, hd)."""
    out = torch.empty_like(q)
    if batch.decode_rows.numel():
        qd = q[batch.decode_rows].unsqueeze(2)  # (B, nh, 1, hd)
        kd, vd = gather_kv(kv_layer, batch.decode_block_tables)  # (B, nkv, L, hd)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=batch.decode_mask, scale=scale, enable_gqa=True)
        out[batch.decode_rows] = od.squeeze(2)
    for p in batch.prefills:
        rows = slice(p.start, p.start + p.num_new)
        qp = q[rows].transpose(0, 1)  # (nh, Q, hd)
        if p.ctx_len == p.num_new:  # no earlier context: causal over the chunk itself
            kp, vp = k[rows].transpose(0, 1), v[rows].transpose(0, 1)  # (nkv, Q, hd)
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=True)
        else:
            kp, vp = gather_kv(kv_layer, p.block_ids)  # (nkv, M*bs, hd)
            kp, vp = kp[:, : p.ctx_len], vp[:, : p.ctx_len]
            first = p.ctx_len - p.num_new  # position of the first query
            qpos = torch.arange(first, p.ctx_len, device=q.device)[:, None]
            kpos = torch.arange(p.ctx_len, device=q.device)[None, :]
            mask = kpos <= qpos  # (Q, ctx)
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale, enable_gqa=True)
        out[rows] = op.transpose(0, 1)
    return out
