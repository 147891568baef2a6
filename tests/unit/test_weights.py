"""Weights: GGUF dequantization, llama.cpp's q/k permutation undone, safetensors folders, errors."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as ref_dequantize
from gguf.quants import quantize

from kvbridge.config import default_model_path
from kvbridge.engine.weights import WeightsError, dequantize, gguf_tensor, hf_tensor_names, load_model, read_gguf

transformers = pytest.importorskip("transformers")

GGUF_LAYER = {  # gguf suffix -> HF suffix
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias", "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight",
}


# -- helpers ----------------------------------------------------------------------------------

def _tiny_config(arch: str, tie: bool):
    cls = transformers.LlamaConfig if arch == "llama" else transformers.Qwen2Config
    return cls(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=50000.0,
               tie_word_embeddings=tie)


def _tiny_model(arch: str, tie: bool):
    torch.manual_seed(0)
    model_cls = transformers.LlamaForCausalLM if arch == "llama" else transformers.Qwen2ForCausalLM
    model = model_cls(_tiny_config(arch, tie)).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms and biases are not all-ones/zeros
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's permutation of q/k rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path: Path, arch: str, cfg, state: dict[str, torch.Tensor], qtype: Q) -> None:
    """Write an HF state dict as llama.cpp would (names, q/k permutation for llama, 2-D in ``qtype``)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for i in range(cfg.num_hidden_layers):
        names |= {f"model.layers.{i}.{h}": f"blk.{i}.{g}" for g, h in GGUF_LAYER.items()}
    for hname, t in state.items():
        if hname == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        a, gname = t.float().numpy(), names[hname]
        if arch == "llama" and gname.endswith(("attn_q.weight", "attn_k.weight")):
            a = _permute(a, cfg.num_attention_heads if "attn_q" in gname else cfg.num_key_value_heads)
        if a.ndim == 2 and qtype != Q.F32:
            w.add_tensor(gname, quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# -- dequantization ---------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_dequantize_matches_gguf(qtype: Q) -> None:
    x = np.random.default_rng(int(qtype)).standard_normal((8, 256)).astype(np.float32) * 3
    raw = x if qtype == Q.F32 else quantize(x, qtype)
    ours = dequantize(raw.view(np.uint8).reshape(-1), qtype, x.shape)
    assert ours.dtype == np.float32 and ours.shape == x.shape
    np.testing.assert_array_equal(ours, ref_dequantize(raw.view(np.uint8), qtype))


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q6_K, Q.Q4_K])
def test_dequantize_random_blocks(qtype: Q) -> None:
    """Every bit pattern of the quants, with finite f16 scales in the first bytes of each block."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(1).integers(0, 256, (64, size), dtype=np.uint8)
    if qtype in (Q.Q8_0, Q.Q4_0, Q.Q4_1):
        scales = np.random.default_rng(2).standard_normal((64, 2)).astype(np.float16)
        raw[:, : 2 * (1 + (qtype == Q.Q4_1))] = scales.view(np.uint8)[:, : 2 * (1 + (qtype == Q.Q4_1))]
    with np.errstate(invalid="ignore", over="ignore"):  # random K-quant scales may be inf/nan
        ours = dequantize(raw.reshape(-1), qtype, (64, block))
        np.testing.assert_array_equal(ours, ref_dequantize(raw, qtype).reshape(64, block))


def test_default_model_real_tensors_match_gguf() -> None:
    """Real Q8_0, Q4_1 and F32 tensors of the default model, against gguf's dequantizer.

    (The header parser itself is checked end to end against transformers' reader below.)"""
    f = read_gguf(default_model_path())
    assert len(f.tensors) == 272 and f.metadata["general.architecture"] == "llama"
    kinds = set()
    for name in ("token_embd.weight", "output_norm.weight", "blk.0.attn_q.weight", "blk.29.ffn_down.weight"):
        info = f.tensors[name]
        kind = Q(info.qtype)
        kinds.add(kind.name)
        block, size = gguf.GGML_QUANT_SIZES[kind]
        raw = f.raw(info, int(np.prod(info.shape)) // block * size).reshape(info.shape[0], -1)
        np.testing.assert_array_equal(gguf_tensor(f, name), ref_dequantize(raw, kind).reshape(info.shape), err_msg=name)
    assert kinds == {"F32", "Q8_0", "Q4_1"}


# -- the default model against transformers' GGUF loader --------------------------------------

@pytest.fixture(scope="module")
def default_weights():
    return load_model(default_model_path())


@pytest.fixture(scope="module")
def hf_state() -> dict[str, torch.Tensor]:
    p = Path(default_model_path())
    model = transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, torch_dtype=torch.float32)
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_default_spec(default_weights) -> None:
    spec, weights = default_weights
    assert (spec.architecture, spec.num_layers, spec.hidden_size, spec.num_heads, spec.num_kv_heads) == ("llama", 30, 576, 9, 3)
    assert (spec.head_dim, spec.rope_theta, spec.vocab_size, spec.intermediate_size) == (64, 100000.0, 49152, 1536)
    assert spec.tie_word_embeddings and not spec.attention_bias
    assert spec.name == "SmolLM2-135M-Instruct.Q4_1"
    assert list(weights) == hf_tensor_names(spec) or set(weights) == set(hf_tensor_names(spec))
    assert all(t.dtype == torch.float32 for t in weights.values())


@pytest.mark.parametrize("layer", [0, 1, 17, 29])
def test_default_model_equals_transformers(default_weights, hf_state, layer: int) -> None:
    _, weights = default_weights
    names = [f"model.layers.{layer}.{h}" for h in GGUF_LAYER.values() if not h.endswith("bias")]
    if layer == 0:
        names += ["model.embed_tokens.weight", "model.norm.weight"]
    for name in names:
        assert torch.equal(weights[name], hf_state[name]), name


# -- tiny models: GGUF written like llama.cpp, and HF safetensors folders ----------------------

@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q8_0])
def test_gguf_roundtrip_of_hf_model(tmp_path: Path, arch: str, qtype: Q) -> None:
    model = _tiny_model(arch, tie=arch == "qwen2")
    state = model.state_dict()
    path = tmp_path / f"tiny-{arch}.gguf"
    _write_gguf(path, arch, model.config, state, qtype)
    spec, weights = load_model(str(path))
    _, w16 = load_model(str(path), dtype=torch.bfloat16)
    assert all(torch.equal(w16[k], v.to(torch.bfloat16)) for k, v in weights.items())
    assert spec.architecture == arch and spec.attention_bias == (arch == "qwen2") and spec.name == f"tiny-{arch}"
    assert spec.tie_word_embeddings == (arch == "qwen2") and spec.head_dim == 16 and spec.num_kv_heads == 2
    assert set(weights) == set(hf_tensor_names(spec))
    for name, t in weights.items():
        expected = state[name].float()
        if qtype == Q.F32 or t.ndim == 1:
            assert torch.equal(t, expected), name
        else:  # quantized: the un-permutation must still line rows up exactly
            torch.testing.assert_close(t, expected, atol=0.02, rtol=0.02, msg=name)


@pytest.mark.parametrize("arch,tie", [("llama", False), ("qwen2", False), ("qwen2", True)])
def test_safetensors_folder(tmp_path: Path, arch: str, tie: bool) -> None:
    model = _tiny_model(arch, tie)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    spec, weights = load_model(str(tmp_path))
    cfg = model.config
    assert spec.architecture == arch and spec.name == tmp_path.name
    assert (spec.num_layers, spec.hidden_size, spec.intermediate_size, spec.vocab_size) == (2, 64, 96, 256)
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.rope_theta) == (4, 2, 16, 50000.0)
    assert spec.rms_norm_eps == cfg.rms_norm_eps and spec.max_position_embeddings == 512
    assert spec.tie_word_embeddings == tie and spec.attention_bias == (arch == "qwen2")
    state = model.state_dict()
    assert set(weights) == set(hf_tensor_names(spec)) == {k for k in state if not (tie and k == "lm_head.weight")}
    for name, t in weights.items():
        assert torch.equal(t, state[name]), name


def test_safetensors_single_file_and_head_dim(tmp_path: Path) -> None:
    model = _tiny_model("llama", tie=False)
    model.save_pretrained(tmp_path)
    assert not (tmp_path / "model.safetensors.index.json").exists()
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("head_dim", None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    spec, weights = load_model(str(tmp_path), dtype=torch.float16)
    assert spec.head_dim == 16 and weights["lm_head.weight"].dtype == torch.float16


# -- errors -----------------------------------------------------------------------------------

def test_error_missing_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found"):
        load_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(WeightsError, match="config.json"):
        load_model(str(tmp_path))
    assert issubclass(WeightsError, ValueError)


def test_error_unsupported_architecture(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(WeightsError, match="unsupported architecture 'gpt2'"):
        load_model(str(tmp_path / "g.gguf"))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(WeightsError, match="GPT2LMHeadModel"):
        load_model(str(tmp_path))


def test_error_unsupported_quant_type(tmp_path: Path) -> None:
    model = _tiny_model("llama", tie=True)
    path = tmp_path / "t.gguf"
    _write_gguf(path, "llama", model.config, model.state_dict(), Q.F32)
    # Rewrite one tensor's type id in the header to IQ2_XXS (same file otherwise).
    f = read_gguf(path)
    info = f.tensors["blk.0.ffn_up.weight"]
    data = bytearray(path.read_bytes())
    name = b"blk.0.ffn_up.weight"
    at = data.index(name) + len(name) + 4 + 8 * len(info.shape)  # after name, n_dims, dims
    data[at : at + 4] = int(Q.IQ2_XXS).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="unsupported quantization type IQ2_XXS") as e:
        load_model(str(path))
    assert "blk.0.ffn_up.weight" in str(e.value)


def test_error_missing_tensor(tmp_path: Path) -> None:
    model = _tiny_model("llama", tie=True)
    state = {k: v for k, v in model.state_dict().items() if "layers.1.mlp.up_proj" not in k}
    _write_gguf(tmp_path / "t.gguf", "llama", model.config, state, Q.F32)
    with pytest.raises(WeightsError, match="missing tensor blk.1.ffn_up.weight"):
        load_model(str(tmp_path / "t.gguf"))
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    from safetensors.torch import load_file, save_file

    st = load_file(folder / "model.safetensors")
    del st["model.layers.1.mlp.up_proj.weight"]
    save_file(st, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsError, match="missing tensor model.layers.1.mlp.up_proj.weight"):
        load_model(str(folder))


def test_error_truncated_or_not_gguf(tmp_path: Path) -> None:
    model = _tiny_model("llama", tie=True)
    path = tmp_path / "t.gguf"
    _write_gguf(path, "llama", model.config, model.state_dict(), Q.F32)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(WeightsError, match="truncated"):
        load_model(str(path))
    path.write_bytes(data[:200])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        load_model(str(path))
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(WeightsError, match="not a GGUF"):
        load_model(str(path))
