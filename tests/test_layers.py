"""The layers' fused Triton kernels (residual + RMSNorm, SiLU·mul, RoPE on q and k) against their PyTorch
paths, the cached RoPE table against the per-position formula, and merged projections against separate
ones. Without a GPU the kernels run through Triton's interpreter (conftest sets TRITON_INTERPRET=1)."""

import pytest
import torch
from tools import needs_tool

from engine.layers import mlp, norm, rotary
from engine.layers.linear import Linear

needs_triton = needs_tool("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the interpreter computes bfloat16 wrongly in places (see test_quant_kernels.py): float16 stands in on CPU
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_residual_rms_norm(dtype):
    x, res, w = randn(5, 96, dtype=dtype), randn(5, 96, dtype=dtype, seed=1), randn(96, dtype=dtype, seed=2)
    out, total = norm.rms_norm_triton(x, w, 1e-5, res)
    ref, ref_total = norm.rms_norm_reference(x, w, 1e-5, res)
    assert torch.equal(total, ref_total)                   # the sum is rounded to the dtype as PyTorch rounds it
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(norm.rms_norm_triton(x, w, 1e-5), norm.rms_norm_reference(x, w, 1e-5),
                               rtol=tol, atol=tol)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype):
    gate_up = randn(3, 2 * 1100, dtype=dtype)              # 1100 columns: two blocks, the second partial
    gate, up = gate_up.float().chunk(2, -1)
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(mlp.silu_mul_triton(gate_up).float(), torch.nn.functional.silu(gate) * up,
                               rtol=tol, atol=tol)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_qk_in_place(dtype):
    """q and k as views into one fused projection output (token stride = its width), turned in place."""
    n, heads, kv_heads, d = 7, 8, 2, 16
    qkv = randn(n, (heads + 2 * kv_heads) * d, dtype=dtype)
    q, k, _ = qkv.split([heads * d, kv_heads * d, kv_heads * d], -1)
    q, k = q.view(n, heads, d), k.view(n, kv_heads, d)
    rope = rotary.RotaryEmbedding(d, 1e9, 64)
    cos, sin = rope(torch.arange(20, 27, device=DEVICE), dtype)
    ref_q, ref_k = rotary.apply_rotary_qk(q.cpu().clone(), k.cpu().clone(), cos.cpu(), sin.cpu())
    before = qkv.clone()
    rotary.apply_rotary_qk_triton_(q, k, cos, sin)
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(q.cpu(), ref_q, rtol=tol, atol=tol)
    torch.testing.assert_close(k.cpu(), ref_k, rtol=tol, atol=tol)
    assert torch.equal(qkv[:, (heads + kv_heads) * d:], before[:, (heads + kv_heads) * d:])   # v untouched


def test_rope_table_equals_the_per_position_formula():
    """The cached table gives exactly what computing the angles of each step's positions gives."""
    rope = rotary.RotaryEmbedding(128, 1e9, 131_072)
    pos = torch.tensor([0, 1, 17, 4096, 131_071])
    cos, sin = rope(pos, torch.bfloat16)
    ref_cos, ref_sin = rotary.rope_1d(pos, 128, 1e9, torch.bfloat16)
    assert torch.equal(torch.cat((cos, cos), -1), ref_cos) and torch.equal(torch.cat((sin, sin), -1), ref_sin)
    assert rope.table(pos.device, torch.bfloat16)[0] is rope.table(pos.device, torch.bfloat16)[0]   # built once


def test_merged_projection_equals_separate_ones():
    with torch.device("meta"):
        merged = Linear(32, [24, 8, 8], ("q_proj", "k_proj", "v_proj"))
    merged.create_weights(merged.method, "cpu", torch.float32)
    parts = [randn(n, 32, seed=i).cpu() for i, n in enumerate((24, 8, 8))]
    for i, w in enumerate(parts):
        merged.load_shard(i, w)
    x = randn(3, 32, seed=9).cpu()
    torch.testing.assert_close(merged(x), torch.cat([x @ w.t() for w in parts], -1), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"weight \[8, 31\] for a \[8, 32\] shard"):
        merged.load_shard(1, torch.zeros(8, 31))


def test_autotune_is_deterministic_off_cuda_and_cached(tmp_path, monkeypatch):
    from engine.layers import autotune
    candidates = [{"BLOCK_N": 128}, {"BLOCK_N": 64}, {"BLOCK_N": 32}]
    ran = []
    assert autotune.pick("k", ("c",), candidates, ran.append, torch.device("cpu")) == candidates[0]
    assert not ran                                       # never timed without a GPU
    monkeypatch.setenv("MISTRAL_SMALL_AUTOTUNE_CACHE", str(tmp_path / "tune.json"))
    monkeypatch.setattr(autotune, "_memory", {})
    times = {128: 3e-6, 64: 1e-6, 32: float("inf")}      # 32: a candidate that failed to run
    measured = []
    measure = lambda c: measured.append(c) or times[c["BLOCK_N"]]
    assert autotune.choose("gpu|k|c", candidates, measure) == {"BLOCK_N": 64}
    assert autotune.choose("gpu|k|c", candidates, measure) == {"BLOCK_N": 64} and len(measured) == 3
    monkeypatch.setattr(autotune, "_memory", {})         # a new process: the disk cache answers
    assert autotune.choose("gpu|k|c", candidates, measure) == {"BLOCK_N": 64} and len(measured) == 3
    assert autotune.choose("gpu|k|other", candidates[:1] + candidates[2:], measure) == {"BLOCK_N": 128}
