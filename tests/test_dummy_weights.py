"""load_format="dummy": random weights made on the device go through the same loading path as a checkpoint's."""

import json

import pytest
import torch
from safetensors.torch import save_file

from engine import LLM, SamplingParams
from engine.dummy_weights import DUMMY_STD, checkpoint_tensors, dummy_tensor
from engine.tiny_checkpoint import TINY
from engine.weights import CheckpointError, load_model, resolve

CONFIG = {"hf": "config.json", "mistral": "params.json"}
WEIGHTS = {"hf": "model.safetensors", "mistral": "consolidated.safetensors"}


def config_only(d, fmt, tekken_path):
    d.mkdir()
    cfg = TINY.to_hf_dict("4.50") if fmt == "hf" else TINY.to_native_dict()
    (d / CONFIG[fmt]).write_text(json.dumps(cfg))
    (d / "tekken.json").symlink_to(tekken_path)
    return d


@pytest.fixture(scope="module", params=["hf", "mistral"])
def dirs(request, tmp_path_factory, tekken_path):
    """(dummy dir, real dir) of one format: the real one holds the dummy values written as a checkpoint."""
    fmt = request.param
    root = tmp_path_factory.mktemp(f"dummy-{fmt}")
    dummy = config_only(root / "dummy", fmt, tekken_path)
    real = config_only(root / "real", fmt, tekken_path)
    save_file({k: dummy_tensor(k, s) for k, s in checkpoint_tensors(TINY, fmt).items()}, real / WEIGHTS[fmt])
    return fmt, dummy, real


def state(model) -> dict:
    return {n: p for n, p in model.state_dict().items()}


@pytest.mark.parametrize("quantization", [None, "nf4", "fp8"])
def test_dummy_weights_load_like_the_same_values_written_as_a_checkpoint(dirs, quantization):
    fmt, dummy, real = dirs
    ckpt = resolve(dummy, "dummy")
    assert ckpt.dummy and ckpt.format == fmt and ckpt.config() == TINY
    made = state(load_model(ckpt, progress=False, quantization=quantization))
    read = state(load_model(resolve(real, fmt), progress=False, quantization=quantization))
    assert set(made) == set(read)
    for name in made:
        assert torch.equal(made[name], read[name]), name
    if quantization is None and fmt == "mistral":   # q/k rows went through the RoPE permutation
        q = made["language_model.model.layers.0.self_attn.qkv_proj.weight"][:TINY.text.num_attention_heads
                                                                             * TINY.text.head_dim]
        assert not torch.equal(q, dummy_tensor("layers.0.attention.wq.weight", q.shape).float())


def test_checkpoint_tensors_are_what_the_checkpoint_writer_writes(make_checkpoint):
    from safetensors import safe_open
    for fmt in ("hf", "mistral"):
        d = make_checkpoint(fmt)
        shapes = {}
        for f in d.glob("*.safetensors"):
            with safe_open(f, framework="pt") as st:
                shapes.update({k: tuple(st.get_slice(k).get_shape()) for k in st.keys()})
        assert shapes == checkpoint_tensors(TINY, fmt)


def test_dummy_values_are_deterministic_per_name_and_seed():
    a = dummy_tensor("layers.0.attention.wq.weight", (256, 512))
    assert torch.equal(a, dummy_tensor("layers.0.attention.wq.weight", (256, 512)))
    assert not torch.equal(a, dummy_tensor("layers.0.attention.wk.weight", (256, 512)))
    assert not torch.equal(a, dummy_tensor("layers.0.attention.wq.weight", (256, 512), seed=1))
    assert a.dtype == torch.bfloat16 and abs(a.float().std().item() - DUMMY_STD) < 1e-3
    assert torch.equal(dummy_tensor("norm.weight", (8,)), torch.ones(8, dtype=torch.bfloat16))
    # every 1-D tensor of the architecture is an RMSNorm weight (made as ones)
    for fmt in ("hf", "mistral"):
        ones = [k for k, s in checkpoint_tensors(TINY, fmt).items() if len(s) == 1]
        assert ones and all("norm" in k or "ln_pre" in k for k in ones)


def test_engine_and_quantized_engine_run_on_dummy_weights(tmp_path, tekken_path):
    d = config_only(tmp_path / "m", "hf", tekken_path)
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    for q in (None, "fp8"):
        llm = LLM(d, load_format="dummy", device="cpu", dtype="float32", progress=False, quantization=q,
                  kv_cache_memory=2**22)
        out = llm.generate([1000, 2000, 3000], sp)[0]
        assert len(out.token_ids) == 4 and llm.engine.checkpoint.dummy


def test_dummy_errors(tmp_path, tekken_path):
    with pytest.raises(CheckpointError, match="load_format 'dummy' needs config.json or params.json"):
        resolve(tmp_path, "dummy")
    d = config_only(tmp_path / "q", "hf", tekken_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "bitsandbytes",
                                                                              "load_in_4bit": True}}))
    with pytest.raises(CheckpointError, match="load_format='dummy' makes full-precision weights"):
        load_model(resolve(d, "dummy"), progress=False)
