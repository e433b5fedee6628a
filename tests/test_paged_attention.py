"""The Triton paged decode-attention kernel (engine/layers/paged_attention.py) against the reference decode
path of engine/layers/attention.py, on caches poisoned with NaN wherever no token was stored. Without a GPU
it runs through Triton's interpreter (conftest sets TRITON_INTERPRET=1)."""

import pytest
import torch
from tools import needs_tool

from engine.forward_context import ForwardContext
from engine.layers import attention
from engine.layers import paged_attention as pa

pytestmark = needs_tool("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def filled_cache(lens, kv_heads, d, fp8, dtype=torch.float32, blocks=64, bs=16, seed=0):
    """A pool whose unused rows are NaN, the sequences' blocks scattered in random order."""
    g = torch.Generator().manual_seed(seed)
    kind = torch.float8_e4m3fn if fp8 else dtype
    kc = torch.full((blocks, bs, kv_heads, d), float("nan"), device=DEVICE).to(kind)
    vc = kc.clone()
    ks = torch.zeros(blocks, kv_heads, device=DEVICE) if fp8 else None
    vs = torch.zeros(blocks, kv_heads, device=DEVICE) if fp8 else None
    perm, tables, used = torch.randperm(blocks, generator=g).tolist(), [], 0
    for n in lens:
        nb = -(-n // bs)
        tables.append(perm[used:used + nb])
        used += nb
        slots = torch.tensor([tables[-1][j // bs] * bs + j % bs for j in range(n)], device=DEVICE)
        k, v = (torch.randn(n, kv_heads, d, generator=g).to(DEVICE, dtype) for _ in range(2))
        attention.store_kv(k, v, kc, vc, slots, ks, vs)
    width = max(map(len, tables))
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEVICE)
    return kc, vc, ks, vs, bt


def reference(q, kc, vc, ks, vs, bt, lens, scale):
    ctx = ForwardContext(cu_seqlens_q=torch.arange(len(lens) + 1, dtype=torch.int32, device=DEVICE),
                         seq_lens=torch.tensor(lens, dtype=torch.int32, device=DEVICE), block_tables=bt)
    return attention._decode_attention(q, kc, vc, ctx, max(lens), ks, vs, scale)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("heads,kv_heads,d", [(8, 2, 16), (32, 8, 128), (4, 4, 32)])
def test_kernel_equals_reference(fp8, heads, kv_heads, d):
    lens = [1, 16, 17, 100, 230]                    # one token, a full block, one past it, several blocks
    kc, vc, ks, vs, bt = filled_cache(lens, kv_heads, d, fp8)
    q = torch.randn(len(lens), heads, d, device=DEVICE)
    ref = reference(q, kc, vc, ks, vs, bt, lens, d ** -0.5)
    assert not ref.isnan().any()
    sl = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    for splits in (None, 1, 3, 8):                  # 8 splits of a 17-token sequence: most are empty
        out = pa.decode_attention(q, kc, vc, bt, sl, max(lens), d ** -0.5, ks, vs, num_splits=splits)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert (out - ref).abs().max().item() < 1e-5, splits


# Triton's interpreter computes bfloat16 dots wrongly (see test_quant_kernels.py): float16 on CPU
@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
def test_kernel_16bit(dtype):
    lens = [5, 70]
    kc, vc, ks, vs, bt = filled_cache(lens, 2, 64, False, dtype)
    q = torch.randn(2, 8, 64, device=DEVICE).to(dtype)
    ref = reference(q.float(), kc.float(), vc.float(), None, None, bt, lens, 0.125)
    out = pa.decode_attention(q, kc, vc, bt, torch.tensor(lens, dtype=torch.int32, device=DEVICE), 70, 0.125)
    assert out.dtype == dtype and (out.float() - ref).abs().max().item() < 2e-2


@pytest.mark.parametrize("kv", ["auto", "fp8"])
def test_tiny_model_decodes_through_the_kernel(tiny_dir, monkeypatch, kv):
    """The tiny model with every decode step through the kernel: the same greedy tokens as the reference
    path, in a batch of sequences of different lengths (the table's padding entries point at live blocks)."""
    from engine import LLM, SamplingParams
    prompts = [list(range(1000, 1000 + n)) for n in (3, 20, 41)]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    outs = {}
    for use in (False, True):
        calls = []
        monkeypatch.setattr(attention, "use_triton_decode", lambda q, fp8, _u=use, _c=calls: _c.append(1) or _u)
        llm = LLM(tiny_dir, device=DEVICE, dtype="float32", progress=False, enable_prefix_caching=False,
                  kv_cache_memory=8 * 2**20, kv_cache_dtype=kv)
        llm.engine.runner.kv_cache.fill_(float("nan"))
        outs[use] = [o.token_ids for o in llm.generate(prompts, params)]
        assert calls                                 # decode steps asked for the kernel
    assert outs[True] == outs[False]
