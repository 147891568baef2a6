"""Token sampling: greedy, temperature, top-k, top-p, per-request seeds, logprobs."""

from __future__ import annotations

import torch

from kvbridge.engine.request import Request


def sample(logits: torch.Tensor, requests: list[Request]) -> tuple[list[int], list[float | None]]:
    """logits (N, V) float32, one row per request → chosen token ids and, where asked,
    the logprob of each chosen token under the model's own distribution."""
    greedy = all(r.params.greedy for r in requests)
    if greedy:
        tokens = argmax_rows(logits)
    else:
        tokens = [_sample_one(logits[i], r) for i, r in enumerate(requests)]
    logprobs: list[float | None] = [None] * len(requests)
    want = [i for i, r in enumerate(requests) if r.params.logprobs]
    if want:
        lp = torch.log_softmax(logits[want], dim=-1)
        for j, i in enumerate(want):
            logprobs[i] = float(lp[j, tokens[i]])
    return tokens, logprobs


def argmax_rows(logits: torch.Tensor) -> list[int]:
    """The first index of each row's largest value (a NaN counts as largest), as torch's
    ``argmax``; on CPU by numpy, whose argmax is vectorized: 8 rows of the default model's
    49152 logits took 287 µs in torch (1 row 47 µs), 25 µs in numpy (1 row 4.5 µs)."""
    if logits.device.type == "cpu":
        return logits.numpy().argmax(axis=-1).tolist()
    return logits.argmax(dim=-1).tolist()


def _sample_one(row: torch.Tensor, req: Request) -> int:
    p = req.params
    if p.greedy:
        return argmax_rows(row[None])[0]
    row = row / p.temperature
    if p.top_k > 0 and p.top_k < row.numel():
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, idx = torch.sort(row, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        cum = probs.cumsum(-1)
        drop = cum - probs > p.top_p  # keep the smallest set whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        row = torch.full_like(row, float("-inf")).scatter(0, idx, sorted_logits)
    probs = torch.softmax(row, dim=-1)
    gen = req.generator
    if gen is None and p.seed is not None:
        gen = req.generator = torch.Generator(device=row.device).manual_seed(p.seed)
    return int(torch.multinomial(probs, 1, generator=gen))  # type: ignore[arg-type]
