"""Mistral text decoder (Mistral Small 3.1: 40 layers, GQA 32/8, head_dim 128, RoPE θ=1e9, SwiGLU).

Math over a flat [num_tokens, hidden] batch. Module names equal the HF checkpoint's, so that the loader
is a name table.
"""

import torch
from torch import nn

from engine.config import TextConfig
from engine.forward_context import ForwardContext
from engine.layers.attention import causal_attention
from engine.layers.mlp import SwiGLU, linear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import apply_rotary, rope_1d


class MistralAttention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, \
            cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        self.q_proj = linear(cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim)
        self.k_proj = linear(cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim)
        self.v_proj = linear(cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim)
        self.o_proj = linear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        n = x.shape[0]
        q = apply_rotary(self.q_proj(x).view(n, self.num_heads, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).view(n, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        o = causal_attention(q, k, v, ctx, self.layer_idx, self.scale)
        return self.o_proj(o.reshape(n, -1))


class MistralDecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MistralAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h: torch.Tensor, cos, sin, ctx: ForwardContext) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, ctx)
        return h + self.mlp(self.post_attention_layernorm(h))


class MistralModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MistralDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """inputs_embeds: [tokens, hidden]; positions: [tokens] (0-based within each sequence)."""
        cos, sin = rope_1d(positions, self.cfg.head_dim, self.cfg.rope_theta, inputs_embeds.dtype)
        h = inputs_embeds
        for layer in self.layers:
            h = layer(h, cos, sin, ctx)
        return self.norm(h)


class MistralForCausalLM(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.model = MistralModel(cfg)
        self.lm_head = linear(cfg.hidden_size, cfg.vocab_size)   # untied from embed_tokens
