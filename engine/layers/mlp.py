import torch
import torch.nn.functional as F
from torch import nn


def linear(n_in: int, n_out: int) -> nn.Linear:
    """Every projection of this model is bias-free."""
    return nn.Linear(n_in, n_out, bias=False)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the feed-forward block of both the decoder and the vision encoder."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = linear(hidden, intermediate)
        self.up_proj = linear(hidden, intermediate)
        self.down_proj = linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
