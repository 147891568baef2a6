"""A decoder layer in one native call (models/native_layers.py) against the same layer run
part by part: the same logits and the same cache, bit for bit, on a small random model with
q/k/v biases (Qwen2), for two prompts in one step and then a decode step of both."""

from __future__ import annotations

import torch

from kvbridge.engine import native
from kvbridge.engine.attention import AttentionBatch, token_rows
from kvbridge.engine.engine import resolve_linear
from kvbridge.engine.kv_cache import KVCache, KVLayout
from kvbridge.engine.models.llama import LlamaModel
from kvbridge.engine.models.native_layers import NativeLayers
from kvbridge.engine.models.packed import native_linears
from kvbridge.engine.models.spec import ModelSpec

KERNELS = native.load()
SPEC = ModelSpec("qwen2", vocab_size=300, hidden_size=256, intermediate_size=352, num_layers=3, num_heads=4,
                 num_kv_heads=2, head_dim=64, rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=256,
                 tie_word_embeddings=False, attention_bias=True)  # fmt: skip
BS = 16


def model() -> LlamaModel:
    gen = torch.Generator().manual_seed(0)
    m = LlamaModel(SPEC, 256, torch.device("cpu")).to(torch.bfloat16)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.dim() == 1 else 0.08) + (1.0 if p.dim() == 1 else 0.0))
    native_linears(m, KERNELS.linear)
    m.use_native_ops(KERNELS.elementwise)
    return m


def batch(requests: list[tuple[list[int], list[int]]]) -> AttentionBatch:
    """(positions, block table) per request → one step's batch, native attention."""
    pos = torch.tensor([p for ps, _ in requests for p in ps])
    blocks = torch.tensor([t[p // BS] for ps, t in requests for p in ps])
    width = max(len(t) for _, t in requests)
    return AttentionBatch(
        positions=pos,
        write_rows=token_rows(blocks, pos % BS, SPEC.num_kv_heads, BS),
        logits_indices=torch.tensor(list(range(len(pos)))),
        decode_rows=torch.empty(0, dtype=torch.long),
        decode_kv_blocks=None,
        decode_mask=None,
        native=KERNELS.paged_attention,
        tables=torch.tensor([t + [0] * (width - len(t)) for _, t in requests]),
        lens=pos + 1,
        max_len=int(pos.max()) + 1,
        row_table=torch.tensor([i for i, (ps, _) in enumerate(requests) for _ in ps]),
    )


def test_one_call_a_layer_gives_the_logits_and_cache_of_the_layer_by_parts():
    if not KERNELS.linear.available:  # no AVX512-BF16: the engine never runs native products here
        assert resolve_linear("auto", "bfloat16", torch.device("cpu"), [SPEC.hidden_size]) is None
        return
    m = model()
    layers = NativeLayers.for_model(m, KERNELS)
    assert layers is not None
    tables = [[5, 2, 9], [0, 7]]
    steps = [
        batch([(list(range(37)), tables[0]), (list(range(20)), tables[1])]),  # two prompts
        batch([([37], tables[0]), ([20], tables[1])]),  # a decode of each
    ]
    ids = [torch.randint(0, SPEC.vocab_size, (57,), generator=torch.Generator().manual_seed(1)), torch.tensor([3, 4])]

    def run(fused: NativeLayers | None) -> tuple[list[torch.Tensor], torch.Tensor, int]:
        m.native_layers = fused
        kv = KVCache(KVLayout(SPEC.num_layers, 12, BS, SPEC.num_kv_heads, SPEC.head_dim, "bfloat16"))
        kv.storage.zero_()
        calls: list[int] = []
        with torch.inference_mode():
            logits = [m(x, kv.layers, b, lambda: calls.append(1)) for x, b in zip(ids, steps, strict=True)]
        return logits, kv.storage.clone(), len(calls)

    results = [run(layers), run(None)]
    (fused_logits, fused_kv, fused_calls), (part_logits, part_kv, part_calls) = results
    assert all(torch.equal(a, b) for a, b in zip(fused_logits, part_logits, strict=True))
    assert torch.equal(fused_kv, part_kv)
    assert fused_kv.abs().sum() > 0  # the prompts' K/V were stored
    assert fused_calls == part_calls == 2 * SPEC.num_layers
