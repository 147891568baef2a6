"""The chat workload of `kvbridge bench serve` is what it says: ~200-token prompts as the model
sees them (chat template and default system prompt included), as in the vLLM comparison."""

from __future__ import annotations

import statistics

from kvbridge.bench.serve import chat_prompt
from kvbridge.config import default_model_path
from kvbridge.engine.tokenizer import Tokenizer


def test_chat_prompts_are_about_200_tokens_with_the_template():
    tok = Tokenizer.load(default_model_path())
    lengths = [len(tok.encode(tok.apply_chat_template(chat_prompt(i)))) for i in range(48)]
    assert 180 <= statistics.fmean(lengths) <= 220, lengths
    assert len(set(tok.apply_chat_template(chat_prompt(i)) for i in range(48))) == 48  # no two alike: no prefix-cache replay
