"""Pre-quantized bitsandbytes nf4 checkpoints, as transformers writes them (the format of the community's
"-bnb-4bit" uploads): loaded without requantizing, the same logits as transformers running the same
quantized weights, clear errors for what is not supported."""

import dataclasses
import json
import shutil

import pytest
import torch
from tools import needs_tool
from util import hf_pixels, image_chat

from engine import LLM, SamplingParams, quant
from engine.forward_context import ForwardContext
from engine.tiny_checkpoint import TINY, write_checkpoint
from engine.weights import CheckpointError, load_model, resolve

pytestmark = needs_tool("bitsandbytes", "accelerate")
# every linear's K a multiple of 64, as in the real model, so blocks of 64 never straddle rows
CFG = dataclasses.replace(TINY, text=dataclasses.replace(TINY.text, hidden_size=128, intermediate_size=256))


def hf_exact(model):
    """transformers' model with every Linear4bit computing x @ dequantize_4bit(W)^T: bitsandbytes' CPU
    4-bit matmul differs from its own dequantization by a few percent, which would hide our errors."""
    import bitsandbytes as bnb
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.forward = lambda x, m=m: torch.nn.functional.linear(
                x, bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state).to(x.dtype), m.bias)
    return model


@pytest.fixture(scope="module", params=[True, False], ids=["double-quant", "plain-absmax"])
def prequantized(request, tmp_path_factory, tekken_path):
    """(directory, transformers model on it): the random checkpoint quantized and saved by transformers.
    The vision tower and projector are quantized too (transformers' default): we dequantize those."""
    from transformers import BitsAndBytesConfig, Mistral3ForConditionalGeneration
    src = tmp_path_factory.mktemp("bf16")
    (src / "tekken.json").symlink_to(tekken_path)
    write_checkpoint(src, CFG, "hf", seed=3)
    bnb_cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                 bnb_4bit_use_double_quant=request.param)
    hf = Mistral3ForConditionalGeneration.from_pretrained(src, quantization_config=bnb_cfg, device_map="cpu",
                                                          dtype=torch.float32)
    out = tmp_path_factory.mktemp("bnb")
    hf.save_pretrained(out)
    shutil.copy(tekken_path, out / "tekken.json")
    return out, hf_exact(hf.eval())


def logits(model, ids, images=()):
    with torch.no_grad():
        emb = model.encode_images([torch.from_numpy(i) for i in images])
        h = model(torch.tensor(ids), torch.arange(len(ids)), ForwardContext.for_prefill([len(ids)]),
                  torch.cat(emb) if emb else None)
        return model.compute_logits(h)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_loads_the_checkpoint_codes_and_matches_transformers(prequantized):
    path, hf = prequantized
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"]
    llm = LLM(path, device="cpu", dtype="float32", progress=False, kv_cache_memory=8 * 2**20)
    model = llm.model
    q = model.language_model.model.layers[1].mlp.down_proj
    assert q.method.name == "nf4" and q in quant.quantized_linears(model).values()
    if qc["bnb_4bit_use_double_quant"]:          # adopted bit for bit
        ref = hf.model.language_model.layers[1].mlp.down_proj.weight
        assert torch.equal(q.weight.flatten(), ref.data.flatten())
        assert torch.equal(q.absmax, ref.quant_state.absmax)
    enc = llm.tokenizer.encode_chat(image_chat([(56, 84)], "What is this?"))
    pv, sizes = hf_pixels(enc.images)
    with torch.no_grad():
        want = hf(input_ids=torch.tensor([enc.token_ids]), pixel_values=pv, image_sizes=sizes).logits[0]
    # double-quant: the same weights exactly; plain absmax: we 8-bit quantize the float absmax as our own nf4
    bound = 1e-5 if qc["bnb_4bit_use_double_quant"] else 0.02
    assert rel(logits(model, enc.token_ids, enc.images), want) < bound
    out = llm.generate("Hello", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 5


def test_prequantized_errors(prequantized, tmp_path):
    path, _ = prequantized
    with pytest.raises(CheckpointError, match="pre-quantized nf4.*quantization='nf4'"):
        load_model(resolve(path), quantization="fp8", progress=False)
    # a group without its scales is named, before any weight is read
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    from safetensors.torch import load_file, save_file
    tensors = load_file(bad / "model.safetensors")
    key = next(k for k in tensors if k.endswith("layers.0.self_attn.q_proj.weight.absmax"))
    del tensors[key]
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"q_proj.weight: quantized weight without its absmax"):
        load_model(resolve(bad), progress=False)
    # other pre-quantized formats are refused by name
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="bitsandbytes 8-bit checkpoints are not supported"):
        load_model(resolve(bad), progress=False)
