"""Greedy choice: the sampler's argmax is torch's, ties and NaN included."""

from __future__ import annotations

import torch

from kvbridge.engine.sampler import argmax_rows


def test_argmax_rows_is_torchs_argmax_with_ties_and_nan():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 49152, generator=gen)
    top = logits.max()
    logits[1, [70, 30, 49000]] = top + 1  # a tie: the first index wins
    logits[2, 500] = float("nan")  # NaN counts as the largest
    logits[3, [10, 20]] = float("nan")
    logits[4] = float("-inf")
    logits[5, -1] = float("inf")
    with torch.inference_mode():
        got = argmax_rows(logits)
        assert got == logits.argmax(dim=-1).tolist()
        assert got[1:4] == [30, 500, 10]
        assert [argmax_rows(logits[i : i + 1])[0] for i in range(9)] == got
