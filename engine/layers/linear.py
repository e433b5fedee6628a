"""Bias-free linear layers whose weight is a concatenation of shards, stored and applied by a method object.

`Linear(n_in, [n_q, n_k, n_v], ("q_proj", "k_proj", "v_proj"))` is one projection, one GEMM, whose output
columns are the shards in order; the checkpoint still names each shard (`….q_proj.weight`), and the loader
(engine/weights.py) writes each one into its rows with `load_shard`. A layer with one shard and no shard
names is a plain linear named like the module.

The storage layout and the product belong to the layer's method (vLLM's LinearMethod): the unquantized
method here holds W in the model dtype; engine/quant.py's methods hold nf4 / int8 / fp8 storage and
quantize each shard while it loads. Quantization groups never straddle rows, so a shard quantized alone
gives exactly the bytes it gets as part of the merged matrix: quality and storage equal per-projection
quantization, with one launch instead of three (q/k/v) or two (gate/up).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearMethod:
    """How a Linear's weight is stored, filled and multiplied. One instance per layer."""
    name = "unquantized"
    quantized = False

    def create_weights(self, layer: Linear, device, dtype: torch.dtype | None) -> None:
        layer.weight = nn.Parameter(torch.empty(layer.out_features, layer.in_features, device=device, dtype=dtype),
                                    requires_grad=False)

    @torch.no_grad()
    def load_shard(self, layer: Linear, shard: int, w: torch.Tensor) -> None:
        """Write the full-precision shard `w` [rows of the shard, in_features] (host memory) into storage."""
        layer.weight[layer.shard_slice(shard)].copy_(w)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight)


class Linear(nn.Module):
    def __init__(self, in_features: int, output_sizes: list[int], shard_names: tuple[str, ...] | None = None):
        super().__init__()
        if shard_names is not None and len(shard_names) != len(output_sizes):
            raise ValueError(f"{len(output_sizes)} shards but names {shard_names}")
        self.in_features, self.output_sizes = in_features, tuple(output_sizes)
        self.out_features = sum(output_sizes)
        self.shard_names = shard_names
        self.create_weights(LinearMethod(), None, None)   # device/dtype of the construction context

    def create_weights(self, method: LinearMethod, device, dtype: torch.dtype | None) -> None:
        """Give the layer `method`'s (empty) storage on `device`."""
        self.method = method
        method.create_weights(self, device, dtype)

    def shard_slice(self, shard: int) -> slice:
        start = sum(self.output_sizes[:shard])
        return slice(start, start + self.output_sizes[shard])

    def load_shard(self, shard: int, w: torch.Tensor) -> None:
        if tuple(w.shape) != (self.output_sizes[shard], self.in_features):
            raise ValueError(f"weight {list(w.shape)} for a [{self.output_sizes[shard]}, {self.in_features}] "
                             f"shard")
        self.method.load_shard(self, shard, w)

    def load_(self, w: torch.Tensor) -> None:
        """Fill every shard from one [out_features, in_features] matrix."""
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight {list(w.shape)} for a [{self.out_features}, {self.in_features}] linear")
        for s in range(len(self.output_sizes)):
            self.load_shard(s, w[self.shard_slice(s)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x)

    def extra_repr(self) -> str:
        shards = f", shards={dict(zip(self.shard_names, self.output_sizes))}" if self.shard_names else ""
        return f"in_features={self.in_features}, out_features={self.out_features}{shards}, method={self.method.name}"
