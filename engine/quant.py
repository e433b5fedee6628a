"""Weight-quantized decoder linears (nf4 and int8 through bitsandbytes, fp8 with per-channel scales) and
the constants of the fp8 KV cache.

What is quantized: the seven projections of every text decoder layer (q/k/v/o, gate/up/down): 22.2 B of
the 24.0 B parameters, 44.5 of 48.0 GB in bf16. The embedding, lm_head, norms, vision tower and projector
stay in the model dtype: they are 3.6 GB together, the lm_head and embedding are the tensors most
sensitive to rounding, and the vision tower runs once per image, not once per token.

Quantization happens while loading: `materialize` gives each QuantLinear only its quantized storage on the
target device, and `load_(w)` takes the checkpoint tensor (host memory) and quantizes it chunk by chunk
on that device, so no full-precision copy of a quantized matrix ever exists there (one chunk at a time).
The quantized storage is held in Parameters (requires_grad=False), so `model.parameters()` counts the real
footprint.

Kernels (`.kernel` of each module): on CUDA, batches of up to `quant_matmul.MAX_ROWS` tokens (decode) go
through our Triton weight-only kernels, which read the same storage (engine/layers/quant_matmul.py says
why bitsandbytes' 4-bit path is not used there); larger batches (prefill) use bitsandbytes' dequantize +
matmul for nf4 and `torch._scaled_mm` for fp8. On CPU the library/reference paths run; tests drive the
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

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0                 # largest finite float8_e4m3fn; values beyond it would become NaN
CHUNK_ELEMENTS = 1 << 20        # full-precision elements quantized at once: 4 MiB in float32
_LINEAR = re.compile(r"language_model\.model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)")
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
    for m in model.modules():
        if isinstance(m, (NF4Linear, FP8Linear)):
            m.kernel = kernel


def _decode_rows(module, x: torch.Tensor) -> torch.Tensor | None:
    """x as [rows, K] when the Triton decode kernel should take it, else None."""
    if module.kernel != "triton":
        return None
    x2 = x.reshape(-1, module.in_features)
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


def make_linear(method: str, n_in: int, n_out: int, device, dtype: torch.dtype) -> QuantLinear:
    return {"nf4": NF4Linear, "int8": Int8Linear, "fp8": FP8Linear}[method](n_in, n_out, device, dtype)


class QuantLinear(nn.Module):
    """A bias-free linear y = x W^T whose W [n_out, n_in] is held only in quantized form. Quantization groups
    never straddle rows, so any chunk of whole rows quantizes exactly as the whole matrix would."""

    def __init__(self, n_in: int, n_out: int, device, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features, self.dtype = n_in, n_out, dtype

    def _storage(self, name: str, shape, dtype: torch.dtype, device) -> None:
        setattr(self, name, nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False))

    @torch.no_grad()
    def load_(self, w: torch.Tensor) -> None:
        """Quantize the full-precision `w` (any device, any float dtype) into this module's storage."""
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(f"{type(self).__name__}: weight {list(w.shape)} for a "
                             f"[{self.out_features}, {self.in_features}] linear")
        dev = self.weight.device
        rows = max(1, CHUNK_ELEMENTS // self.in_features)
        for r0 in range(0, self.out_features, rows):     # a float32 copy of `rows` rows, ours to modify
            self._quantize_rows(r0, w[r0:r0 + rows].to(dev, torch.float32, copy=True))
        self._finish()

    def _quantize_rows(self, r0: int, chunk: torch.Tensor) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        pass

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.dtype}"


class NF4Linear(QuantLinear):
    """bitsandbytes NF4, blocks of 64 weights, with the absmax of each block itself 8-bit quantized in
    blocks of 256 ("double quantization", as QLoRA and transformers' bnb_4bit_use_double_quant): 4.127
    bits per weight. Decoder linears of the 24B model: 11.5 GB instead of 44.5 GB."""

    def __init__(self, n_in, n_out, device, dtype):
        super().__init__(n_in, n_out, device, dtype)
        # Blocks of 64 (every 24B matrix has K % 64 == 0). bitsandbytes 0.50.2's CPU dequantize kernel is
        # wrong when blocks straddle rows (K = 96: error 0.26 instead of 0.09), so test models whose K is
        # not a multiple of 64 get blocks of 32.
        self.blocksize = 64 if n_in % 64 == 0 else 32
        if n_in % self.blocksize:
            raise ValueError(f"nf4 needs in_features divisible by 32, got {n_in}")
        n = n_in * n_out
        self.num_blocks = n // self.blocksize
        self._storage("weight", ((n + 1) // 2, 1), torch.uint8, device)       # two 4-bit codes per byte
        self._storage("absmax", (self.num_blocks,), torch.uint8, device)       # 8-bit codes of block absmax
        self._storage("absmax2", (-(-self.num_blocks // 256),), torch.float32, device)
        self._storage("offset", (), torch.float32, device)
        self.quant_state = None
        self.kernel = default_kernel(device)

    def _quantize_rows(self, r0, chunk):
        F_ = require_bitsandbytes("nf4").functional
        if r0 == 0:     # float32 block absmax exists only while this tensor loads: 1/32 of its bf16 size
            self._absmax = torch.empty(self.num_blocks, dtype=torch.float32, device=self.weight.device)
        q, st = F_.quantize_4bit(chunk, blocksize=self.blocksize, quant_type="nf4", compress_statistics=False)
        e0 = r0 * self.in_features
        self.weight[e0 // 2:e0 // 2 + q.shape[0]] = q
        self._absmax[e0 // self.blocksize:e0 // self.blocksize + st.absmax.numel()] = st.absmax
        self._code = st.code

    def _finish(self):
        F_ = require_bitsandbytes("nf4").functional
        offset = self._absmax.mean()        # what quantize_4bit(compress_statistics=True) does, in one go
        qabsmax, st2 = F_.quantize_blockwise(self._absmax - offset, blocksize=256)
        del self._absmax
        self.absmax.copy_(qabsmax)
        self.absmax2.copy_(st2.absmax)
        self.offset.copy_(offset)
        self._set_state(st2.code)

    def _set_state(self, code2: torch.Tensor) -> None:
        F_ = require_bitsandbytes("nf4").functional
        state2 = F_.QuantState(absmax=self.absmax2, code=code2, blocksize=256, dtype=torch.float32)
        shape = torch.Size([self.out_features, self.in_features])
        self.quant_state = F_.QuantState(absmax=self.absmax, shape=shape, code=self._code,
                                         blocksize=self.blocksize, quant_type="nf4", dtype=self.dtype,
                                         offset=self.offset, state2=state2)

    @torch.no_grad()
    def load_prequantized_(self, parts: dict[str, torch.Tensor]) -> None:
        """Adopt a bitsandbytes 4-bit state as transformers saves it (`weight` + `weight.absmax`,
        `.quant_map`, `.nested_absmax`, `.nested_quant_map`, `.quant_state.bitsandbytes__nf4`; keys here
        without the `weight.` prefix): the checkpoint's codes are kept bit for bit. Without double
        quantization (a float32 absmax) the absmax is 8-bit quantized here, as for our own nf4."""
        F_ = require_bitsandbytes("nf4").functional
        dev = self.weight.device
        st = F_.QuantState.from_dict({k: v for k, v in parts.items() if k != "weight"}, dev)
        shape = (self.out_features, self.in_features)
        if st.quant_type != "nf4":
            raise ValueError(f"4-bit quant_type {st.quant_type!r}: only nf4 checkpoints are supported")
        if tuple(st.shape) != shape:
            raise ValueError(f"quantized shape {list(st.shape)}, expected {list(shape)}")
        if self.in_features % st.blocksize:
            raise ValueError(f"blocks of {st.blocksize} straddle rows of {self.in_features} weights: unsupported")
        if not torch.allclose(st.code.float().cpu(), torch.tensor(quant_matmul.NF4_CODE)):
            raise ValueError("quant_map is not the NF4 code book")
        if st.blocksize != self.blocksize:          # storage was sized for our own block size
            self.blocksize, self.num_blocks = st.blocksize, self.in_features * self.out_features // st.blocksize
            self._storage("absmax", (self.num_blocks,), torch.uint8, dev)
            self._storage("absmax2", (-(-self.num_blocks // 256),), torch.float32, dev)
        if parts["weight"].numel() != self.weight.numel():
            raise ValueError(f"{parts['weight'].numel()} packed bytes, expected {self.weight.numel()}")
        self.weight.copy_(parts["weight"].reshape(self.weight.shape))
        self._code = st.code
        if st.state2 is not None and st.state2.blocksize == 256 and st.absmax.dtype == torch.uint8:
            self.absmax.copy_(st.absmax)
            self.absmax2.copy_(st.state2.absmax)
            self.offset.copy_(st.offset)
            self._set_state(st.state2.code)
        else:                                       # plain float absmax (or another nesting): ours
            absmax = st.absmax.float() if st.state2 is None else \
                F_.dequantize_blockwise(st.absmax, st.state2) + st.offset
            self._absmax = absmax.to(dev, torch.float32)
            self._finish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _decode_rows(self, x)
        if x2 is not None:
            y = quant_matmul.nf4_matmul(x2, self.weight, self.absmax, self.quant_state.state2.code, self.absmax2, self.offset,
                           self.out_features, self.in_features, self.blocksize)
            return y.view(*x.shape[:-1], self.out_features)
        # bitsandbytes: one row takes its gemv kernel; more dequantize to the model dtype, then matmul
        return require_bitsandbytes("nf4").matmul_4bit(x, self.weight.t(), quant_state=self.quant_state)


class Int8Linear(QuantLinear):
    """bitsandbytes LLM.int8(): int8 weights with one absmax scale per output row; at run time the
    activations are quantized per token to int8 (through fp16), except outlier feature columns
    (|x| > 6.0), which are multiplied in 16-bit. 8 bits + 4 bytes per row: 22.3 GB of decoder linears."""
    threshold = 6.0

    def __init__(self, n_in, n_out, device, dtype):
        super().__init__(n_in, n_out, device, dtype)
        self._storage("weight", (n_out, n_in), torch.int8, device)
        self._storage("scale", (n_out,), torch.float32, device)
        self.state = None

    def _quantize_rows(self, r0, chunk):
        # fp16 in: the CUDA kernel takes fp16 only; bf16 checkpoint weights are exact in fp16 (|w| << 65504)
        cb, scb, _ = require_bitsandbytes("int8").functional.int8_vectorwise_quant(chunk.half())
        self.weight[r0:r0 + cb.shape[0]] = cb
        self.scale[r0:r0 + cb.shape[0]] = scb

    def _finish(self):
        bnb = require_bitsandbytes("int8")
        self.state = bnb.MatmulLtState()
        # is_training=False selects the int8 kernel path on every device (True means dequantize + matmul
        # on CPU); has_fp16_weights=False: CB/SCB are the only copy of the weights.
        self.state.CB, self.state.SCB, self.state.threshold = self.weight, self.scale, self.threshold
        self.state.has_fp16_weights, self.state.is_training = False, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return require_bitsandbytes("int8").matmul(x, self.weight, state=self.state)


def scaled_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """cuBLASLt fp8 GEMMs with row-wise scales: compute capability 8.9 (Ada) / 9.0 (Hopper) and newer,
    bf16 output only."""
    return (device.type == "cuda" and dtype == torch.bfloat16
            and torch.cuda.get_device_capability(device) >= (8, 9))


class FP8Linear(QuantLinear):
    """float8_e4m3fn weights, one float32 scale per output channel (row absmax / 448): 8.03 bits per weight,
    22.3 GB of decoder linears. On Ada/Hopper, decode batches (<= 64 tokens) take the Triton weight-only
    kernel (W8A16: fp8 weights converted in registers, 16-bit activations); larger batches (`use_scaled_mm`)
    quantize activations per token to fp8 on the fly and `torch._scaled_mm` multiplies with row-wise scales
    (W8A8, twice the tensor-core rate of bf16). Elsewhere, the CPU included, the reference path dequantizes
    the weight to the model dtype and multiplies (W8A16)."""

    def __init__(self, n_in, n_out, device, dtype):
        super().__init__(n_in, n_out, device, dtype)
        self._storage("weight", (n_out, n_in), FP8, device)
        self._storage("scale", (n_out,), torch.float32, device)
        # _scaled_mm wants K and N multiples of 16 (the 24B model's 5120/4096/1024/32768 all are)
        self.use_scaled_mm = (scaled_mm_supported(torch.device(device), dtype)
                              and n_in % 16 == 0 and n_out % 16 == 0)
        # Triton converts float8_e4m3fn only on compute capability 8.9+ (elsewhere: the reference path)
        dev = torch.device(device)
        native = dev.type == "cuda" and torch.cuda.get_device_capability(dev) >= (8, 9)
        self.kernel = default_kernel(dev) if native and n_in % 16 == 0 else "library"

    def _quantize_rows(self, r0, chunk):
        scale = chunk.abs().amax(dim=1).clamp_min(1e-12) / FP8_MAX
        self.weight[r0:r0 + chunk.shape[0]] = chunk.div_(scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8)
        self.scale[r0:r0 + chunk.shape[0]] = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _decode_rows(self, x)
        if x2 is not None:      # decode: weight-only (W8A16), bandwidth-bound; no activation quantization
            return quant_matmul.fp8_matmul(x2, self.weight, self.scale).view(*x.shape[:-1], self.out_features)
        if self.use_scaled_mm:
            return fp8_scaled_mm(x.reshape(-1, self.in_features), self.weight, self.scale
                                 ).view(*x.shape[:-1], self.out_features)
        w = self.weight.to(x.dtype)
        w.mul_(self.scale.to(x.dtype)[:, None])     # scaling the weight, not the output: no fp16 overflow
        return F.linear(x, w)


def fp8_scaled_mm(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] (model dtype) @ dequant(w [N, K] fp8, w_scale [N]) ^T with per-token dynamic fp8 activations.
    `w.t()` is the column-major operand cuBLASLt needs; scales must be float32 [M, 1] and [1, N]."""
    x_scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12) / FP8_MAX
    xq = x.to(torch.float32, copy=True).div_(x_scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)   # x is reused
    return torch._scaled_mm(xq, w.t(), scale_a=x_scale, scale_b=w_scale.view(1, -1), out_dtype=x.dtype)


def quantize_model_(model: nn.Module, method: str, device, dtype: torch.dtype) -> list[str]:
    """Replace the decoder linears of a module tree (on the meta device) with empty quantized modules on
    `device`. Returns their parameter names (module name + '.weight', the checkpoint's names)."""
    check_quantization(method)
    names = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and is_quantized(name):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child,
                    make_linear(method, module.in_features, module.out_features, device, dtype))
            names.append(name + ".weight")
    return names
