"""Pixtral vision encoder: patch convolution, RMSNorm, 24 layers of 2-D RoPE attention + SwiGLU.

Images of different sizes are concatenated into one patch sequence; attention stays within each image.
"""

import torch
from torch import nn

from engine.config import VisionConfig
from engine.layers.attention.segment import segment_attention
from engine.layers.linear import Linear
from engine.layers.mlp import SwiGLU
from engine.layers.norm import RMSNorm
from engine.layers.rotary import apply_rotary, rope_2d


class PixtralAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        h = cfg.hidden_size
        self.qkv_proj = Linear(h, [h, h, h], ("q_proj", "k_proj", "v_proj"))
        self.o_proj = Linear(h, [h])

    def forward(self, x: torch.Tensor, cos, sin, lens: list[int]) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.o_proj(segment_attention(q, k, v, lens, self.head_dim ** -0.5).reshape(n, -1))


class PixtralLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, 1e-5)
        self.attention = PixtralAttention(cfg)
        self.ffn_norm = RMSNorm(cfg.hidden_size, 1e-5)
        self.feed_forward = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h, cos, sin, lens):
        h = h + self.attention(self.attention_norm(h), cos, sin, lens)
        return h + self.feed_forward(self.ffn_norm(h))


class PixtralTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(PixtralLayer(cfg) for _ in range(cfg.num_hidden_layers))


class PixtralVisionModel(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_conv = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        self.ln_pre = RMSNorm(cfg.hidden_size, 1e-5)
        self.transformer = PixtralTransformer(cfg)

    def forward(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """images: normalized [3, H, W] tensors, H and W multiples of the patch size (each its own size,
        never padded). Returns the last layer's [sum of patches, hidden] and each image's patch grid."""
        embeds, grids, rows, cols = [], [], [], []
        for img in images:
            p = self.patch_conv(img.unsqueeze(0).to(self.patch_conv.weight.dtype))[0]   # [hidden, h, w]
            h, w = p.shape[1:]
            embeds.append(p.flatten(1).t())                                              # row-major patches
            grids.append((h, w))
            r, c = torch.meshgrid(torch.arange(h, device=p.device), torch.arange(w, device=p.device),
                                  indexing="ij")
            rows.append(r.flatten())
            cols.append(c.flatten())
        x = self.ln_pre(torch.cat(embeds))
        cos, sin = rope_2d(torch.cat(rows), torch.cat(cols), self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        lens = [h * w for h, w in grids]
        for layer in self.transformer.layers:
            x = layer(x, cos, sin, lens)
        return x, grids
