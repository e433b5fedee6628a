"""Mistral3ForConditionalGeneration: Pixtral encoder + patch-merging projector + Mistral decoder.

Module tree = the HF 4.50 checkpoint's key names (`language_model.model.*`, `language_model.lm_head`,
`vision_tower.*`, `multi_modal_projector.*`), q/k/v and gate/up merged into projections whose shards keep
those names; engine/weights.py maps the other layouts onto them.
"""

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.forward_context import ForwardContext
from engine.layers.norm import RMSNorm
from engine.models.mistral import MistralForCausalLM
from engine.models.pixtral import PixtralVisionModel


class PatchMerger(nn.Module):
    """Concatenates each 2×2 block of patch features (channel-major: feature c*4 + dy*2 + dx, the order of
    F.unfold) and projects it back to the vision width: 4× fewer image tokens."""

    def __init__(self, hidden: int, merge: int):
        super().__init__()
        self.merge = merge
        self.merging_layer = nn.Linear(hidden * merge * merge, hidden, bias=False)

    def forward(self, x: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        out = []
        for feats, (h, w) in zip(x.split([h * w for h, w in grids]), grids):
            grid = feats.view(h, w, -1).permute(2, 0, 1).unsqueeze(0)
            out.append(F.unfold(grid, kernel_size=self.merge, stride=self.merge)[0].t())
        return self.merging_layer(torch.cat(out))


class Mistral3MultiModalProjector(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        v, t = cfg.vision, cfg.text
        self.norm = RMSNorm(v.hidden_size, t.rms_norm_eps)
        self.patch_merger = PatchMerger(v.hidden_size, cfg.spatial_merge_size)
        self.linear_1 = nn.Linear(v.hidden_size, t.hidden_size, bias=False)
        self.linear_2 = nn.Linear(t.hidden_size, t.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        x = self.patch_merger(self.norm(x), grids)
        return self.linear_2(F.gelu(self.linear_1(x)))   # exact (erf) GELU


class Mistral3ForConditionalGeneration(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_tower = PixtralVisionModel(cfg.vision)
        self.multi_modal_projector = Mistral3MultiModalProjector(cfg)
        self.language_model = MistralForCausalLM(cfg.text)

    def encode_images(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each image's embeddings for its [IMG] placeholders, in row-major order:
        [rows * cols, text hidden] per image (rows, cols = patch grid / spatial_merge_size)."""
        if not images:
            return []
        feats, grids = self.vision_tower(images)
        merged = self.multi_modal_projector(feats, grids)
        m = self.cfg.spatial_merge_size
        return list(merged.split([(h // m) * (w // m) for h, w in grids]))

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with image features placed at the [IMG] positions, in order. The caller passes
        exactly one feature row per [IMG] token of `input_ids` ([IMG_BREAK]/[IMG_END] keep their embeddings)."""
        h = self.language_model.model.embed_tokens(input_ids)
        if image_embeds is not None and image_embeds.numel():
            mask = (input_ids == self.cfg.image_token_id).unsqueeze(-1)
            h = h.masked_scatter(mask, image_embeds.to(h.dtype))
        return h

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext,
                image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states [tokens, hidden] for a flat batch; logits come from compute_logits on the
        rows that need them (only the last of each sequence while serving)."""
        return self.language_model.model(self.embed(input_ids, image_embeds), positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.lm_head(hidden)
