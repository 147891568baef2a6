"""A model's decoder layers run one native call each (``native/layer.c``), where every part of
a layer already runs natively: products (``NativeLinear``), element-wise ops and attention.

The same kernels run in the same order as the layer's Python path (models/llama.py), so the
bits are the same; what goes is ~16 Python-level calls a layer (~3 ms of a decode step of
the default model). The weights' pointers are gathered once; a step's inputs (rows, block
tables, RoPE tables, work space) once per step, for every layer.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from kvbridge.engine.attention import AttentionBatch
from kvbridge.engine.models.packed import NativeLinear
from kvbridge.engine.native import Kernels, data_ptr

if TYPE_CHECKING:
    from kvbridge.engine.models.llama import LlamaModel

_p, _i64, _f = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class _Weights(ctypes.Structure):  # struct layer_weights
    _fields_ = [
        *((n, _p) for n in ("norm_in", "norm_post", "qkv", "o", "gate_up", "down", "qkv_bias")),
        *((n, _p) for n in ("qkv_codes", "o_codes", "gate_up_codes", "down_codes")),
        *((n, ctypes.c_int32) for n in ("qkv_kind", "o_kind", "gate_up_kind", "down_kind")),
    ]


class _Step(ctypes.Structure):  # struct layer_step
    _fields_ = [
        *((n, _i64) for n in ("D", "nh", "nkv", "hd", "I")),
        ("eps", _f),
        ("scale", _f),
        ("T", _i64),
        ("cos", _p),
        ("sin", _p),
        *((n, _p) for n in ("rows", "tables", "lens", "row_table")),
        *((n, _i64) for n in ("bs", "width", "max_len")),
        ("work", _p),
        ("scratch", _p),
        ("nthreads", ctypes.c_int),
    ]


class NativeLayers:
    """``run(x, rope, kv_layers, batch, between_layers)`` for a model whose layers all run
    natively; ``for_model`` says whether they do (else None: the model keeps its Python path)."""

    def __init__(self, model: LlamaModel, kernels: Kernels) -> None:
        spec = model.spec
        self.fn, self.work_elems = kernels.lib.decoder_layer_bf16, kernels.lib.layer_work_elems  # typed by native.load()
        self.scratch_floats = kernels.paged_attention.scratch_floats
        self.shape = (spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.intermediate_size)
        self.eps, self.scale = spec.rms_norm_eps, model.layers[0].self_attn.scale
        self._keep = model  # the weights the pointers point into
        self.weights = []
        for layer in model.layers:
            a, mlp = layer.self_attn, layer.mlp
            self.weights.append(
                _Weights(
                    layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr(),
                    a.qkv_proj.packed.data_ptr(), a.o_proj.packed.data_ptr(),
                    mlp.gate_up_proj.packed.data_ptr(), mlp.down_proj.packed.data_ptr(), data_ptr(a.qkv_proj.bias),
                    *(data_ptr(m.codes) for m in (a.qkv_proj, a.o_proj, mlp.gate_up_proj, mlp.down_proj)),
                    *(m.codes_kind for m in (a.qkv_proj, a.o_proj, mlp.gate_up_proj, mlp.down_proj)),
                )  # fmt: skip
            )

    @classmethod
    def for_model(cls, model: LlamaModel, kernels: Kernels) -> NativeLayers | None:
        """NativeLayers when every product is a ``NativeLinear`` and the element-wise ops are
        native, on contiguous bfloat16 weights; else None."""
        for layer in model.layers:
            a, mlp = layer.self_attn, layer.mlp
            linears = (a.qkv_proj, a.o_proj, mlp.gate_up_proj, mlp.down_proj)
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            if layer.ops is None or not all(isinstance(m, NativeLinear) for m in linears):
                return None
            if a.o_proj.bias is not None or mlp.gate_up_proj.bias is not None or mlp.down_proj.bias is not None:
                return None
            if not all(w.dtype == torch.bfloat16 and w.is_contiguous() for w in norms):
                return None
        return cls(model, kernels)

    def run(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kv_layers: list[torch.Tensor], batch: AttentionBatch,
        between_layers: Callable[[], None] | None,
    ) -> torch.Tensor:  # fmt: skip
        """x (T, D) bf16 → the last layer's output (x is overwritten); batch.native must be set."""
        D, nh, nkv, hd, inter = self.shape
        T = x.shape[0]
        x = x.contiguous()
        cos, sin = (t.contiguous() for t in rope)
        threads = torch.get_num_threads()
        work = torch.empty(self.work_elems(T, D, nh, nkv, hd, inter), dtype=torch.bfloat16)
        scratch = torch.empty(threads * self.scratch_floats(nh // nkv, hd, batch.max_len), dtype=torch.float32)
        assert batch.tables is not None and batch.lens is not None
        step = _Step(
            D, nh, nkv, hd, inter, self.eps, self.scale, T, cos.data_ptr(), sin.data_ptr(),
            batch.write_rows.data_ptr(), batch.tables.data_ptr(), batch.lens.data_ptr(), data_ptr(batch.row_table),
            kv_layers[0].shape[3], batch.tables.shape[1], batch.max_len, work.data_ptr(), scratch.data_ptr(), threads,
        )  # fmt: skip
        ref, xp = ctypes.byref(step), x.data_ptr()
        for weights, kv_layer in zip(self.weights, kv_layers, strict=True):
            rc = self.fn(ctypes.byref(weights), ref, xp, kv_layer.data_ptr())
            if rc == 3:
                raise MemoryError("native decoder layer: attention is out of memory")
            if rc != 0:
                what = "a product" if rc == 1 else "attention"
                raise ValueError(f"native decoder layer: {what} cannot run this shape ({T} rows, {batch.max_len} tokens, {nh}/{nkv} heads of {hd})")
            if between_layers is not None:
                between_layers()
        return x
