"""Turns a scheduled batch into tensors, runs the model, returns the logits to sample."""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvbridge.engine.attention import AttentionBatch, PrefillSeq, cache_blocks, cache_rows, token_rows
from kvbridge.engine.kv_cache import KVCache
from kvbridge.engine.models.llama import LlamaModel
from kvbridge.engine.native import PagedAttention
from kvbridge.engine.scheduler import ScheduledBatch


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache, native: PagedAttention | None = None) -> None:
        self.model = model
        self.native = native  # attention by the native kernel (bfloat16, CPU)
        self.kv = kv_cache
        self.device = kv_cache.device
        self.block_size = kv_cache.layout.block_size

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, AttentionBatch, list[int]]:
        """→ input_ids (T,), attention batch, indices (into batch.requests) of the sampling requests."""
        bs, nkv, dev = self.block_size, self.kv.layout.num_kv_heads, self.device
        long = dict(dtype=torch.long, device=dev)
        ids: list[int] = []
        positions: list[int] = []
        slot_blocks: list[int] = []
        logits_rows: list[int] = []
        sampling: list[int] = []
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillSeq] = []
        tables: list[list[int]] = []  # native: every request's blocks
        row_table: list[int] = []  # native: each row's request
        for i, (req, n) in enumerate(zip(batch.requests, batch.num_new_tokens)):
            c = req.num_computed_tokens
            row = len(ids)
            ids.extend(req.all_token_ids[c : c + n])
            positions.extend(range(c, c + n))
            slot_blocks.extend(req.block_ids[p // bs] for p in range(c, c + n))
            nblocks = -(-(c + n) // bs)
            if self.native is not None:
                tables.append(req.block_ids[:nblocks])
                row_table.extend([i] * n)
            elif n == 1 and c > 0:
                decode_rows.append(row)
                decode_tables.append(req.block_ids[:nblocks])
                decode_lens.append(c + 1)
            elif c == 0:
                prefills.append(PrefillSeq(row, n, n, None))
            else:
                table = torch.tensor(req.block_ids[:nblocks], **long)
                prefills.append(PrefillSeq(row, n, c + n, cache_rows(table, c + n, nkv, bs)))
            if batch.samples(i):
                logits_rows.append(row + n - 1)
                sampling.append(i)

        pos = torch.tensor(positions, **long)
        decode_kv_blocks = mask = None
        if decode_rows:
            padded = _padded(decode_tables, long)
            lens = torch.tensor(decode_lens, **long)
            decode_kv_blocks = cache_blocks(padded, nkv)  # (2, B, nkv, width)
            mask = (torch.arange(padded.shape[1] * bs, device=dev)[None, :] < lens[:, None])[:, None, :]  # (B, 1, L)
        native = {}
        if self.native is not None:
            native = dict(
                native=self.native,
                tables=_padded(tables, long),
                lens=pos + 1,
                max_len=max(positions, default=-1) + 1,
                # one row per request (a decode step): row i reads table i
                row_table=None if len(row_table) == len(tables) else torch.tensor(row_table, **long),
            )
        attn = AttentionBatch(
            positions=pos,
            write_rows=token_rows(torch.tensor(slot_blocks, **long), pos % bs, nkv, bs),
            logits_indices=torch.tensor(logits_rows, **long),
            decode_rows=torch.tensor(decode_rows, **long),
            decode_kv_blocks=decode_kv_blocks,
            decode_mask=mask,
            prefills=prefills,
            **native,
        )
        return torch.tensor(ids, **long), attn, sampling

    def execute(self, batch: ScheduledBatch, between_layers: Callable[[], None] | None = None) -> tuple[torch.Tensor, list[int]]:
        """Run one step. Returns logits (N, V) float32 on CPU and which requests they belong to."""
        input_ids, attn, sampling = self.prepare(batch)
        logits = self.model(input_ids, self.kv.layers, attn, between_layers)
        return logits.cpu() if logits.device.type != "cpu" else logits, sampling


def _padded(tables: list[list[int]], long: dict) -> torch.Tensor:
    """Block-id lists → (len(tables), longest) tensor, padded with block 0 (never read: each
    row's length bounds what it reads)."""
    width = max(len(t) for t in tables)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], **long)
