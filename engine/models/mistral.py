"""Mistral text decoder (Mistral Small 3.1: 40 layers, GQA 32/8, head_dim 128, RoPE θ=1e9, SwiGLU).

Math over a flat [num_tokens, hidden] batch. Module names follow the HF checkpoint's, except that q/k/v
and gate/up are merged projections (`qkv_proj`, `gate_up_proj`) whose shards keep the checkpoint's names:
the loader (engine/weights.py) maps every checkpoint tensor onto a shard.
"""

import torch
from torch import nn

from engine.config import TextConfig
from engine.forward_context import ForwardContext
from engine.layers.attention import Attention
from engine.layers.linear import Linear
from engine.layers.mlp import SwiGLU
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding, apply_rotary_qk


class MistralAttention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, \
            cfg.head_dim
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, [q, kv, kv], ("q_proj", "k_proj", "v_proj"))
        self.o_proj = Linear(q, [cfg.hidden_size])
        self.attn = Attention(layer_idx, cfg.head_dim ** -0.5)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        n, d = x.shape[0], self.head_dim
        q, k, v = self.qkv_proj(x).split([self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], -1)
        q, k = apply_rotary_qk(q.view(n, self.num_heads, d), k.view(n, self.num_kv_heads, d), cos, sin)
        o = self.attn(q, k, v.view(n, self.num_kv_heads, d), ctx)
        return self.o_proj(o.reshape(n, -1))


class MistralDecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MistralAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, cos, sin, ctx: ForwardContext):
        """h: the previous block's output, not yet added to `residual` (None before the first layer).
        Returns this layer's MLP output and the residual stream before it."""
        if residual is None:
            x, residual = self.input_layernorm(h), h
        else:
            x, residual = self.input_layernorm(h, residual)
        x, residual = self.post_attention_layernorm(self.self_attn(x, cos, sin, ctx), residual)
        return self.mlp(x), residual


class MistralModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MistralDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings)

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """inputs_embeds: [tokens, hidden]; positions: [tokens] (0-based within each sequence)."""
        cos, sin = self.rotary(positions, inputs_embeds.dtype)
        h, residual = inputs_embeds, None
        for layer in self.layers:
            h, residual = layer(h, residual, cos, sin, ctx)
        return self.norm(h, residual)[0] if residual is not None else self.norm(h)


class MistralForCausalLM(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.model = MistralModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)   # untied from embed_tokens
