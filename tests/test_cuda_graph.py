"""Decode steps through engine/cuda_graph.py. On CPU the graphs are not captured (that needs CUDA), but
everything else is exercised: static buffers, padding to the captured sizes, the scratch block, the fp8
store of padding rows, and attention sized from the context window instead of the step's lengths."""

import pytest
import torch

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.cuda_graph import DecodeGraphs, batch_sizes
from engine.layers.attention import REFERENCE
from engine.layers.attention.triton_unified import TritonBackend
from engine.model_runner import ModelRunner


def test_batch_sizes():
    assert batch_sizes(1) == [1]
    assert batch_sizes(6) == [1, 2, 4, 6]
    assert batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert batch_sizes(128)[-3:] == [112, 120, 128]


def test_graphs_are_the_cuda_default_and_off_with_a_reason(tiny_dir):
    """On by default where they can be captured; `enforce_eager` (--enforce-eager), int8 weights and an fp8
    KV cache on the reference backend turn them off with a logged reason, never an error."""
    assert not EngineConfig().enforce_eager
    with pytest.raises(TypeError):
        EngineConfig(cuda_graphs=True)                   # the old opt-in is gone: graphs are the default
    runner = make(tiny_dir).engine.runner
    assert runner.graphs is None and runner._no_graphs_reason() == "not a CUDA device"
    runner.device = torch.device("cuda")                 # what the runner would decide on a GPU
    assert runner._no_graphs_reason() is None
    for kw, reason in (({"enforce_eager": True}, "enforce_eager"), ({"quantization": "int8"}, "int8"),
                       ({"kv_cache_dtype": "fp8"}, "reference attention backend")):
        runner.config = EngineConfig(**kw)
        assert reason in runner._no_graphs_reason()
    runner.config, runner.attention = EngineConfig(kv_cache_dtype="fp8"), TritonBackend()
    assert runner._no_graphs_reason() is None            # the Triton store needs no data-dependent shapes


def test_capture_failure_names_enforce_eager(tiny_dir, monkeypatch):
    runner = make(tiny_dir, graphs=True, monkeypatch=monkeypatch).engine.runner
    with pytest.raises(RuntimeError, match="--enforce-eager"):
        runner.make_graphs(capture=True)                 # no CUDA here: the capture itself fails


def make(tiny_dir, graphs=False, monkeypatch=None, **kw):
    """The tiny engine on CPU; `graphs=True` lets the runner use its decode graphs there, replayed eagerly
    through their static buffers (capture=False) with the scratch block taken out of the KV budget."""
    if graphs:
        monkeypatch.setattr(ModelRunner, "_no_graphs_reason", lambda self: None)
    return LLM(tiny_dir, device="cpu", dtype="float32", progress=False, enable_prefix_caching=False,
               kv_cache_memory=8 * 2**20, max_model_len=256, max_num_seqs=16, **kw)


@pytest.mark.parametrize("kv,backend,lens,tokens", [
    ("auto", "reference", (3, 17, 33, 8, 50), (4, 7, 9, 12, 14)),      # batches 5..1, padded to 8, 4, 4, 2, 1
    ("fp8", "triton", (3, 17, 9), (2, 3, 5))])                          # 3, 2, 1 (the interpreter is slow)
def test_decode_through_graph_buffers_equals_eager(tiny_dir, monkeypatch, kv, backend, lens, tokens):
    """Requests that finish at different steps, each batch padded to the next captured size. The pool
    (scratch block included) starts as NaN, so a padding row that read or wrote anything but the scratch
    block would show. With an fp8 pool the Triton store (what a graph captures) takes the padding rows'
    writes, all to one scratch slot."""
    prompts = [list(range(1000, 1000 + n)) for n in lens]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in tokens]
    plain = make(tiny_dir, kv_cache_dtype=kv, attention_backend=backend)
    eager = [o.token_ids for o in plain.generate(prompts, params)]
    llm = make(tiny_dir, graphs=True, monkeypatch=monkeypatch, kv_cache_dtype=kv, attention_backend=backend)
    runner = llm.engine.runner
    assert isinstance(runner.graphs, DecodeGraphs) and not runner.graphs.capture
    assert runner.graphs.scratch == runner.num_blocks == plain.engine.runner.num_blocks - 1
    assert runner.kv_cache.shape[2] == runner.num_blocks + 1 == plain.engine.runner.kv_cache.shape[2]
    runner.kv_cache.fill_(float("nan"))
    sizes = []
    run = runner.graphs.run
    monkeypatch.setattr(runner.graphs, "run", lambda ids, *a: sizes.append(ids.shape[0]) or run(ids, *a))
    out = [o.token_ids for o in llm.generate(prompts, params)]
    assert out == eager
    assert set(range(1, len(lens) + 1)) <= set(sizes)
    assert not runner.kv_cache[:, :, :runner.num_blocks].isnan().all()
    llm.engine.check_integrity()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,kv", [("float32", "auto"), ("bfloat16", "auto"), ("bfloat16", "fp8")])
def test_captured_graphs_equal_eager_on_gpu(tiny_dir, dtype, kv):
    """The real capture and replay (benchmarks/gpu_check.sh runs the gpu tests)."""
    prompts = [list(range(1000, 1000 + n)) for n in (3, 17, 33, 8, 50)]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (4, 7, 9, 12, 14)]
    outs = {}
    for graphs in (False, True):
        llm = LLM(tiny_dir, device="cuda", dtype=dtype, progress=False, enable_prefix_caching=False,
                  kv_cache_memory=8 * 2**20, max_model_len=256, max_num_seqs=16, enforce_eager=not graphs,
                  kv_cache_dtype=kv)
        assert (llm.engine.runner.graphs is not None) == graphs
        outs[graphs] = [o.token_ids for o in llm.generate(prompts, params)]
    assert outs[True] == outs[False]


@pytest.mark.parametrize("backend", [REFERENCE, TritonBackend()], ids=["reference", "triton"])
def test_decode_attention_sized_from_the_window_equals_exact_sizing(backend):
    """What a captured graph relies on: decode attention given only an upper bound (`max_seq_len`, the
    context window) instead of this step's lengths gives the same result, stale rows past each length
    (NaN here) and all."""
    from engine.forward_context import ForwardContext
    g = torch.Generator().manual_seed(0)
    blocks, bs, kvh, d, heads, lens = 24, 16, 2, 16, 8, [5, 40, 17]
    k_cache = torch.full((blocks, bs, kvh, d), float("nan"))
    v_cache = k_cache.clone()
    # 32 columns, the window's: padding entries point at block 0 (live rows of another sequence)
    tables = torch.tensor([[3, 0, 0, 0], [7, 1, 9, 2], [4, 11, 0, 0]], dtype=torch.int32)
    tables = torch.cat([tables, torch.zeros(3, 28, dtype=torch.int32)], 1)
    for i, n in enumerate(lens):
        slots = torch.tensor([int(tables[i, j // bs]) * bs + j % bs for j in range(n - 1)], dtype=torch.long)
        if len(slots):
            k_cache.view(-1, kvh, d)[slots] = torch.randn(len(slots), kvh, d, generator=g)
            v_cache.view(-1, kvh, d)[slots] = torch.randn(len(slots), kvh, d, generator=g)
    q, k, v = (torch.randn(3, h, d, generator=g) for h in (heads, kvh, kvh))
    outs = []
    for max_seq_len in (None, 512):
        kc, vc = k_cache.clone(), v_cache.clone()
        slot_mapping = torch.tensor([int(tables[i, (n - 1) // bs]) * bs + (n - 1) % bs for i, n in enumerate(lens)])
        ctx = ForwardContext(cu_seqlens_q=torch.arange(4, dtype=torch.int32),
                             seq_lens=torch.tensor(lens, dtype=torch.int32), slot_mapping=slot_mapping,
                             block_tables=tables, kv_caches=[(kc, vc)], query_lens_cpu=[1, 1, 1],
                             seq_lens_cpu=list(lens), max_seq_len=max_seq_len)
        outs.append(backend.forward(q, k, v, ctx, 0, d ** -0.5))
    assert not outs[0].isnan().any()
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
