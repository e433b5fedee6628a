"""Decode steps through engine/cuda_graph.py. On CPU the graphs are not captured (that needs CUDA), but
everything else is exercised: static buffers, padding to the captured sizes, the scratch block, and
attention sized from the context window instead of the step's lengths."""

import pytest
import torch

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.cuda_graph import DecodeGraphs, batch_sizes


def test_batch_sizes():
    assert batch_sizes(1) == [1]
    assert batch_sizes(6) == [1, 2, 4, 6]
    assert batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert batch_sizes(128)[-3:] == [112, 120, 128]


def test_uncapturable_configurations_are_refused():
    with pytest.raises(ValueError, match="cuda_graphs does not support kv_cache_dtype='fp8'"):
        EngineConfig(cuda_graphs=True, kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="cuda_graphs does not support quantization='int8'"):
        EngineConfig(cuda_graphs=True, quantization="int8")


def make(tiny_dir, **kw):
    return LLM(tiny_dir, device="cpu", dtype="float32", progress=False, enable_prefix_caching=False,
               kv_cache_memory=8 * 2**20, max_model_len=256, max_num_seqs=16, **kw)


def test_decode_through_graph_buffers_equals_eager(tiny_dir, monkeypatch):
    """Five requests that finish at different steps: batches of 5, 4, 3, 2, 1 are padded to 8, 4, 4, 2, 1.
    The pool (scratch block included) starts as NaN, so a padding row that read or wrote anything but
    the scratch block would show."""
    prompts = [list(range(1000, 1000 + n)) for n in (3, 17, 33, 8, 50)]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (4, 7, 9, 12, 14)]
    eager = [o.token_ids for o in make(tiny_dir).generate(prompts, params)]
    llm = make(tiny_dir, cuda_graphs=True)
    runner = llm.engine.runner
    assert isinstance(runner.graphs, DecodeGraphs) and runner.graphs.scratch == runner.num_blocks
    assert runner.kv_cache.shape[2] == runner.num_blocks + 1
    runner.kv_cache.fill_(float("nan"))
    sizes = []
    run = runner.graphs.run
    monkeypatch.setattr(runner.graphs, "run", lambda ids, *a: sizes.append(ids.shape[0]) or run(ids, *a))
    out = [o.token_ids for o in llm.generate(prompts, params)]
    assert out == eager
    assert {5, 4, 3, 2, 1} <= set(sizes)
    assert not runner.kv_cache[:, :, :runner.num_blocks].isnan().all()
    llm.engine.check_integrity()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_captured_graphs_equal_eager_on_gpu(tiny_dir, dtype):
    """The real capture and replay (benchmarks/gpu_check.sh runs the gpu tests)."""
    prompts = [list(range(1000, 1000 + n)) for n in (3, 17, 33, 8, 50)]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (4, 7, 9, 12, 14)]
    outs = {}
    for graphs in (False, True):
        llm = LLM(tiny_dir, device="cuda", dtype=dtype, progress=False, enable_prefix_caching=False,
                  kv_cache_memory=8 * 2**20, max_model_len=256, max_num_seqs=16, cuda_graphs=graphs)
        assert (llm.engine.runner.graphs is not None) == graphs
        outs[graphs] = [o.token_ids for o in llm.generate(prompts, params)]
    assert outs[True] == outs[False]


def test_decode_attention_sized_from_the_window_equals_exact_sizing():
    """What a captured graph relies on: decode attention given only an upper bound (`max_seq_len`, the
    context window) instead of this step's lengths gives the same result, stale rows past each length
    (NaN here) and all."""
    from engine.forward_context import ForwardContext
    from engine.layers.attention import causal_attention
    g = torch.Generator().manual_seed(0)
    blocks, bs, kvh, d, heads, lens = 24, 16, 2, 16, 8, [5, 40, 17]
    k_cache = torch.full((blocks, bs, kvh, d), float("nan"))
    v_cache = k_cache.clone()
    tables = torch.tensor([[3, 0, 0, 0], [7, 1, 9, 2], [4, 11, 0, 0]], dtype=torch.int32)
    for i, n in enumerate(lens):
        slots = torch.tensor([int(tables[i, j // bs]) * bs + j % bs for j in range(n - 1)], dtype=torch.long)
        if len(slots):
            k_cache.view(-1, kvh, d)[slots] = torch.randn(len(slots), kvh, d, generator=g)
            v_cache.view(-1, kvh, d)[slots] = torch.randn(len(slots), kvh, d, generator=g)
    q, k, v = (torch.randn(3, h, d, generator=g) for h in (heads, kvh, kvh))
    outs = []
    for max_seq_len in (None, 64):
        kc, vc = k_cache.clone(), v_cache.clone()
        slot_mapping = torch.tensor([int(tables[i, (n - 1) // bs]) * bs + (n - 1) % bs for i, n in enumerate(lens)])
        ctx = ForwardContext(cu_seqlens_q=torch.arange(4, dtype=torch.int32),
                             seq_lens=torch.tensor(lens, dtype=torch.int32), slot_mapping=slot_mapping,
                             block_tables=tables, kv_caches=[(kc, vc)], query_lens_cpu=[1, 1, 1],
                             seq_lens_cpu=list(lens), max_seq_len=max_seq_len)
        outs.append(causal_attention(q, k, v, ctx, 0, d ** -0.5))
    assert not outs[0].isnan().any()
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
