"""Weight-quantized decoder linears (nf4 and int8 through bitsandbytes, fp8 with per-channel scales) and
the constants of the fp8 KV cache.

What is quantized: the four projections of every text decoder layer (merged q/k/v, o, merged gate/up,
down): 22.2 B of the 24.0 B parameters, 44.5 of 48.0 GB in bf16. The embedding, lm_head, norms, vision
tower and projector stay in the model dtype: they are 3.6 GB together, the lm_head and embedding are the
tensors most sensitive to rounding, and the vision tower runs once per image, not once per token.

Each quantization is a LinearMethod (engine/layers/linear.py) given to those layers by `materialize`: the
layer holds only the quantized storage, on the target device, and `load_shard(w)` takes a checkpoint
tensor (host memory) and quantizes it chunk by chunk on that device into its rows, so no full-precision
copy of a quantized matrix ever exists there (one chunk at a time). Every shard (q, k, v; gate, up) is
quantized on its own, exactly as a separate projection would be. The storage is held in Parameters
(requires_grad=False), so `model.parameters()` counts the real footprint.

Kernels (`layer.kernel`): on CUDA, batches of up to `quant_matmul.MAX_ROWS` tokens (decode) go through our
Triton weight-only kernels, which read the same storage (engine/layers/quant_matmul.py says why
bitsandbytes' 4-bit path is not used there); larger batches (prefill) dequantize nf4 into one matrix for
one GEMM and use `torch._scaled_mm` for fp8. On CPU the library/reference paths run; tests drive the
Triton kernels there through Triton's interpreter.
"""

from __future__ import annotations

import functools
import logging
import re

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import QUANTIZATIONS
from engine.layers import quant_matmul
from engine.layers.linear import Linear, LinearMethod

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0                 # largest finite float8_e4m3fn; values beyond it would become NaN
CHUNK_ELEMENTS = 1 << 20        # full-precision elements quantized at once: 4 MiB in float32
_LINEAR = re.compile(r"language_model\.model\.layers\.\d+\.(self_attn\.(qkv|o)_proj|mlp\.(gate_up|down)_proj)")
_bnb = None
log = logging.getLogger(__name__)


class _DropMessages(logging.Filter):
    """bitsandbytes notices that say nothing actionable: the optional CPU kernel from the HF Hub (the
    built-in one is used instead) and, on every int8 call, that activations are cast to fp16 (the LLM.int8
    scheme: documented in weights.md)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Failed to load CPU gemm_4bit_forward",
                                               "MatMul8bitLt: inputs will be cast"))


for _name in ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions"):
    logging.getLogger(_name).addFilter(_DropMessages())


def require_bitsandbytes(method: str):
    """bitsandbytes, or an ImportError naming the extra to install; never a silent fallback."""
    global _bnb
    if _bnb is None:
        try:
            import bitsandbytes
        except ImportError as e:
            raise ImportError(f"quantization={method!r} needs bitsandbytes, which is not installed: "
                              "pip install 'mistral-small-engine[quant]' (or 'bitsandbytes>=0.45')") from e
        _bnb = bitsandbytes
    return _bnb


def check_quantization(method: str | None) -> None:
    """Fails before any weight is read: unknown method, or its library missing."""
    if method is None:
        return
    if method not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS} or None, got {method!r}")
    if method in ("nf4", "int8"):
        require_bitsandbytes(method)


def is_quantized(module_name: str) -> bool:
    return _LINEAR.fullmatch(module_name) is not None


def linear_method(method: str) -> LinearMethod:
    from engine.quant_nf4 import NF4Method
    return {"nf4": NF4Method, "int8": Int8Method, "fp8": FP8Method}[method]()


def make_linear(method: str, n_in: int, n_out: int, device, dtype: torch.dtype) -> Linear:
    """A one-shard linear with `method`'s empty storage on `device` (tests and benchmarks)."""
    with torch.device("meta"):
        layer = Linear(n_in, [n_out])
    layer.create_weights(linear_method(method), device, dtype)
    return layer


def quantized_linears(model: nn.Module) -> dict[str, Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Linear) and m.method.quantized}


def default_kernel(device) -> str:
    """"triton" where the decode kernels can run (CUDA with Triton), else "library" (bitsandbytes for
    nf4 and int8, torch for fp8). Both compute the same quantized product; only speed differs."""
    if torch.device(device).type != "cuda":
        return "library"
    return "triton" if _triton_available() else "library"


@functools.cache
def _triton_available() -> bool:
    if not quant_matmul.available():     # said once, not once per linear
        log.warning("Triton is not installed: quantized decode uses the library kernels (slower)")
    return quant_matmul.available()


def set_kernel(model: nn.Module, kernel: str) -> None:
    """Choose the decode kernel of every nf4/fp8 linear ("triton" or "library"), e.g. to benchmark both."""
    if kernel not in ("triton", "library"):
        raise ValueError(f"kernel must be 'triton' or 'library', got {kernel!r}")
    for m in quantized_linears(model).values():
        if m.method.name in ("nf4", "fp8"):
            m.kernel = kernel


def decode_rows(layer: Linear, x: torch.Tensor) -> torch.Tensor | None:
    """x as [rows, K] when the Triton decode kernel should take it, else None."""
    if layer.kernel != "triton":
        return None
    x2 = x.reshape(-1, layer.in_features)
    return x2 if x2.shape[0] <= quant_matmul.MAX_ROWS else None


BNB_4BIT_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4",
                  "quant_state.bitsandbytes__fp4")


def dequantize_prequantized(parts: dict[str, torch.Tensor], shape) -> torch.Tensor:
    """A bitsandbytes 4-bit tensor of a checkpoint, for a module we keep in full precision (e.g. a quantized
    vision tower): its exact dequantized values, float32 on the CPU."""
    F_ = require_bitsandbytes("nf4").functional
    st = F_.QuantState.from_dict({k: v for k, v in parts.items() if k != "weight"}, torch.device("cpu"))
    if tuple(st.shape) != tuple(shape):
        raise ValueError(f"quantized shape {list(st.shape)}, expected {list(shape)}")
    st.dtype = torch.float32
    return F_.dequantize_4bit(parts["weight"], st)


class QuantMethod(LinearMethod):
    """A quantized storage filled shard by shard, `CHUNK_ELEMENTS` full-precision elements at a time."""
    quantized = True

    def storage(self, layer: Linear, name: str, shape, dtype: torch.dtype, device) -> None:
        setattr(layer, name, nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False))

    @torch.no_grad()
    def load_shard(self, layer: Linear, shard: int, w: torch.Tensor) -> None:
        dev, first = layer.weight.device, layer.shard_slice(shard).start
        rows = max(1, CHUNK_ELEMENTS // layer.in_features)
        for r0 in range(0, w.shape[0], rows):     # a float32 copy of `rows` rows, ours to modify
            self.quantize_rows(layer, shard, first + r0, w[r0:r0 + rows].to(dev, torch.float32, copy=True))
        self.finish_shard(layer, shard)

    def quantize_rows(self, layer: Linear, shard: int, row: int, chunk: torch.Tensor) -> None:
        raise NotImplementedError

    def finish_shard(self, layer: Linear, shard: int) -> None:
        pass


class Int8Method(QuantMethod):
    """bitsandbytes LLM.int8(): int8 weights with one absmax scale per output row; at run time the
    activations are quantized per token to int8 (through fp16), except outlier feature columns
    (|x| > 6.0), which are multiplied in 16-bit. 8 bits + 4 bytes per row: 22.3 GB of decoder linears.
    The outliers are chosen per batch (data-dependent shapes): no CUDA graphs with int8."""
    name = "int8"
    threshold = 6.0

    def create_weights(self, layer, device, dtype):
        self.storage(layer, "weight", (layer.out_features, layer.in_features), torch.int8, device)
        self.storage(layer, "scale", (layer.out_features,), torch.float32, device)
        state = require_bitsandbytes("int8").MatmulLtState()
        # is_training=False selects the int8 kernel path on every device (True means dequantize + matmul
        # on CPU); has_fp16_weights=False: CB/SCB are the only copy of the weights.
        state.CB, state.SCB, state.threshold = layer.weight, layer.scale, self.threshold
        state.has_fp16_weights, state.is_training = False, False
        layer.int8_state = state

    def quantize_rows(self, layer, shard, row, chunk):
        # fp16 in: the CUDA kernel takes fp16 only; bf16 checkpoint weights are exact in fp16 (|w| << 65504)
        cb, scb, _ = require_bitsandbytes("int8").functional.int8_vectorwise_quant(chunk.half())
        layer.weight[row:row + cb.shape[0]] = cb
        layer.scale[row:row + cb.shape[0]] = scb

    def apply(self, layer, x):
        return require_bitsandbytes("int8").matmul(x, layer.weight, state=layer.int8_state)


def scaled_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """cuBLASLt fp8 GEMMs with row-wise scales: compute capability 8.9 (Ada) / 9.0 (Hopper) and newer,
    bf16 output only."""
    return (device.type == "cuda" and dtype == torch.bfloat16
            and torch.cuda.get_device_capability(device) >= (8, 9))


class FP8Method(QuantMethod):
    """float8_e4m3fn weights, one float32 scale per output channel (row absmax / 448): 8.03 bits per weight,
    22.3 GB of decoder linears. On Ada/Hopper, decode batches (<= 64 tokens) take the Triton weight-only
    kernel (W8A16: fp8 weights converted in registers, 16-bit activations); larger batches (`use_scaled_mm`)
    quantize activations per token to fp8 on the fly and `torch._scaled_mm` multiplies with row-wise scales
    (W8A8, twice the tensor-core rate of bf16). Elsewhere, the CPU included, the reference path dequantizes
    the weight to the model dtype and multiplies (W8A16)."""
    name = "fp8"

    def create_weights(self, layer, device, dtype):
        self.storage(layer, "weight", (layer.out_features, layer.in_features), FP8, device)
        self.storage(layer, "scale", (layer.out_features,), torch.float32, device)
        dev, n_in, n_out = torch.device(device), layer.in_features, layer.out_features
        # _scaled_mm wants K and N multiples of 16 (the 24B model's 5120/4096/1024/32768 all are)
        layer.use_scaled_mm = scaled_mm_supported(dev, dtype) and n_in % 16 == 0 and n_out % 16 == 0
        # Triton converts float8_e4m3fn only on compute capability 8.9+ (elsewhere: the reference path)
        native = dev.type == "cuda" and torch.cuda.get_device_capability(dev) >= (8, 9)
        layer.kernel = default_kernel(dev) if native and n_in % 16 == 0 else "library"

    def quantize_rows(self, layer, shard, row, chunk):
        scale = chunk.abs().amax(dim=1).clamp_min(1e-12) / FP8_MAX
        layer.weight[row:row + chunk.shape[0]] = chunk.div_(scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
        layer.scale[row:row + chunk.shape[0]] = scale

    def apply(self, layer, x):
        x2 = decode_rows(layer, x)
        if x2 is not None:      # decode: weight-only (W8A16), bandwidth-bound; no activation quantization
            return quant_matmul.fp8_matmul(x2, layer.weight, layer.scale).view(*x.shape[:-1], layer.out_features)
        if layer.use_scaled_mm:
            return fp8_scaled_mm(x.reshape(-1, layer.in_features), layer.weight, layer.scale
                                 ).view(*x.shape[:-1], layer.out_features)
        w = layer.weight.to(x.dtype)
        w.mul_(layer.scale.to(x.dtype)[:, None])     # scaling the weight, not the output: no fp16 overflow
        return F.linear(x, w)


def fp8_scaled_mm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] (model dtype) @ dequant(w [N, K] fp8, w_scale [N]) ^T with per-token dynamic fp8 activations.
    `w.t()` is the column-major operand cuBLASLt needs; scales must be float32 [M, 1] and [1, N]."""
    x_scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12) / FP8_MAX
    xq = x.to(torch.float32, copy=True).div_(x_scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)   # x is reused
    return torch._scaled_mm(xq, w.t(), scale_a=x_scale, scale_b=w_scale.view(1, -1), out_dtype=x.dtype)
