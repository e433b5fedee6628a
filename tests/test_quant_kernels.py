"""The Triton decode kernels of the quantized linears (engine/layers/quant_matmul.py) against the reference
dequantization: bitsandbytes' own dequantize_4bit for nf4, the fp8 reference path for fp8. Without a GPU
they run through Triton's interpreter (conftest sets TRITON_INTERPRET=1), which executes the same kernel
code, masks and index arithmetic included, on CPU tensors."""

import pytest
import torch
from tools import needs_tool

from engine import quant
from engine.layers import quant_matmul as qm
from engine.layers.linear import Linear

pytestmark = needs_tool("triton", "bitsandbytes")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def nf4_linear(n, k, seed=0, shards=None):
    """An nf4 layer of `shards` row counts (one shard of n rows by default) and its dequantized matrix."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05
    with torch.device("meta"):
        lin = Linear(k, shards or [n])
    lin.create_weights(quant.linear_method("nf4"), DEVICE, torch.float32)
    lin.load_(w)
    return lin, lin.method.dequantize(lin).float()


def rel_err(y, ref):
    return ((y.float() - ref).norm() / ref.norm()).item()


def nf4_call(lin, x, **kw):
    return lin.method.triton(lin, x, **kw)


# K = 96 (blocks of 32), 192, 256 (blocks of 64); N not a multiple of the tile; M from 1 past one M tile
@pytest.mark.parametrize("n,k", [(96, 96), (200, 192), (72, 256)])
@pytest.mark.parametrize("m", [1, 5, 17])
def test_nf4_kernel_equals_bitsandbytes_dequantization(n, k, m):
    lin, dense = nf4_linear(n, k)
    x = torch.randn(m, k, device=DEVICE)
    ref = x @ dense.t()
    steps = k // lin.blocksize
    for split in (1, steps):                 # no split, and one quantization block per program
        y = nf4_call(lin, x, block_n=64, split_k=split)
        assert y.shape == (m, n) and y.dtype == x.dtype
        assert rel_err(y, ref) < 1e-5, (split, rel_err(y, ref))


@pytest.mark.parametrize("m", [1, 5])
def test_nf4_kernel_on_a_merged_layer(m):
    """q/k/v-like shards whose second-level scales (one per 256 blocks) start mid-way through the
    kernel's tiles: every row must find its own shard's scales, offset and code map."""
    lin, dense = nf4_linear(200, 192, shards=[96, 40, 64])      # 288, 120, 192 blocks of 64
    assert lin.shard_base2.tolist() == [0, 2, 3] and len(set(lin.offset.tolist())) == 3
    x = torch.randn(m, 192, device=DEVICE)
    y = nf4_call(lin, x, block_n=64)
    assert rel_err(y, x @ dense.t()) < 1e-5


def test_nf4_kernel_rows_do_not_depend_on_the_batch():
    """One token (the reduction path) and the same token in a batch (tensor-core dots) round the weights
    alike: their results differ only in summation order."""
    lin, _ = nf4_linear(128, 128)
    x = torch.randn(4, 128, device=DEVICE).to(torch.float16)
    alone, batched = nf4_call(lin, x[:1]), nf4_call(lin, x)[:1]
    assert rel_err(alone, batched.float()) < 1e-5          # 3e-4 if only the dots rounded them


def test_nf4_kernel_reads_every_scale():
    """A corrupted block scale must show up in exactly that block's output row: the kernel really reads
    the double-quantized absmax of each (row, block), not a neighbour's."""
    lin, _ = nf4_linear(64, 128)
    x = torch.randn(3, 128, device=DEVICE)
    before = nf4_call(lin, x, block_n=32)
    blk = 2 * 37 + 1                                         # row 37, second block of 64
    lin.absmax.data[blk] = (lin.absmax[blk].int() + 40).clamp(0, 255).to(torch.uint8)
    changed = (nf4_call(lin, x, block_n=32) - before).abs().amax(0) > 1e-6
    assert changed.nonzero().flatten().tolist() == [37]


# Triton's interpreter computes bfloat16 dots wrongly (it multiplies the raw bits), so on CPU the 16-bit
# path is checked in float16; on a GPU in both.
@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
def test_kernels_16bit_activations(dtype):
    lin, dense = nf4_linear(128, 128)
    x = torch.randn(4, 128, device=DEVICE).to(dtype)
    y = nf4_call(lin, x)
    assert y.dtype == dtype
    assert rel_err(y, x.float() @ dense.t()) < 1e-2          # 16-bit inputs, codes and output rounding only
    fp8 = quant.make_linear("fp8", 128, 128, DEVICE, torch.float32)
    fp8.load_(dense)
    ref = x.float() @ (fp8.weight.float() * fp8.scale[:, None]).t()
    y = qm.fp8_matmul(x, fp8.weight, fp8.scale)
    assert y.dtype == dtype and rel_err(y, ref) < 1e-2


@pytest.mark.parametrize("n,k,m", [(96, 96, 1), (200, 192, 7), (64, 512, 20)])
def test_fp8_kernel_equals_reference_path(n, k, m):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(1)) * 0.05
    lin = quant.make_linear("fp8", k, n, DEVICE, torch.float32)
    lin.load_(w)
    lin.kernel = "library"
    x = torch.randn(m, k, device=DEVICE)
    ref = lin(x)
    for split in (None, k // 32):                          # one K tile per program
        y = qm.fp8_matmul(x, lin.weight, lin.scale, block_k=32, split_k=split)
        assert rel_err(y, ref) < 1e-5


def test_kernel_choice_and_errors():
    lin = quant.make_linear("nf4", 64, 64, "cpu", torch.float32)
    assert lin.kernel == "library"                           # CPU default: bitsandbytes
    fp8 = quant.make_linear("fp8", 64, 64, "cpu", torch.float32)
    assert fp8.kernel == "library"
    model = torch.nn.Sequential(lin, fp8)
    quant.set_kernel(model, "triton")
    assert lin.kernel == fp8.kernel == "triton"
    with pytest.raises(ValueError, match="triton"):
        quant.set_kernel(model, "cuda")


@pytest.mark.parametrize("method", ["nf4", "fp8"])
def test_tiny_model_through_the_kernels(method, tiny_dir):
    """The whole tiny model, decode through the Triton kernels (prefill chunks > 64 tokens take the library
    path, as on a GPU): same logits as the library kernels up to summation order, same greedy tokens."""
    from engine import LLM, SamplingParams
    prompts = [list(range(1000, 1000 + n)) for n in (20, 90)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outs = {}
    for kernel in ("library", "triton"):
        llm = LLM(tiny_dir, device=DEVICE, dtype="float32", progress=False, quantization=method,
                  enable_prefix_caching=False, kv_cache_memory=8 * 2**20)
        quant.set_kernel(llm.model, kernel)
        calls = []
        fn = "nf4_matmul" if method == "nf4" else "fp8_matmul"
        orig = getattr(qm, fn)
        setattr(qm, fn, lambda *a, _c=calls, _f=orig, **kw: _c.append(a[0].shape[0]) or _f(*a, **kw))
        try:
            outs[kernel] = [o.token_ids for o in llm.generate(prompts, params)]
        finally:
            setattr(qm, fn, orig)
        if kernel == "triton":
            assert calls and max(calls) <= qm.MAX_ROWS       # decode steps went through the kernel
        else:
            assert not calls
    assert outs["triton"] == outs["library"]

