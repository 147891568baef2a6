"""Llama-family decoder (Llama, SmolLM, Qwen2 with q/k/v bias), written like the equations.

    h   = x + Attn(RMSNorm(x))          attention with RoPE, grouped-query heads, paged KV
    out = h + MLP(RMSNorm(h))           MLP(x) = W_down (silu(W_gate x) * (W_up x))

Tokens of all requests in a step are flattened into one batch of T tokens; only attention
needs to know which token belongs to which request (``AttentionBatch``). With ``ops`` set
(``LlamaModel.use_native_ops``: bfloat16 on CPU), RMSNorm with its residual add, RoPE and
SiLU(gate)·up run as one native call each (engine/native/elementwise.c), same roundings;
with the native attention kernel too, RoPE, q's scaling and the K/V store are one call, and
with native products as well a whole layer is one call (``native_layers.py``, same bits).
Notation: T tokens, D hidden, nh query heads, nkv KV heads, hd head dim.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from kvbridge.engine.attention import AttentionBatch, paged_attention, write_kv
from kvbridge.engine.models.packed import Linear
from kvbridge.engine.models.spec import ModelSpec
from kvbridge.engine.native import ElementwiseOps

if TYPE_CHECKING:
    from kvbridge.engine.models.native_layers import NativeLayers


class RMSNorm(nn.Module):
    ops: ElementwiseOps | None = None

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ops is not None:
            return self.ops.rmsnorm(x, self.weight, self.eps)
        # transformers' sequence and roundings, in every dtype: torch's fused F.rms_norm rounds
        # once, after the weight, and that flipped greedy answers of this small model in bfloat16
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Rotary:
    """cos/sin tables for positions 0..max_len-1 (float32, as HF computes them).

    The sin table's first half is negated, so that ``apply`` rotates without a negation:
    (-x2) * sin and x2 * (-sin) are the same number, bit for bit."""

    def __init__(self, head_dim: int, base: float, max_len: int, device: torch.device) -> None:
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float().to(device) / head_dim))
        pos = torch.arange(max_len, dtype=torch.float32, device=device)
        freqs = pos[:, None] * inv_freq[None, :]  # (L, hd/2)
        self.cos = torch.cat((freqs, freqs), dim=-1).cos()  # (L, hd)
        sin = freqs.sin()
        self.signed_sin = torch.cat((-sin, sin), dim=-1)  # (L, hd)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin (T, 1, hd) of a step's positions: once per step, shared by every layer."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.signed_sin[positions].unsqueeze(1).to(dtype)

    @staticmethod
    def apply(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        # x: (T, heads, hd); rotate_half pairs dimension i with i + hd/2: x * cos + (-x2, x1) * sin
        cos, signed_sin = cos_sin
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((x2, x1), dim=-1) * signed_sin


class Attention(nn.Module):
    ops: ElementwiseOps | None = None

    def __init__(self, spec: ModelSpec, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.nh, self.nkv, self.hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        q, kv = self.nh * self.hd, self.nkv * self.hd
        self.split = (q, kv, kv)
        self.qkv_proj = Linear(spec.hidden_size, q + 2 * kv, bias=spec.attention_bias)  # fused q|k|v
        self.o_proj = Linear(q, spec.hidden_size, bias=False)
        self.scale = self.hd**-0.5

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kv_layer: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        T = x.shape[0]
        qkv = self.qkv_proj(x)
        if self.ops is not None and batch.native is not None:  # the native kernel reads K/V from the cache only
            q = self.ops.rope_store(qkv, self.nh, self.nkv, self.hd, *rope, self.scale, kv_layer, batch.write_rows)
            out = batch.native(q, kv_layer, batch.tables, batch.lens, batch.max_len, batch.row_table)
            return self.o_proj(out.view(T, self.nh * self.hd))
        if self.ops is not None:  # q and k are neighbours in the fused projection: one rotation for both
            self.ops.rope_(qkv, self.nh + self.nkv, self.hd, *rope)
            q, k, v = (part.view(T, -1, self.hd) for part in qkv.split(self.split, dim=-1))
        else:
            q_k, v = qkv.split((self.split[0] + self.split[1], self.split[2]), dim=-1)
            q, k = Rotary.apply(q_k.view(T, self.nh + self.nkv, self.hd), rope).split((self.nh, self.nkv), dim=1)
            v = v.view(T, self.nkv, self.hd)
        write_kv(kv_layer, k, v, batch)
        out = paged_attention(q, k, v, kv_layer, batch, self.scale)  # (T, nh, hd)
        return self.o_proj(out.reshape(T, self.nh * self.hd))


class MLP(nn.Module):
    ops: ElementwiseOps | None = None

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.inter = spec.intermediate_size
        self.gate_up_proj = Linear(spec.hidden_size, 2 * spec.intermediate_size, bias=False)  # fused gate|up
        self.down_proj = Linear(spec.intermediate_size, spec.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ops is not None:
            return self.down_proj(self.ops.silu_mul(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    ops: ElementwiseOps | None = None

    def __init__(self, spec: ModelSpec, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec, layer_idx)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kv_layer: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
        a = self.self_attn(self.input_layernorm(x), rope, kv_layer, batch)
        if self.ops is not None:
            norm = self.post_attention_layernorm
            h, m = self.ops.add_rmsnorm(x, a, norm.weight, norm.eps)
            return h + self.mlp(m)
        h = x + a
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, spec: ModelSpec, max_len: int, device: torch.device) -> None:
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.rope = Rotary(spec.head_dim, spec.rope_theta, max_len, device)
        self.native_layers: NativeLayers | None = None  # set where every part of a layer runs natively
        self.requires_grad_(False)

    @torch.inference_mode()
    def forward(
        self, input_ids: torch.Tensor, kv_layers: list[torch.Tensor], batch: AttentionBatch, between_layers: Callable[[], None] | None = None
    ) -> torch.Tensor:
        """input_ids (T,) → logits (N, vocab) at ``batch.logits_indices`` (float32);
        ``between_layers`` runs after each layer."""
        x = self.embed_tokens(input_ids)  # (T, D)
        rope = self.rope.tables(batch.positions, x.dtype)
        if self.native_layers is not None and batch.native is not None:  # the same kernels, one call a layer
            x = self.native_layers.run(x, rope, kv_layers, batch, between_layers)
        else:
            for layer, kv_layer in zip(self.layers, kv_layers):
                x = layer(x, rope, kv_layer, batch)
                if between_layers is not None:
                    between_layers()
        x = self.norm(x[batch.logits_indices])  # (N, D)
        return self.lm_head(x).float()

    def use_native_ops(self, ops: ElementwiseOps) -> None:
        """Run the element-wise parts of every layer natively (bfloat16 on CPU)."""
        for m in self.modules():
            if isinstance(m, (RMSNorm, Attention, MLP, DecoderLayer)):
                m.ops = ops

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Take HF-named tensors (see weights.py); fuse q|k|v and gate|up."""

        def take(name: str) -> torch.Tensor:
            if name not in weights:
                raise KeyError(f"weight {name!r} missing from the checkpoint")
            return weights[name]

        def put(param: torch.Tensor, value: torch.Tensor, name: str) -> None:
            if param.shape != value.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(value.shape)} != model shape {tuple(param.shape)}")
            param.copy_(value)

        with torch.no_grad():
            put(self.embed_tokens.weight, take("model.embed_tokens.weight"), "embed_tokens")
            put(self.norm.weight, take("model.norm.weight"), "norm")
            head = weights.get("lm_head.weight")
            if head is None or self.spec.tie_word_embeddings:
                head = take("model.embed_tokens.weight")
            put(self.lm_head.weight, head, "lm_head")
            for i, layer in enumerate(self.layers):
                p = f"model.layers.{i}."
                a = layer.self_attn
                qkv = torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
                put(a.qkv_proj.weight, qkv, p + "qkv")
                if a.qkv_proj.bias is not None:
                    put(a.qkv_proj.bias, torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"]), p + "qkv.bias")
                put(a.o_proj.weight, take(p + "self_attn.o_proj.weight"), p + "o_proj")
                gate_up = torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")])
                put(layer.mlp.gate_up_proj.weight, gate_up, p + "gate_up")
                put(layer.mlp.down_proj.weight, take(p + "mlp.down_proj.weight"), p + "down_proj")
                put(layer.input_layernorm.weight, take(p + "input_layernorm.weight"), p + "input_layernorm")
                put(layer.post_attention_layernorm.weight, take(p + "post_attention_layernorm.weight"), p + "post_norm")
