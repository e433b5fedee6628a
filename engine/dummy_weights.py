"""Random weights made on the device, for `load_format="dummy"` (vLLM's name): a 24B-shape model in seconds,
with no checkpoint on disk, for benchmarks and GPU checks.

Every tensor the real checkpoint has is listed from the config alone (`checkpoint_tensors`, in the
checkpoint's own names for each format, independent of how our modules are laid out) and generated on the
target device, deterministically from (seed, tensor name): each tensor gets its own torch.Generator seeded
from a hash of both, so any process that knows a tensor's checkpoint name makes the same values on the same
kind of device (the transformers baseline of benchmarks/gpu_check.py does). `DummyWeights` reads like a
safetensors file, so the loader treats these tensors exactly as it treats real ones: name table, RoPE
permutation, quantization while loading, strict checks.

Values: bf16, like the published checkpoint; matrices ~ N(0, 0.02²) (a common initializer range), RMSNorm
weights 1. At the real shapes this keeps activations finite in bf16 through all 40 layers (each layer adds
an O(1) update to the residual stream, which the next norm rescales), and logits near N(0, 1.4²).
"""

from __future__ import annotations

import hashlib
from typing import Self

import torch

from engine.config import ModelConfig

DUMMY_STD = 0.02
DUMMY_DTYPE = "BF16"            # safetensors' name for the dtype the tensors come in


def checkpoint_tensors(cfg: ModelConfig, fmt: str) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a full-precision checkpoint of `cfg`: "hf" (transformers 4.50 keys)
    or "mistral" (consolidated.safetensors keys). Native q/k have the HF shapes, rows in interleaved order."""
    if fmt not in ("hf", "mistral"):
        raise ValueError(f"checkpoint format must be 'hf' or 'mistral', got {fmt!r}")
    t, v, m = cfg.text, cfg.vision, cfg.spatial_merge_size
    h, q, kv, hv = t.hidden_size, t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim, v.hidden_size
    hf = fmt == "hf"
    out = {
        ("language_model.model.embed_tokens.weight" if hf else "tok_embeddings.weight"): (t.vocab_size, h),
        ("language_model.model.norm.weight" if hf else "norm.weight"): (h,),
        ("language_model.lm_head.weight" if hf else "output.weight"): (t.vocab_size, h),
    }
    layer = {("input_layernorm", "attention_norm"): (h,), ("post_attention_layernorm", "ffn_norm"): (h,),
             ("self_attn.q_proj", "attention.wq"): (q, h), ("self_attn.k_proj", "attention.wk"): (kv, h),
             ("self_attn.v_proj", "attention.wv"): (kv, h), ("self_attn.o_proj", "attention.wo"): (h, q),
             ("mlp.gate_proj", "feed_forward.w1"): (t.intermediate_size, h),
             ("mlp.down_proj", "feed_forward.w2"): (h, t.intermediate_size),
             ("mlp.up_proj", "feed_forward.w3"): (t.intermediate_size, h)}
    for i in range(t.num_hidden_layers):
        for (hf_name, native), shape in layer.items():
            out[f"language_model.model.layers.{i}.{hf_name}.weight" if hf else f"layers.{i}.{native}.weight"] = shape
    vt = "vision_tower." if hf else "vision_encoder."
    out[vt + "patch_conv.weight"] = (hv, v.num_channels, v.patch_size, v.patch_size)
    out[vt + "ln_pre.weight"] = (hv,)
    vlayer = {("attention_norm", "attention_norm"): (hv,), ("ffn_norm", "ffn_norm"): (hv,),
              **{(f"attention.{x}_proj", f"attention.w{x}"): (hv, hv) for x in "qkvo"},
              ("feed_forward.gate_proj", "feed_forward.w1"): (v.intermediate_size, hv),
              ("feed_forward.down_proj", "feed_forward.w2"): (hv, v.intermediate_size),
              ("feed_forward.up_proj", "feed_forward.w3"): (v.intermediate_size, hv)}
    for j in range(v.num_hidden_layers):
        for (hf_name, native), shape in vlayer.items():
            out[f"{vt}transformer.layers.{j}.{hf_name if hf else native}.weight"] = shape
    proj = {("multi_modal_projector.norm", "pre_mm_projector_norm"): (hv,),
            ("multi_modal_projector.patch_merger.merging_layer", "patch_merger.merging_layer"): (hv, hv * m * m),
            ("multi_modal_projector.linear_1", "vision_language_adapter.w_in"): (h, hv),
            ("multi_modal_projector.linear_2", "vision_language_adapter.w_out"): (h, h)}
    for (hf_name, native), shape in proj.items():
        out[(hf_name if hf else native) + ".weight"] = shape
    return out


def tensor_seed(name: str, seed: int = 0) -> int:
    """A 63-bit generator seed from (seed, checkpoint tensor name): stable across processes and Python runs."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def dummy_tensor(name: str, shape, seed: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """The dummy value of checkpoint tensor `name`: bf16 on `device`, made there. 1-D tensors are the
    RMSNorm weights (the model has no biases): ones. Everything else ~ N(0, DUMMY_STD²)."""
    device = torch.device(device)
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16, device=device)
    gen = torch.Generator(device=device).manual_seed(tensor_seed(name, seed))
    w = torch.randn(shape, generator=gen, dtype=torch.float32, device=device)
    return w.mul_(DUMMY_STD).to(torch.bfloat16)


class _Slice:
    def __init__(self, shape: tuple[int, ...]):
        self._shape = shape

    def get_shape(self) -> list[int]:
        return list(self._shape)

    def get_dtype(self) -> str:
        return DUMMY_DTYPE


class DummyWeights:
    """A stand-in for `safetensors.safe_open(...)` over the tensors of `checkpoint_tensors(cfg, fmt)`:
    `keys()`, `get_slice(key).get_shape()/.get_dtype()` (no data made) and `get_tensor(key)` (made on
    `device`)."""

    def __init__(self, cfg: ModelConfig, fmt: str, device: torch.device | str = "cpu", seed: int = 0):
        self.shapes = checkpoint_tensors(cfg, fmt)
        self.device, self.seed = torch.device(device), seed

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def keys(self) -> list[str]:
        return list(self.shapes)

    def get_slice(self, key: str) -> _Slice:
        return _Slice(self.shapes[key])

    def get_tensor(self, key: str) -> torch.Tensor:
        return dummy_tensor(key, self.shapes[key], self.seed, self.device)
