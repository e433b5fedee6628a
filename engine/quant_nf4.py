"""nf4 weights in bitsandbytes' layout (the QLoRA format), for merged projections.

bitsandbytes NF4, blocks of 64 weights, with the absmax of each block itself 8-bit quantized in blocks of
256 ("double quantization", as QLoRA and transformers' bnb_4bit_use_double_quant): 4.127 bits per weight.
Decoder linears of the 24B model: 11.5 GB instead of 44.5 GB.

A merged layer keeps each shard's quantization state apart, as a separate projection would have it: the
packed codes and the 8-bit block absmax are concatenated in row order (blocks never straddle rows), while
the second level (absmax2 per 256 blocks, the code map, the offset) is per shard. So quantizing a shard
while it loads gives the bytes a one-shot quantization of that projection gives, and a pre-quantized
checkpoint's shards are adopted bit for bit. `shard_rows` / `shard_base2` tell the Triton kernel where
each shard's rows and second-level scales start.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.layers import quant_matmul
from engine.layers.linear import Linear
from engine.quant import QuantMethod, decode_rows, default_kernel, require_bitsandbytes


class NF4Method(QuantMethod):
    name = "nf4"

    def create_weights(self, layer, device, dtype):
        # Blocks of 64 (every 24B matrix has K % 64 == 0). bitsandbytes 0.50.2's CPU dequantize kernel is
        # wrong when blocks straddle rows (K = 96: error 0.26 instead of 0.09), so test models whose K is
        # not a multiple of 64 get blocks of 32.
        blocksize = 64 if layer.in_features % 64 == 0 else 32
        if layer.in_features % blocksize:
            raise ValueError(f"nf4 needs in_features divisible by 32, got {layer.in_features}")
        layer.dtype, layer.kernel = dtype, default_kernel(device)
        self._allocate(layer, blocksize, device)

    def _allocate(self, layer: Linear, blocksize: int, device) -> None:
        k = layer.in_features
        blocks = [n * k // blocksize for n in layer.output_sizes]
        second = [-(-b // 256) for b in blocks]
        layer.blocksize = blocksize
        layer.block_starts = [sum(blocks[:s]) for s in range(len(blocks))]
        layer.second_starts = [sum(second[:s]) for s in range(len(second))]
        self.storage(layer, "weight", (layer.out_features * k // 2, 1), torch.uint8, device)   # 2 codes a byte
        self.storage(layer, "absmax", (sum(blocks),), torch.uint8, device)      # 8-bit codes of block absmax
        self.storage(layer, "absmax2", (sum(second),), torch.float32, device)
        self.storage(layer, "offset", (len(blocks),), torch.float32, device)
        self.storage(layer, "code2", (len(blocks), 256), torch.float32, device)
        starts = [layer.shard_slice(s).start for s in range(len(blocks))]
        layer.register_buffer("shard_rows", torch.tensor(starts, dtype=torch.int32, device=device), persistent=False)
        layer.register_buffer("shard_base2", torch.tensor(layer.second_starts, dtype=torch.int32, device=device),
                              persistent=False)
        layer.quant_states = [None] * len(blocks)

    def _blocks(self, layer: Linear, shard: int) -> slice:
        start = layer.block_starts[shard]
        return slice(start, start + layer.output_sizes[shard] * layer.in_features // layer.blocksize)

    def _second(self, layer: Linear, shard: int) -> slice:
        start = layer.second_starts[shard]
        blocks = layer.output_sizes[shard] * layer.in_features // layer.blocksize
        return slice(start, start + -(-blocks // 256))

    def quantize_rows(self, layer, shard, row, chunk):
        F_ = require_bitsandbytes("nf4").functional
        if row == layer.shard_slice(shard).start:   # float32 absmax of one shard exists only while it loads
            layer._absmax = torch.empty(self._blocks(layer, shard).stop - self._blocks(layer, shard).start,
                                        dtype=torch.float32, device=layer.weight.device)
        q, st = F_.quantize_4bit(chunk, blocksize=layer.blocksize, quant_type="nf4", compress_statistics=False)
        e0 = row * layer.in_features
        layer.weight[e0 // 2:e0 // 2 + q.shape[0]] = q
        b0 = e0 // layer.blocksize - layer.block_starts[shard]
        layer._absmax[b0:b0 + st.absmax.numel()] = st.absmax
        layer.nf4_code = st.code

    def finish_shard(self, layer, shard):
        """Double-quantize the shard's float absmax (what quantize_4bit(compress_statistics=True) does)."""
        F_ = require_bitsandbytes("nf4").functional
        absmax = layer.__dict__.pop("_absmax")
        offset = absmax.mean()
        qabsmax, st2 = F_.quantize_blockwise(absmax - offset, blocksize=256)
        layer.absmax[self._blocks(layer, shard)] = qabsmax
        layer.absmax2[self._second(layer, shard)] = st2.absmax
        layer.offset[shard] = offset
        layer.code2[shard] = st2.code
        self._set_state(layer, shard)

    def _set_state(self, layer: Linear, shard: int) -> None:
        """bitsandbytes' QuantState of one shard, over views of the layer's storage (the library path)."""
        F_ = require_bitsandbytes("nf4").functional
        state2 = F_.QuantState(absmax=layer.absmax2[self._second(layer, shard)], code=layer.code2[shard],
                               blocksize=256, dtype=torch.float32)
        shape = torch.Size([layer.output_sizes[shard], layer.in_features])
        layer.quant_states[shard] = F_.QuantState(
            absmax=layer.absmax[self._blocks(layer, shard)], shape=shape, code=layer.nf4_code,
            blocksize=layer.blocksize, quant_type="nf4", dtype=layer.dtype, offset=layer.offset[shard],
            state2=state2)

    def _packed(self, layer: Linear, shard: int) -> slice:
        rows = layer.shard_slice(shard)
        return slice(rows.start * layer.in_features // 2, rows.stop * layer.in_features // 2)

    @torch.no_grad()
    def load_prequantized_shard(self, layer: Linear, shard: int, parts: dict[str, torch.Tensor]) -> None:
        """Adopt a bitsandbytes 4-bit state as transformers saves it (`weight` + `weight.absmax`,
        `.quant_map`, `.nested_absmax`, `.nested_quant_map`, `.quant_state.bitsandbytes__nf4`; keys here
        without the `weight.` prefix): the checkpoint's codes are kept bit for bit. Without double
        quantization (a float32 absmax) the absmax is 8-bit quantized here, as for our own nf4."""
        F_ = require_bitsandbytes("nf4").functional
        dev = layer.weight.device
        st = F_.QuantState.from_dict({k: v for k, v in parts.items() if k != "weight"}, dev)
        shape = (layer.output_sizes[shard], layer.in_features)
        if st.quant_type != "nf4":
            raise ValueError(f"4-bit quant_type {st.quant_type!r}: only nf4 checkpoints are supported")
        if tuple(st.shape) != shape:
            raise ValueError(f"quantized shape {list(st.shape)}, expected {list(shape)}")
        if layer.in_features % st.blocksize:
            raise ValueError(f"blocks of {st.blocksize} straddle rows of {layer.in_features} weights: unsupported")
        if not torch.allclose(st.code.float().cpu(), torch.tensor(quant_matmul.NF4_CODE)):
            raise ValueError("quant_map is not the NF4 code book")
        if st.blocksize != layer.blocksize:          # storage was sized for our own block size
            if any(s is not None for s in layer.quant_states):
                raise ValueError(f"shards quantized with different block sizes ({st.blocksize} and "
                                 f"{layer.blocksize})")
            self._allocate(layer, st.blocksize, dev)
        packed = self._packed(layer, shard)
        if parts["weight"].numel() != packed.stop - packed.start:
            raise ValueError(f"{parts['weight'].numel()} packed bytes, expected {packed.stop - packed.start}")
        layer.weight[packed] = parts["weight"].reshape(-1, 1)
        layer.nf4_code = st.code
        blocks, second = self._blocks(layer, shard), self._second(layer, shard)
        if (st.state2 is not None and st.state2.blocksize == 256 and st.absmax.dtype == torch.uint8
                and st.state2.absmax.numel() == second.stop - second.start):
            layer.absmax[blocks] = st.absmax
            layer.absmax2[second] = st.state2.absmax
            layer.offset[shard] = st.offset
            layer.code2[shard] = st.state2.code
            self._set_state(layer, shard)
        else:                                       # plain float absmax (or another nesting): ours
            absmax = st.absmax.float() if st.state2 is None else \
                F_.dequantize_blockwise(st.absmax, st.state2) + st.offset
            layer._absmax = absmax.to(dev, torch.float32)
            self.finish_shard(layer, shard)

    def dequantize(self, layer: Linear) -> torch.Tensor:
        """The whole [out_features, in_features] matrix in the model dtype, shard by shard."""
        F_ = require_bitsandbytes("nf4").functional
        w = torch.empty(layer.out_features, layer.in_features, dtype=layer.dtype, device=layer.weight.device)
        for s in range(len(layer.output_sizes)):
            # (bitsandbytes' CPU backend has no out= variant: one shard-sized temporary at a time)
            w[layer.shard_slice(s)] = F_.dequantize_4bit(layer.weight[self._packed(layer, s)], layer.quant_states[s])
        return w

    def triton(self, layer: Linear, x2: torch.Tensor, **kw) -> torch.Tensor:
        return quant_matmul.nf4_matmul(x2, layer.weight, layer.absmax, layer.code2, layer.absmax2, layer.offset,
                                       layer.shard_rows, layer.shard_base2, layer.out_features, layer.in_features,
                                       layer.blocksize, **kw)

    def apply(self, layer, x):
        x2 = decode_rows(layer, x)
        if x2 is not None:
            return self.triton(layer, x2).view(*x.shape[:-1], layer.out_features)
        # larger batches: dequantize to the model dtype once, one GEMM (what bitsandbytes' matmul_4bit does
        # per projection beyond one row)
        return F.linear(x, self.dequantize(layer).to(x.dtype))
