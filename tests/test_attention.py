"""The attention backends (engine/layers/attention): the Triton store and unified kernel against the PyTorch
reference on pools poisoned with NaN wherever no token was stored, one launch per layer for a mixed step,
no [chunk, context] tensor, and the backend choice. Without a GPU the kernels run through Triton's
interpreter (conftest sets TRITON_INTERPRET=1): shapes stay tiny, the interpreter is slow."""

import pytest
import torch
from tools import needs_tool
from torch.utils._python_dispatch import TorchDispatchMode

from engine.config import EngineConfig
from engine.forward_context import ForwardContext
from engine.layers import attention
from engine.layers.attention import reference, store, triton_unified
from engine.quant import FP8

pytestmark = needs_tool("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MIXED = ((20, 20), (9, 45), (1, 1), (1, 17), (1, 70))    # (query_len, seq_len): prefill, chunk after a prefix, decodes


def make_step(steps, heads, kv_heads, d, fp8, dtype=torch.float32, bs=16, blocks=24, seed=0):
    """A NaN-poisoned pool holding each sequence's cached prefix in blocks scattered at random, and the
    step's q/k/v and context (its own K/V not stored yet)."""
    g = torch.Generator().manual_seed(seed)
    kc = torch.full((blocks, bs, kv_heads, d), float("nan"), device=DEVICE).to(FP8 if fp8 else dtype)
    vc = kc.clone()
    scales = [torch.zeros(blocks, kv_heads, device=DEVICE) for _ in range(2)] if fp8 else []
    perm, tables, slots, used = torch.randperm(blocks, generator=g).tolist(), [], [], 0
    for ql, sl in steps:
        tables.append(perm[used:used + -(-sl // bs)])
        used += len(tables[-1])
        where = [tables[-1][j // bs] * bs + j % bs for j in range(sl)]
        if sl > ql:
            k, v = (torch.randn(sl - ql, kv_heads, d, generator=g).to(DEVICE, dtype) for _ in range(2))
            store.store_kv_reference(k, v, kc, vc, torch.tensor(where[:sl - ql], device=DEVICE), *scales)
        slots += where[sl - ql:]
    width = max(map(len, tables)) + 1                          # padding entries point at block 0: live data
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=DEVICE)
    n = sum(ql for ql, _ in steps)
    q = torch.randn(n, heads, d, generator=g).to(DEVICE, dtype)
    k, v = (torch.randn(n, kv_heads, d, generator=g).to(DEVICE, dtype) for _ in range(2))
    qlens, slens = [s[0] for s in steps], [s[1] for s in steps]
    ctx = ForwardContext(cu_seqlens_q=torch.tensor([0] + qlens, device=DEVICE).cumsum(0).to(torch.int32),
                         seq_lens=torch.tensor(slens, dtype=torch.int32, device=DEVICE),
                         slot_mapping=torch.tensor(slots, device=DEVICE), block_tables=bt,
                         kv_caches=[(kc, vc, *scales)], query_lens_cpu=qlens, seq_lens_cpu=slens)
    return q, k, v, ctx


def run(backend, q, k, v, ctx, d):
    """The backend on a private copy of the pool: (output, pool after the store)."""
    pool = tuple(t.clone() for t in ctx.kv_caches[0])
    own = ForwardContext(**{**vars(ctx), "kv_caches": [pool]})
    return backend.forward(q, k, v, own, 0, d ** -0.5), pool


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16-pool", "fp8-pool"])
@pytest.mark.parametrize("heads,kv_heads,d", [(8, 2, 64), (8, 2, 128), (4, 4, 32)])
def test_unified_kernel_equals_reference_on_a_mixed_step(heads, kv_heads, d, fp8):
    """One launch for a prefill without cache, a chunk after a cached prefix and three decodes (one of
    them the first token of its sequence), GQA 4 and 1, head dims 32/64/128."""
    q, k, v, ctx = make_step(MIXED, heads, kv_heads, d, fp8)
    ref, ref_pool = run(reference.ReferenceBackend(), q, k, v, ctx, d)
    out, pool = run(triton_unified.TritonBackend(), q, k, v, ctx, d)
    assert not ref.isnan().any() and out.shape == q.shape and out.dtype == q.dtype
    assert (out - ref).abs().max().item() < 1e-5
    for a, b in zip(pool, ref_pool):                        # the store wrote the same bytes and scales
        assert torch.equal(a.float().nan_to_num(7.0), b.float().nan_to_num(7.0))


def test_split_kv_equals_one_pass():
    """Flash-decoding: a sequence's keys cut into 1..8 slices (most of them empty for the short ones)
    merged by the combine kernel give the one-pass result."""
    q, k, v, ctx = make_step(((1, 1), (1, 17), (1, 150), (3, 40)), 8, 2, 64, fp8=False)
    kc, vc = ctx.kv_caches[0]
    store.store_kv(k, v, kc, vc, ctx.slot_mapping)
    outs = [triton_unified.unified_attention(q, kc, vc, ctx.block_tables, ctx.cu_seqlens_q, ctx.seq_lens, 0.125,
                                             3, 150, splits=s) for s in (1, 3, 8)]
    assert not outs[0].isnan().any()
    for o in outs[1:]:
        assert (o - outs[0]).abs().max().item() < 1e-5


# Triton's interpreter computes bfloat16 dots wrongly (see test_quant_kernels.py): float16 on CPU
@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
def test_unified_kernel_16bit(dtype):
    q, k, v, ctx = make_step(((6, 30), (1, 50)), 8, 2, 64, fp8=False, dtype=dtype)
    out, _ = run(triton_unified.TritonBackend(), q, k, v, ctx, 64)
    ref, _ = run(reference.ReferenceBackend(), q.float(), k.float(), v.float(),
                 ForwardContext(**{**vars(ctx), "kv_caches": [tuple(t.float() for t in ctx.kv_caches[0])]}), 64)
    assert out.dtype == dtype and (out.float() - ref).abs().max().item() < 2e-2


def test_store_kernel_equals_reference_step_by_step():
    """The sync-free fp8 store over steps that grow a block's scale (its earlier rows re-quantized), start
    a reused block afresh, and write several blocks at once: bytes and scales equal the reference's after
    every step; slots several padding rows share (a CUDA graph's scratch slot) touch nothing else."""
    g = torch.Generator().manual_seed(1)
    pools = [[torch.full((8, 16, 2, 16), float("nan"), device=DEVICE).to(FP8) for _ in range(2)]
             + [torch.zeros(8, 2, device=DEVICE) for _ in range(2)] for _ in range(2)]
    steps = [range(5), range(5, 6), [*range(6, 20), *range(32, 40)], [20], [21, 40], range(48, 50),
             range(3), [7 * 16] * 3]                          # block 0 reused; three rows on one slot
    for i, slots in enumerate(steps):
        slots = torch.tensor(list(slots), device=DEVICE)
        k, v = (torch.randn(len(slots), 2, 16, generator=g).to(DEVICE) * (1 + 3 * i) for _ in range(2))
        last = len(slots) if i < 7 else 1
        store.store_kv_reference(k[:last], v[:last], *pools[0][:2], slots[:last], *pools[0][2:])
        store.store_kv(k, v, *pools[1][:2], slots, *pools[1][2:])
        for a, b in zip(*pools):
            a, b = (x.float().nan_to_num(7.0) for x in (a, b))
            if i < 7:
                assert torch.equal(a, b), i
            else:                               # the scratch block (7) holds garbage; nothing else changed
                assert torch.equal(a[:7], b[:7])


class Allocations(TorchDispatchMode):
    """Records the element count of every tensor an op allocates: an output whose storage is none of the
    op's inputs' (views, in-place and out= ops return an input's storage). Triton kernels allocate nothing
    themselves (registers and shared memory only), so every byte a backend uses passes through here."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {a.untyped_storage().data_ptr() if isinstance(a, torch.Tensor) else a.data_ptr()
                  for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, (torch.Tensor, torch.UntypedStorage, torch.TypedStorage))}
        out = func(*args, **kwargs)
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.sizes.append(t.untyped_storage().nbytes() // max(t.element_size(), 1))
        return out


def test_a_mixed_step_is_one_launch_per_layer_without_context_sized_tensors(tiny_llm, monkeypatch):
    """The tiny model's decoder on one step of a 40-token chunk after a 560-token prefix plus two decodes:
    each layer makes exactly one attention call, which launches the kernel once, and nothing of
    chunk x context elements (24,000: a score or mask matrix) is ever allocated, while the reference
    backend does allocate one (the check can fail)."""
    model, t = tiny_llm.model, tiny_llm.model.cfg.text
    steps = ((40, 600), (1, 300), (1, 90))
    *_, ctx = make_step(steps, t.num_attention_heads, t.num_key_value_heads, t.head_dim, False, blocks=64)
    ctx.kv_caches = ctx.kv_caches * t.num_hidden_layers
    ids = torch.randint(1000, 5000, (42,), generator=torch.Generator().manual_seed(0))
    pos = torch.tensor([*range(560, 600), 299, 89])
    model.language_model.model.rotary.table(pos.device, torch.float32)      # built once per model
    launches, calls = [], []
    launch = triton_unified.unified_attention
    monkeypatch.setattr(triton_unified, "unified_attention", lambda *a, **kw: launches.append(1) or launch(*a, **kw))
    biggest = {}
    for name, backend in (("triton", triton_unified.TritonBackend()), ("reference", attention.REFERENCE)):
        forward = backend.forward
        backend.forward = lambda *a, _f=forward, _n=name, **kw: calls.append(_n) or _f(*a, **kw)
        attention.set_backend(model, backend)
        try:
            with torch.inference_mode(), Allocations() as allocs:
                model(ids, pos, ctx)
        finally:
            attention.set_backend(model, attention.REFERENCE)
            del backend.forward
        biggest[name] = max(allocs.sizes)
    assert calls == ["triton"] * t.num_hidden_layers + ["reference"] * t.num_hidden_layers
    assert len(launches) == t.num_hidden_layers
    assert biggest["triton"] < 40 * 600 <= biggest["reference"], biggest


def test_backend_selection():
    cpu = torch.device("cpu")
    assert attention.select_backend("auto", cpu, fp8_kv=False) is attention.REFERENCE
    assert attention.select_backend("reference", cpu, fp8_kv=True) is attention.REFERENCE
    assert attention.select_backend("triton", cpu, fp8_kv=True).name == "triton"      # the interpreter
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        attention.select_backend("flash", cpu, fp8_kv=False)
    with pytest.raises(ValueError, match="attention_backend"):
        EngineConfig(attention_backend="flash")


def test_backend_chosen_once_for_every_layer(tiny_dir):
    from engine import LLM
    llm = LLM(tiny_dir, device=DEVICE, dtype="float32", progress=False, kv_cache_memory=8 * 2**20,
              attention_backend="triton")
    layers = [m for m in llm.model.modules() if isinstance(m, attention.Attention)]
    assert len(layers) == llm.model.cfg.text.num_hidden_layers
    assert all(m.backend is llm.engine.runner.attention for m in layers) and layers[0].backend.name == "triton"


@pytest.mark.parametrize("kv", ["auto", "fp8"])
def test_tiny_model_through_the_triton_backend(tiny_dir, kv):
    """The whole engine on the Triton backend (store and attention kernels): the reference backend's
    greedy tokens, for a batch whose steps mix chunked prefills and decodes, on a NaN-poisoned pool."""
    from engine import LLM, SamplingParams
    prompts = [list(range(1000, 1000 + n)) for n in (3, 20, 41)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    outs = {}
    for backend in ("reference", "triton"):
        llm = LLM(tiny_dir, device=DEVICE, dtype="float32", progress=False, enable_prefix_caching=False,
                  kv_cache_memory=8 * 2**20, kv_cache_dtype=kv, attention_backend=backend,
                  max_num_batched_tokens=32)
        llm.engine.runner.kv_cache.fill_(float("nan"))
        outs[backend] = [o.token_ids for o in llm.generate(prompts, params)]
        llm.engine.check_integrity()
    assert outs["triton"] == outs["reference"]


def test_profile_step_reads_the_whole_window(tiny_dir, monkeypatch):
    """The memory profile's worst step: a full chunk at the end of the window through a small temporary
    pool whose table repeats its blocks; attention is sized for (and reads) the whole window."""
    from engine import LLM
    llm = LLM(tiny_dir, device=DEVICE, dtype="float32", progress=False, kv_cache_memory=8 * 2**20,
              attention_backend="triton", max_model_len=300, max_num_batched_tokens=24)
    runner = llm.engine.runner
    ids, pos, ctx = runner.worst_step(image_tokens=10)
    assert pos.tolist() == list(range(276, 300)) and ctx.seq_lens.tolist() == [300]
    assert ctx.block_tables.shape == (1, 19) and ctx.kv_caches[0][0].shape[0] == 2      # 2 blocks, 19 entries
    assert len(set(ctx.slot_mapping.tolist())) == 24 and (ids == llm.config.image_token_id).sum() == 10
    seen = []
    launch = triton_unified.unified_attention
    monkeypatch.setattr(triton_unified, "unified_attention",
                        lambda *a, **kw: seen.append((a[5].tolist(), a[8])) or launch(*a, **kw))
    emb = torch.zeros(10, llm.config.text.hidden_size)
    with torch.inference_mode():
        h = llm.model(ids, pos, ctx, emb)
    assert seen == [([300], 300)] * llm.config.text.num_hidden_layers and not h.isnan().any()
