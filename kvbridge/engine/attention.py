"""Paged attention on top of the block-indexed KV layout of kv_cache.py.

One layer's KV: ``kv_layer`` (num_blocks, 2, nkv, bs, hd). Token t of a request lives in
block ``block_ids[t // bs]`` at offset ``t % bs``.

With the native kernel (bfloat16 on CPU, ``AttentionBatch.native``), every row of a step, decode
or prompt token, is one query against the first (position + 1) tokens of its request, read
in place; one call per layer. torch's path splits the requests in two groups:
  - decode: exactly one new token; batched together over a padded block table, their K/V
    gathered a whole block (bs*hd values) at a time.
  - prefill: a chunk of new tokens; one attention call each. A chunk with no earlier
    context attends to its own fresh K/V (causal); otherwise K/V come from the cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kvbridge.engine.native import PagedAttention


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
    decode_kv_blocks: torch.Tensor | None  # (2, B, nkv, M) their K/V blocks (``cache_blocks``), padded
    decode_mask: torch.Tensor | None  # (B, 1, M*bs) True where a key is valid
    prefills: list[PrefillSeq] = field(default_factory=list)
    # the native kernel's inputs, for every row of the step, instead of the torch path's
    # decode_kv_blocks, decode_mask and prefills (``native``: see engine/native)
    native: PagedAttention | None = None
    tables: torch.Tensor | None = None  # (R, M) block ids of the step's requests, padded
    lens: torch.Tensor | None = None  # (T,) tokens each row attends to: its position + 1
    max_len: int = 0
    row_table: torch.Tensor | None = None  # (T,) each row's request in ``tables`` (None: row i is request i)
    # derived once per step, so that the 30-odd layers do not each redo them
    decode_only: bool = field(init=False)  # every row is a decode, in order: no gather/scatter of q
    decode_hidden: torch.Tensor | None = field(init=False)  # ~decode_mask
    _causal: dict[int, torch.Tensor] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.decode_only = len(self.decode_rows) > 0 and not self.prefills and len(self.decode_rows) == len(self.positions)
        self.decode_hidden = None if self.decode_mask is None else ~self.decode_mask

    def hidden_above_diagonal(self, n: int, device: torch.device) -> torch.Tensor:
        """(n, n) True where query i of a chunk must not see key j of the same chunk (j > i)."""
        mask = self._causal.get(n)
        if mask is None:
            mask = self._causal[n] = torch.ones(n, n, dtype=torch.bool, device=device).triu_(1)
        return mask


def cache_blocks(block_ids: torch.Tensor, nkv: int) -> torch.Tensor:
    """Rows of one layer's cache viewed as (num_blocks*2*nkv, bs*hd), one per block, K|V and
    head: (..., M) block ids → (2, ..., nkv, M). Gathering these moves bs*hd contiguous values
    per index, not hd: a batch-8 decode step's K/V took 124 µs per layer row by row."""
    base = (block_ids * (2 * nkv)).unsqueeze(0)[..., None, :]  # (1, ..., 1, M)
    lead = (1,) * (block_ids.dim() - 1)
    kv = torch.arange(2, device=block_ids.device).view(2, *lead, 1, 1) * nkv
    head = torch.arange(nkv, device=block_ids.device).view(nkv, 1)
    return base + kv + head


def cache_rows(block_ids: torch.Tensor, length: int, nkv: int, bs: int) -> torch.Tensor:
    """Rows of one layer's cache viewed as (num_blocks*2*nkv*bs, hd) that hold tokens
    0..length-1 of a request: (..., M) block ids → (2, ..., nkv, length). Block row b of
    ``cache_blocks`` is token rows b*bs .. b*bs+bs-1."""
    rows = cache_blocks(block_ids, nkv)[..., None] * bs + torch.arange(bs, device=block_ids.device)  # (2, ..., nkv, M, bs)
    return rows.flatten(-2)[..., :length]


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


def read_blocks(kv_layer: torch.Tensor, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One gather of whole blocks: ``cache_blocks`` (2, ..., nkv, M) → K, V (..., nkv, M*bs, hd)."""
    bs, hd = kv_layer.shape[-2:]
    g = kv_layer.view(-1, bs * hd).index_select(0, blocks.reshape(-1))
    g = g.view(*blocks.shape[:-1], blocks.shape[-1] * bs, hd)
    return g[0], g[1]


# Half-precision prefill computes scores for at most this many (head, query, key) elements at a
# time (float32: 4 MiB, so the softmax and casts run in cache), chunking the queries of long
# prompts. 16 MiB chunks made every pass over the scores go to memory: a 2048-token prompt's
# attention took 74 ms per layer instead of 34, and a 512-token prompt's prefill 0.72 s, not 0.43.
SCORE_ELEMENTS = 1 << 20
# float32 SDPA: fewest queries of a chunk whose rows match those of larger chunks (measured:
# 1-3 differed at every prompt length tried, 4-19 matched)
SDPA_MIN_QUERIES = 4


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, hidden: torch.Tensor | None, hidden_from: int = 0) -> torch.Tensor:
    """Plain softmax(q k^T) v with grouped heads, scores in float32; q comes scaled.

    q (..., nkv, g, Q, hd), k/v (..., nkv, L, hd); ``hidden`` is True where a key is masked,
    covers the keys from ``hidden_from`` on (keys before it are visible to every query) and
    broadcasts to (..., nkv, g, Q, L - hidden_from).
    On CPU the fused SDPA kernel is slow for half precision; this is two batched matmuls in
    the model's dtype.
    """
    *lead, nkv, g, nq, hd = q.shape
    s = torch.matmul(q.reshape(*lead, nkv, g * nq, hd), k.transpose(-1, -2)).float()  # (..., nkv, g*Q, L)
    s = s.view(*lead, nkv, g, nq, -1)
    if hidden is not None:
        s[..., hidden_from:].masked_fill_(hidden, float("-inf"))
    p = torch.softmax(s, dim=-1).to(v.dtype).view(*lead, nkv, g * nq, -1)
    return torch.matmul(p, v).view(*lead, nkv, g, nq, hd)


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, batch: AttentionBatch, scale: float
) -> torch.Tensor:
    """q (T, nh, hd), fresh k/v (T, nkv, hd) → attention output (T, nh, hd).

    float32 uses torch's fused SDPA (bit-compatible with transformers' default path);
    bfloat16/float16 use ``grouped_attention``: torch's fused CPU kernel is several times
    slower in half precision, for decode and for long prompts alike."""
    if q.dtype == torch.float32:
        return _fused_attention(q, k, v, kv_layer, batch, scale)
    T, nh, hd = q.shape
    nkv = k.shape[1]
    g = nh // nkv
    q = q * scale  # once for every request and query chunk of the step
    if batch.native is not None:
        return batch.native(q, kv_layer, batch.tables, batch.lens, batch.max_len, batch.row_table)
    if batch.decode_only:
        return _grouped_decode(q, kv_layer, batch, nkv, g).view(T, nh, hd)
    out = torch.empty_like(q)
    if len(batch.decode_rows):
        out[batch.decode_rows] = _grouped_decode(q[batch.decode_rows], kv_layer, batch, nkv, g).view(-1, nh, hd)
    for p in batch.prefills:
        if p.kv_rows is None:  # no earlier context: attend to the chunk itself
            # contiguous once, not copied by every query chunk's matmul
            kp, vp = (x[p.start : p.start + p.num_new].transpose(0, 1).contiguous() for x in (k, v))  # (nkv, Q, hd)
        else:
            kp, vp = read_kv(kv_layer, p.kv_rows)  # (nkv, ctx, hd)
        first = p.ctx_len - p.num_new  # position of the first query
        # query chunks small enough that a chunk's scores stay a few MB
        step = max(1, SCORE_ELEMENTS // (nh * p.ctx_len))
        for q0 in range(0, p.num_new, step):
            q1 = min(p.num_new, q0 + step)
            ctx = first + q1  # keys past the chunk's last query are never seen
            qp = q[p.start + q0 : p.start + q1].view(q1 - q0, nkv, g, hd).permute(1, 2, 0, 3)  # (nkv, g, Qc, hd)
            hidden = batch.hidden_above_diagonal(q1 - q0, q.device)  # earlier keys all visible
            op = grouped_attention(qp, kp[:, :ctx], vp[:, :ctx], hidden, hidden_from=first + q0)  # (nkv, g, Qc, hd)
            out[p.start + q0 : p.start + q1].view(q1 - q0, nkv, g, hd).copy_(op.permute(2, 0, 1, 3))
    return out


def _grouped_decode(qd: torch.Tensor, kv_layer: torch.Tensor, batch: AttentionBatch, nkv: int, g: int) -> torch.Tensor:
    """The decode rows' queries qd (B, nh, hd), scaled, against their cache rows: (B, nkv, g, 1, hd)."""
    kd, vd = read_blocks(kv_layer, batch.decode_kv_blocks)  # (B, nkv, L, hd)
    return grouped_attention(qd.view(-1, nkv, g, 1, qd.shape[-1]), kd, vd, batch.decode_hidden[:, None, None])


def _fused_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: torch.Tensor, batch: AttentionBatch, scale: float
) -> torch.Tensor:
    """float32: torch's SDPA, the kernel transformers' default path runs."""
    out = torch.empty_like(q)
    if batch.decode_kv_blocks is not None:
        kd, vd = read_blocks(kv_layer, batch.decode_kv_blocks)  # (B, nkv, L, hd)
        qd = q[batch.decode_rows].unsqueeze(2)  # (B, nh, 1, hd)
        mask = batch.decode_mask[:, None]
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, scale=scale, enable_gqa=True)
        out[batch.decode_rows] = od.squeeze(2)
    for p in batch.prefills:
        rows = slice(p.start, p.start + p.num_new)
        qp = q[rows].transpose(0, 1)  # (nh, Q, hd)
        if p.kv_rows is None:  # no earlier context: attend to the chunk itself
            kp, vp = k[rows].transpose(0, 1), v[rows].transpose(0, 1)  # (nkv, Q, hd)
            op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=scale, enable_gqa=True)
        else:
            kp, vp = read_kv(kv_layer, p.kv_rows)  # (nkv, ctx, hd)
            first = p.ctx_len - p.num_new
            mask = _causal_mask(first, p.ctx_len, q.device)
            n = p.num_new
            if n < SDPA_MIN_QUERIES:  # the tail of a prompt whose start came from the prefix cache
                # SDPA sums 1-3 float32 queries in another order than 4 and more: repeat the last
                # query, so that the rows are bit for bit those of the whole prompt computed at once
                qp = torch.cat((qp, qp[:, -1:].expand(-1, SDPA_MIN_QUERIES - n, -1)), dim=1)
                mask = torch.cat((mask, mask[-1:].expand(SDPA_MIN_QUERIES - n, -1)))
            op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, scale=scale, enable_gqa=True)[:, :n]
        out[rows] = op.transpose(0, 1)
    return out


def _causal_mask(first: int, ctx_len: int, device: torch.device) -> torch.Tensor:
    """(Q, ctx) True where query at position first+i may see key j (j <= first+i)."""
    qpos = torch.arange(first, ctx_len, device=device)[:, None]
    return torch.arange(ctx_len, device=device)[None, :] <= qpos
