"""Checkpoint discovery, name mapping, strict loading and their errors."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from util import measure_load

from engine import weights
from engine.config import ConfigError
from engine.forward_context import ForwardContext
from engine.tiny_checkpoint import TINY
from engine.weights import CheckpointError, load_model, resolve

IDS = torch.tensor([1, 3, 10, 10, 12, 10, 10, 13, 500, 7000, 4, 99, 123456])
IMAGE = torch.randn(3, 56, 56, generator=torch.Generator().manual_seed(0))   # 2x2 [IMG] grid


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        emb = torch.cat(model.encode_images([IMAGE]))
        h = model(IDS, torch.arange(len(IDS)), ForwardContext.for_prefill([len(IDS)]), emb)
        return model.compute_logits(h)


@pytest.fixture(scope="module")
def reference_logits(make_checkpoint):
    return logits_of(load_model(resolve(make_checkpoint("hf"), "hf"), progress=False))


@pytest.mark.parametrize("fmt,keys,style", [("hf", "5", "5"), ("hf", "5", "4.50"), ("hf", "4.50", "5"),
                                            ("mistral", "4.50", "4.50")])
def test_every_layout_loads_to_identical_logits(make_checkpoint, reference_logits, fmt, keys, style):
    d = make_checkpoint(fmt, keys, style)
    if fmt == "hf":
        sample = next(iter(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]))
        assert sample.startswith("model.") or sample.startswith("lm_head") if keys == "5" else \
            sample.startswith(("language_model.", "vision_tower.", "multi_modal_projector."))
        cfg = json.loads((d / "config.json").read_text())["text_config"]
        assert ("rope_parameters" in cfg) == (style == "5")
    ckpt = resolve(d)
    assert ckpt.format == fmt
    assert torch.equal(logits_of(load_model(ckpt, progress=False)), reference_logits)


def test_transformers_reads_both_key_generations(make_checkpoint, reference_logits):
    from transformers import Mistral3ForConditionalGeneration
    hf = Mistral3ForConditionalGeneration.from_pretrained(make_checkpoint("hf", "5", "5"), dtype=torch.float32)
    with torch.no_grad():
        ref = hf(input_ids=IDS[None], pixel_values=IMAGE[None], image_sizes=torch.tensor([[56, 56]])).logits[0]
    assert ((ref - reference_logits).norm() / ref.norm()).item() < 1e-4


def _interleaved_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """The native convention (mistral-inference): consecutive pairs are complex numbers turned by angle."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * torch.polar(torch.ones_like(angles), angles)).flatten(-2)


def shard(linear, i: int) -> torch.Tensor:
    """Shard i of a merged projection (q, k, v of qkv_proj): its rows of the weight."""
    return linear.weight[linear.shard_slice(i)]


def test_native_qk_permutation_preserves_attention_scores(make_checkpoint):
    """Independent of our loader's table: attention scores computed the native way from consolidated.safetensors
    (interleaved RoPE) equal the ones our model computes from the permuted weights (rotate-half RoPE)."""
    d = make_checkpoint("mistral")
    native = load_file(d / "consolidated.safetensors")
    model = load_model(resolve(d, "mistral"), progress=False)
    t = TINY.text
    x = torch.randn(7, t.hidden_size)
    pos = torch.arange(7).float()
    inv = 1.0 / (t.rope_theta ** (torch.arange(0, t.head_dim, 2).float() / t.head_dim))
    ang = pos[:, None] * inv[None]                                   # [tokens, head_dim/2]

    def native_qk(name, heads):
        w = native[f"layers.0.attention.{name}.weight"].float()
        return _interleaved_rope((x @ w.T).view(7, heads, t.head_dim), ang[:, None, :])

    q_n, k_n = native_qk("wq", t.num_attention_heads), native_qk("wk", t.num_key_value_heads)
    from engine.layers.rotary import apply_rotary, rope_1d
    attn = model.language_model.model.layers[0].self_attn
    cos, sin = rope_1d(torch.arange(7), t.head_dim, t.rope_theta, torch.float32)
    q_h = apply_rotary((x @ shard(attn.qkv_proj, 0).T).view(7, t.num_attention_heads, t.head_dim), cos, sin)
    k_h = apply_rotary((x @ shard(attn.qkv_proj, 1).T).view(7, t.num_key_value_heads, t.head_dim), cos, sin)
    group = t.num_attention_heads // t.num_key_value_heads
    scores_n = torch.einsum("qhd,khd->hqk", q_n, k_n.repeat_interleave(group, 1))
    scores_h = torch.einsum("qhd,khd->hqk", q_h, k_h.repeat_interleave(group, 1))
    torch.testing.assert_close(scores_h, scores_n, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(shard(attn.qkv_proj, 0), native["layers.0.attention.wq.weight"].float())

    # vision: 2-D RoPE, pairs 0..d/4-1 turn with the row (even frequencies), the rest with the column (odd)
    v = TINY.vision
    rows, cols = torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    vinv = 1.0 / (v.rope_theta ** (torch.arange(0, v.head_dim, 2).float() / v.head_dim))
    vang = torch.cat([rows[:, None] * vinv[None, 0::2], cols[:, None] * vinv[None, 1::2]], -1)
    xv = torch.randn(12, v.hidden_size)
    wq = native["vision_encoder.transformer.layers.0.attention.wq.weight"].float()
    wk = native["vision_encoder.transformer.layers.0.attention.wk.weight"].float()
    qn = _interleaved_rope((xv @ wq.T).view(12, v.num_attention_heads, v.head_dim), vang[:, None])
    kn = _interleaved_rope((xv @ wk.T).view(12, v.num_attention_heads, v.head_dim), vang[:, None])
    from engine.layers.rotary import rope_2d
    va = model.vision_tower.transformer.layers[0].attention
    cos, sin = rope_2d(rows, cols, v.head_dim, v.rope_theta, torch.float32)
    qh = apply_rotary((xv @ shard(va.qkv_proj, 0).T).view(12, v.num_attention_heads, v.head_dim), cos, sin)
    kh = apply_rotary((xv @ shard(va.qkv_proj, 1).T).view(12, v.num_attention_heads, v.head_dim), cos, sin)
    torch.testing.assert_close(torch.einsum("qhd,khd->hqk", qh, kh), torch.einsum("qhd,khd->hqk", qn, kn),
                               rtol=1e-4, atol=1e-4)


def test_directory_with_both_formats_loads_exactly_one(make_checkpoint, caplog):
    d = make_checkpoint("both")
    with caplog.at_level(logging.WARNING):
        assert resolve(d).format == "hf"
    assert "both checkpoint formats" in caplog.text and "--load-format mistral" in caplog.text
    ckpt = resolve(d, "mistral")
    assert ckpt.format == "mistral" and ckpt.files == (d / "consolidated.safetensors",)
    with pytest.raises(ValueError, match="load_format must be one of"):
        resolve(d, "gguf")


def test_dtype_and_device_are_the_callers(make_checkpoint):
    model = load_model(resolve(make_checkpoint("hf")), "cpu", torch.bfloat16, progress=False)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}


# ---- broken checkpoints --------------------------------------------------------------------------------------
@pytest.fixture
def broken(make_checkpoint, tmp_path):
    """A writable copy of the tiny HF checkpoint (4.50 keys, one shard)."""
    src = make_checkpoint("hf")
    d = tmp_path / "ckpt"
    shutil.copytree(src, d, symlinks=True)
    return d


def _edit_shard(d: Path, edit):
    shard = d / "model-00001-of-00001.safetensors"
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


def test_missing_unexpected_and_misshapen_are_listed_together(broken):
    def edit(t):
        del t["language_model.model.layers.1.mlp.up_proj.weight"]        # one shard of a merged gate_up_proj
        del t["language_model.model.layers.0.self_attn.v_proj.weight"]   # one shard of a merged qkv_proj
        del t["vision_tower.ln_pre.weight"]
        t["language_model.model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
        t["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)
    _edit_shard(broken, edit)
    with pytest.raises(CheckpointError) as e:
        load_model(resolve(broken), progress=False)
    msg = str(e.value)
    assert "3 missing tensors" in msg and "layers.1.mlp.up_proj.weight" in msg and "vision_tower.ln_pre" in msg
    assert "layers.0.self_attn.v_proj.weight" in msg
    assert "1 unexpected tensors" in msg and "rotary_emb.inv_freq" in msg
    assert "1 misshapen tensors" in msg and "q_proj.weight: [3, 3]" in msg and "expected [128, 96]" in msg


def test_truncated_shard_names_the_file(broken):
    shard = broken / "model-00001-of-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model-00001-of-00001\.safetensors: corrupt or truncated"):
        load_model(resolve(broken), progress=False)


def test_garbage_shard_names_the_file(broken):
    (broken / "model-00001-of-00001.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" * 3)
    with pytest.raises(CheckpointError, match=r"model-00001-of-00001\.safetensors: corrupt or truncated"):
        load_model(resolve(broken), progress=False)


def test_index_naming_a_missing_shard(broken):
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    index["weight_map"]["language_model.lm_head.weight"] = "model-00002-of-00002.safetensors"
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        resolve(broken)


@pytest.mark.parametrize("edit,message", [
    (lambda c: c.update(model_type="llava"), "model_type is 'llava'"),
    (lambda c: c["text_config"].pop("rope_theta"), "rope_theta is missing"),
    (lambda c: c["text_config"].pop("num_key_value_heads"), "'num_key_value_heads' is missing"),
    (lambda c: c["text_config"].update(sliding_window=4096), "sliding_window=4096 is not supported"),
    (lambda c: c["vision_config"].update(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    (lambda c: c["text_config"].update(num_attention_heads=7), "not a multiple of num_key_value_heads"),
    (lambda c: c.update(vision_config=None), "text_config and vision_config must both be present"),
])
def test_wrong_config_is_a_clear_error(broken, edit, message):
    cfg = json.loads((broken / "config.json").read_text())
    edit(cfg)
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=message) as e:
        load_model(resolve(broken), progress=False)
    assert "config.json" in str(e.value)


def test_config_that_disagrees_with_the_tensors(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["text_config"]["num_hidden_layers"] = 3
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing tensors:\n  language_model\.model\.layers\.2\."):
        load_model(resolve(broken), progress=False)


def test_unparseable_config(broken):
    (broken / "config.json").write_text("{")
    with pytest.raises(ConfigError, match="cannot read model config"):
        resolve(broken).config()


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        resolve(tmp_path)
    with pytest.raises(CheckpointError, match="not a model directory"):
        resolve(tmp_path / "nope" / "deeper")


# ---- hub ids ---------------------------------------------------------------------------------------------
def _resolve_in_subprocess(cache: Path, repo: str):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent)}
    code = f"from engine.weights import resolve; c = resolve({repo!r}); print(c.format, c.directory)"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_hub_id_offline_with_empty_cache_points_to_weights_md(tmp_path):
    r = _resolve_in_subprocess(tmp_path / "hub", weights.DEFAULT_MODEL)
    assert r.returncode != 0
    assert "CheckpointError" in r.stderr and "weights.md" in r.stderr and weights.DEFAULT_MODEL in r.stderr


def test_hub_id_offline_uses_the_local_cache(make_checkpoint, tmp_path):
    """A snapshot in the standard cache layout (models--org--name/snapshots/REV + refs/main) is found offline."""
    cache = tmp_path / "hub"
    repo = cache / "models--mistralai--Mistral-Small-3.1-24B-Instruct-2503"
    rev = "0" * 40
    snap = repo / "snapshots" / rev
    shutil.copytree(make_checkpoint("hf"), snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    r = _resolve_in_subprocess(cache, weights.DEFAULT_MODEL)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["hf", str(snap)]


# ---- memory -------------------------------------------------------------------------------------------
def test_streamed_load_keeps_anonymous_memory_bounded(tmp_path):
    """A >= 1 GB checkpoint: while loading, anonymous memory never exceeds the final model plus twice the
    largest tensor plus a fixed overhead (no whole-file or whole-shard copies in memory)."""
    from engine.config import ModelConfig, TextConfig, VisionConfig
    from engine.tiny_checkpoint import write_checkpoint
    cfg = ModelConfig(text=TextConfig(vocab_size=1024, hidden_size=2048, intermediate_size=8192,
                                      num_hidden_layers=10, num_attention_heads=16, num_key_value_heads=4,
                                      head_dim=128),
                      vision=VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                          num_attention_heads=4, head_dim=16))
    d = write_checkpoint(tmp_path / "big", cfg, "hf", shard_bytes=400 * 2**20, tokenizer=False)
    size = sum(f.stat().st_size for f in d.glob("*.safetensors"))
    assert size >= 2**30 and len(list(d.glob("model-*.safetensors"))) >= 3
    m = measure_load(d, timeout=600)
    overhead = 64 * 2**20
    transient = m["peak"] - m["after"]
    print(f"checkpoint {size / 2**30:.2f} GiB, largest tensor {m['largest'] / 2**20:.0f} MiB, "
          f"model growth {(m['after'] - m['before']) / 2**30:.2f} GiB, transient peak {transient / 2**20:.0f} MiB")
    assert m["after"] - m["before"] >= 0.95 * m["model_bytes"]     # the probe does see the weights arrive
    assert transient <= 2 * m["largest"] + overhead
