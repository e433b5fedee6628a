"""Finding, checking and streaming the checkpoint into the model.

Two formats of the same weights exist (weights.md):
- "hf": config.json + model-XXXXX-of-XXXXX.safetensors (+ index), keys as transformers 4.50 saved them
  (`language_model.model.*`) or as 5.x saves them (`model.language_model.*`);
- "mistral" (native): params.json + consolidated.safetensors, Mistral names, q/k laid out for interleaved RoPE.
A directory holding both is loaded in exactly one format (`load_format`).
`load_format="dummy"` needs only the config (config.json, else params.json) and tekken.json: every tensor the
checkpoint of that format would hold is made on the target device instead of read (engine/dummy_weights.py)
and then goes through the same path as a real one.

Loading is strict and happens in two phases: first every file's header is read and checked against the
model (missing, unexpected, misshapen tensors and unreadable files are all reported in one error), then
tensors stream one at a time into parameters preallocated on the target device. Nothing is returned unless
every parameter was written.

The module tree merges q/k/v and gate/up into single projections (engine/layers/linear.py); the checkpoint
names each shard (`….q_proj.weight`), and `targets` lists every tensor the model needs under that name:
the name table stays one mapping from either format onto HF 4.50 names, and a missing shard is reported
by its own name. With `quantization` ("nf4", "int8", "fp8"; engine/quant.py) the decoder linears get only
quantized storage, and each shard is quantized into its rows as it arrives instead of being copied: no
full-precision copy of the model ever exists on the device. A pre-quantized bitsandbytes nf4 checkpoint (config.json's
quantization_config) is read as groups of tensors per quantized weight and adopted without requantizing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from engine import quant
from engine.config import ModelConfig, load_config, read_config
from engine.dummy_weights import DummyWeights
from engine.layers.linear import Linear, LinearMethod
from engine.models.mistral3 import Mistral3ForConditionalGeneration

log = logging.getLogger(__name__)

DEFAULT_MODEL = "mistralai/Mistral-Small-3.1-24B-Instruct-2503"
LOAD_FORMATS = ("auto", "hf", "mistral", "dummy")
_HF_FILES = ["config.json", "model*.safetensors", "model.safetensors.index.json", "tekken.json",
             "generation_config.json"]
_NATIVE_FILES = ["params.json", "consolidated.safetensors", "tekken.json"]
_DUMMY_FILES = ["config.json", "params.json", "tekken.json"]
DUMMY_SOURCE = "dummy-weights"          # what errors and progress name as the "file" of dummy tensors


class CheckpointError(RuntimeError):
    """The checkpoint cannot be used as it is: the message lists every problem found."""


@dataclass(frozen=True)
class Checkpoint:
    directory: Path
    format: str                 # "hf" or "mistral"
    config_path: Path
    files: tuple[Path, ...]     # safetensors files to read
    dummy: bool = False         # tensors made on the device (load_format="dummy"), named as in `format`

    @cached_property
    def raw_config(self) -> dict:
        """config.json / params.json, read once (frozen: the checkpoint's files do not change under it)."""
        return read_config(self.config_path)

    @cached_property
    def _config(self) -> ModelConfig:
        return load_config(self.config_path, self.raw_config)

    def config(self) -> ModelConfig:
        return self._config

    def prequantized(self) -> str | None:
        """"nf4" for a bitsandbytes 4-bit checkpoint (config.json's quantization_config, as transformers
        writes it), None for full-precision weights. Other pre-quantized formats are refused by name."""
        if self.format != "hf":
            return None
        qc = self.raw_config.get("quantization_config")
        if not qc:
            return None
        if self.dummy:
            raise CheckpointError(f"{self.config_path}: load_format='dummy' makes full-precision weights, but this "
                                  "config describes a pre-quantized checkpoint; drop its quantization_config and "
                                  "pass quantization='nf4' to quantize them while loading")
        method = qc.get("quant_method")
        if method == "bitsandbytes" and qc.get("load_in_4bit") and qc.get("bnb_4bit_quant_type", "nf4") == "nf4":
            return "nf4"
        what = method if method != "bitsandbytes" else \
            ("bitsandbytes 8-bit" if qc.get("load_in_8bit") else f"bitsandbytes {qc.get('bnb_4bit_quant_type')}")
        raise CheckpointError(f"{self.directory}: pre-quantized {what} checkpoints are not supported (bitsandbytes "
                              "nf4 is); load the bf16 checkpoint with quantization='nf4' | 'int8' | 'fp8'")


# ---- where the files are ---------------------------------------------------------------------------------
def resolve(model: str | os.PathLike, load_format: str = "auto", revision: str | None = None) -> Checkpoint:
    """A local directory, or a hub id fetched with huggingface_hub (downloaded when online, the local cache
    when offline)."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    path = Path(model).expanduser()
    if path.is_dir():
        return _select(path, load_format)
    if path.exists() or str(model).startswith((".", "/", "~")) or str(model).count("/") != 1:
        raise CheckpointError(f"{model}: not a model directory, and not a hub id of the form 'org/name'. "
                              "See weights.md for the files a model directory needs.")
    return _select(_download(str(model), load_format, revision), load_format)


def _download(repo_id: str, load_format: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    patterns = {"mistral": _NATIVE_FILES, "dummy": _DUMMY_FILES}.get(load_format, _HF_FILES)
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as online_error:     # offline, no network, gated repo without token, ...
        try:
            return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                          local_files_only=True))
        except Exception:
            raise CheckpointError(
                f"{repo_id}: cannot download it ({type(online_error).__name__}: {online_error}) and no "
                f"complete copy is in the local Hugging Face cache. Download it on a machine with network "
                f"access (see weights.md: which files, how to log in for this gated repo), then pass the "
                f"directory, or copy the cache here.") from None


def _select(d: Path, load_format: str) -> Checkpoint:
    if load_format == "dummy":      # the HF config when both exist, as "auto" prefers the HF format
        for name, fmt in (("config.json", "hf"), ("params.json", "mistral")):
            if (d / name).is_file():
                return Checkpoint(d, fmt, d / name, (d / DUMMY_SOURCE,), dummy=True)
        raise CheckpointError(f"{d}: load_format 'dummy' needs config.json or params.json (and tekken.json)")
    hf_files = sorted(d.glob("model*.safetensors"))
    has_hf = (d / "config.json").is_file() and bool(hf_files)
    has_native = (d / "params.json").is_file() and (d / "consolidated.safetensors").is_file()
    if load_format == "auto":
        if not (has_hf or has_native):
            raise CheckpointError(
                f"{d}: no checkpoint found: need config.json + model*.safetensors (HF format) or "
                f"params.json + consolidated.safetensors (native format); see weights.md")
        # The HF config.json of this model is published and exactly known; prefer it when both exist.
        load_format = "hf" if has_hf else "mistral"
        if has_hf and has_native:
            log.warning("%s holds both checkpoint formats; loading the HF format (config.json + %d "
                        "model*.safetensors). Pass load_format='mistral' (--load-format mistral) to load "
                        "params.json + consolidated.safetensors instead.", d, len(hf_files))
    if load_format == "hf":
        if not has_hf:
            raise CheckpointError(f"{d}: load_format 'hf' needs config.json and model*.safetensors")
        return Checkpoint(d, "hf", d / "config.json", tuple(_hf_shards(d, hf_files)))
    if not has_native:
        raise CheckpointError(f"{d}: load_format 'mistral' needs params.json and consolidated.safetensors")
    return Checkpoint(d, "mistral", d / "params.json", (d / "consolidated.safetensors",))


def _hf_shards(d: Path, found: list[Path]) -> list[Path]:
    """The shards named by model.safetensors.index.json (all of them must exist), else every model*.safetensors."""
    index = d / "model.safetensors.index.json"
    if not index.is_file():
        return found
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: unreadable index ({e})") from None
    missing = [n for n in names if not (d / n).is_file()]
    if missing:
        raise CheckpointError(f"{index} names shard files that are not in {d}: {', '.join(missing)}")
    return [d / n for n in names]


# ---- checkpoint names -> module names ----------------------------------------------------------------------
Transform = Callable[[torch.Tensor], torch.Tensor] | None

# transformers >= 4.52 saves under model.*; our modules follow the 4.50 names.
_HF_PREFIXES = [("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
                ("model.multi_modal_projector.", "multi_modal_projector."), ("lm_head.", "language_model.lm_head.")]

_NATIVE_TABLE = [
    (r"tok_embeddings\.weight", "language_model.model.embed_tokens.weight"),
    (r"norm\.weight", "language_model.model.norm.weight"),
    (r"output\.weight", "language_model.lm_head.weight"),
    (r"layers\.(\d+)\.attention_norm\.weight", r"language_model.model.layers.\1.input_layernorm.weight"),
    (r"layers\.(\d+)\.attention\.wq\.weight", r"language_model.model.layers.\1.self_attn.q_proj.weight"),
    (r"layers\.(\d+)\.attention\.wk\.weight", r"language_model.model.layers.\1.self_attn.k_proj.weight"),
    (r"layers\.(\d+)\.attention\.wv\.weight", r"language_model.model.layers.\1.self_attn.v_proj.weight"),
    (r"layers\.(\d+)\.attention\.wo\.weight", r"language_model.model.layers.\1.self_attn.o_proj.weight"),
    (r"layers\.(\d+)\.ffn_norm\.weight", r"language_model.model.layers.\1.post_attention_layernorm.weight"),
    (r"layers\.(\d+)\.feed_forward\.w1\.weight", r"language_model.model.layers.\1.mlp.gate_proj.weight"),
    (r"layers\.(\d+)\.feed_forward\.w2\.weight", r"language_model.model.layers.\1.mlp.down_proj.weight"),
    (r"layers\.(\d+)\.feed_forward\.w3\.weight", r"language_model.model.layers.\1.mlp.up_proj.weight"),
    (r"vision_encoder\.patch_conv\.weight", "vision_tower.patch_conv.weight"),
    (r"vision_encoder\.ln_pre\.weight", "vision_tower.ln_pre.weight"),
    (r"vision_encoder\.transformer\.layers\.(\d+)\.attention\.w([qkvo])\.weight",
     r"vision_tower.transformer.layers.\1.attention.\2_proj.weight"),
    (r"vision_encoder\.transformer\.layers\.(\d+)\.(attention_norm|ffn_norm)\.weight",
     r"vision_tower.transformer.layers.\1.\2.weight"),
    (r"vision_encoder\.transformer\.layers\.(\d+)\.feed_forward\.w1\.weight",
     r"vision_tower.transformer.layers.\1.feed_forward.gate_proj.weight"),
    (r"vision_encoder\.transformer\.layers\.(\d+)\.feed_forward\.w2\.weight",
     r"vision_tower.transformer.layers.\1.feed_forward.down_proj.weight"),
    (r"vision_encoder\.transformer\.layers\.(\d+)\.feed_forward\.w3\.weight",
     r"vision_tower.transformer.layers.\1.feed_forward.up_proj.weight"),
    (r"pre_mm_projector_norm\.weight", "multi_modal_projector.norm.weight"),
    (r"patch_merger\.merging_layer\.weight", "multi_modal_projector.patch_merger.merging_layer.weight"),
    (r"vision_language_adapter\.w_in\.weight", "multi_modal_projector.linear_1.weight"),
    (r"vision_language_adapter\.w_out\.weight", "multi_modal_projector.linear_2.weight"),
]
_NATIVE_TABLE = [(re.compile(p), r) for p, r in _NATIVE_TABLE]


def rope_permute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Native q/k rows (interleaved RoPE pairs per head) -> HF rows (rotate-half halves per head)."""
    out, inp = w.shape
    return w.view(n_heads, out // n_heads // 2, 2, inp).transpose(1, 2).reshape(out, inp)


def rope_unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of rope_permute: HF rows -> native rows."""
    out, inp = w.shape
    return w.view(n_heads, 2, out // n_heads // 2, inp).transpose(1, 2).reshape(out, inp)


def map_name(key: str, fmt: str, cfg: ModelConfig) -> tuple[str, Transform] | None:
    """The module parameter a checkpoint tensor belongs to, and the transform it needs; None if unknown."""
    if fmt == "hf":
        for old, new in _HF_PREFIXES:
            if key.startswith(old):
                return new + key[len(old):], None
        return key, None
    for pat, repl in _NATIVE_TABLE:
        if pat.fullmatch(key):
            name = pat.sub(repl, key)
            if name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
                heads = cfg.text.num_attention_heads if ".q_proj" in name else cfg.text.num_key_value_heads
                return name, lambda w, h=heads: rope_permute(w, h)
            if name.endswith(("attention.q_proj.weight", "attention.k_proj.weight")):
                return name, lambda w, h=cfg.vision.num_attention_heads: rope_permute(w, h)
            return name, None
    return None


# ---- loading ------------------------------------------------------------------------------------------------
_FLOAT_DTYPES = {"BF16", "F16", "F32", "F64"}


@dataclass
class _Entry:
    file: Path
    key: str
    param: str
    transform: Transform
    nbytes: int
    # a bitsandbytes 4-bit tensor: part ("weight", "absmax", ...) -> (file, key)
    parts: dict[str, tuple[Path, str]] | None = None


@dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor goes: a plain parameter, or one shard of a (merged) Linear."""
    shape: tuple
    param: torch.Tensor | None = None
    linear: Linear | None = None
    shard: int = 0


def targets(model: torch.nn.Module) -> dict[str, Target]:
    """Every tensor the checkpoint must provide, by its HF 4.50 name: a merged projection stands for one
    tensor per shard (`….self_attn.qkv_proj` -> `….self_attn.q_proj.weight`, `k_proj`, `v_proj`)."""
    out = {}
    for prefix, module in model.named_modules():
        if isinstance(module, Linear):
            parent = prefix.rpartition(".")[0]
            names = [f"{parent}.{s}" if parent else s for s in module.shard_names] if module.shard_names \
                else [prefix]
            for i, (name, rows) in enumerate(zip(names, module.output_sizes)):
                out[name + ".weight"] = Target((rows, module.in_features), linear=module, shard=i)
            continue
        for name, p in module.named_parameters(recurse=False):
            out[f"{prefix}.{name}" if prefix else name] = Target(tuple(p.shape), param=p)
    return out


def plan(ckpt: Checkpoint, model: torch.nn.Module, prequantized: str | None = None) -> list[_Entry]:
    """Read only the headers and match every tensor to a parameter. Raises one CheckpointError listing all
    unreadable files, unknown, duplicate, missing and misshapen tensors. In a pre-quantized (bitsandbytes
    nf4) checkpoint a quantized weight is a group of tensors (`X.weight` packed uint8, `X.weight.absmax`,
    ...): the group stands for parameter `X.weight`."""
    cfg = ckpt.config()
    expected = {n: t.shape for n, t in targets(model).items()}
    entries: dict[str, _Entry] = {}
    groups: dict[str, dict[str, tuple[Path, str, tuple, str]]] = {}
    present: set[str] = set()          # matched a parameter, whether usable or not
    bad_files, unexpected, misshapen, duplicate, bad_dtype = [], [], [], [], []
    for f in ckpt.files:
        try:
            with _open(ckpt, f) as st:
                for key in st.keys():
                    sl = st.get_slice(key)
                    shape, dtype = tuple(sl.get_shape()), sl.get_dtype()
                    part = _bnb_part(key, dtype) if prequantized else None
                    base = key[:-len(part) - 1] if part and part != "weight" else key
                    mapped = map_name(base, ckpt.format, cfg)
                    if mapped is None or mapped[0] not in expected:
                        unexpected.append(f"{key} ({f.name})")
                        continue
                    name, transform = mapped
                    if part:
                        groups.setdefault(name, {})[part] = (f, key, shape, dtype)
                        continue
                    if name in present:
                        duplicate.append(f"{key} ({f.name}; mapped to {name} twice)")
                    elif shape != expected[name]:
                        misshapen.append(f"{key}: {list(shape)} in {f.name}, expected {list(expected[name])}")
                    elif dtype not in _FLOAT_DTYPES:
                        bad_dtype.append(f"{key}: dtype {dtype}")
                    else:
                        entries[name] = _Entry(f, key, name, transform, _nbytes(shape, dtype))
                    present.add(name)
        except (SafetensorError, OSError) as e:
            bad_files.append(f"{f}: corrupt or truncated safetensors file ({e})")
    for name, g in groups.items():
        if name in present:
            duplicate.append(f"{name}: both a full-precision and a quantized copy")
            continue
        present.add(name)
        n = math.prod(expected[name])
        lacking = [p for p in ("weight", "absmax", "quant_map") if p not in g] + \
            ([] if any(p.startswith("quant_state.") for p in g) else ["quant_state.bitsandbytes__nf4"])
        if lacking:
            misshapen.append(f"{name}: quantized weight without its {', '.join(lacking)}")
        elif g["weight"][2] not in ((-(-n // 2), 1), (-(-n // 2),)):
            misshapen.append(f"{g['weight'][1]}: {list(g['weight'][2])} packed bytes, expected "
                             f"[{-(-n // 2)}, 1] for a 4-bit {list(expected[name])}")
        else:
            w = g["weight"]
            entries[name] = _Entry(w[0], w[1], name, None, sum(_nbytes(v[2], v[3]) for v in g.values()),
                                   parts={p: (v[0], v[1]) for p, v in g.items()})
    missing = [n for n in expected if n not in present]
    problems = []
    for title, items in (("unreadable files", bad_files), ("missing tensors", missing),
                         ("unexpected tensors", unexpected), ("misshapen tensors", misshapen),
                         ("duplicate tensors", duplicate), ("unsupported dtypes", bad_dtype)):
        if items:
            shown = items if len(items) <= 50 else items[:50] + [f"... and {len(items) - 50} more"]
            problems.append(f"{len(items)} {title}:\n  " + "\n  ".join(shown))
    if problems:
        raise CheckpointError(f"checkpoint {ckpt.directory} ({ckpt.format} format) does not match "
                              f"Mistral3ForConditionalGeneration:\n" + "\n".join(problems))
    return sorted(entries.values(), key=lambda e: (str(e.file), e.key))


def _open(ckpt: Checkpoint, f: Path, device: torch.device | str = "cpu"):
    """A safetensors file opened for reading, tensors to the host; for a dummy checkpoint, the stand-in that
    makes each tensor on `device` when it is asked for."""
    if ckpt.dummy:
        return DummyWeights(ckpt.config(), ckpt.format, device)
    return safe_open(f, framework="pt", device="cpu")


def _bnb_part(key: str, dtype: str) -> str | None:
    """Which part of a bitsandbytes 4-bit group `key` is ("weight" for the packed codes), or None."""
    for part in quant.BNB_4BIT_PARTS:
        if key.endswith(".weight." + part):
            return part
    return "weight" if key.endswith(".weight") and dtype == "U8" else None


def _nbytes(shape: tuple, dtype: str) -> int:
    return math.prod(shape) * _itemsize(dtype)


def _itemsize(dtype: str) -> int:
    return {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "U8": 1, "I8": 1}[dtype]


def materialize(cfg: ModelConfig, device: torch.device | str, dtype: torch.dtype,
                quantization: str | None = None) -> Mistral3ForConditionalGeneration:
    """The module tree built on the meta device, then given empty storage directly on the target
    device and dtype: no throwaway initialization, no second copy. With `quantization`, the decoder
    linears get that method's storage, so that only their quantized storage is ever allocated."""
    quant.check_quantization(quantization)
    with torch.device("meta"):
        model = Mistral3ForConditionalGeneration(cfg)
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            method = quant.linear_method(quantization) if quantization and quant.is_quantized(name) \
                else LinearMethod()
            module.create_weights(method, device, dtype)
            continue
        for pname, p in list(module.named_parameters(recurse=False)):
            setattr(module, pname, torch.nn.Parameter(torch.empty(p.shape, dtype=dtype, device=device),
                                                      requires_grad=False))
    return model.eval()


def load_model(ckpt: Checkpoint, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               progress: bool = True, quantization: str | None = None) -> Mistral3ForConditionalGeneration:
    prequantized = ckpt.prequantized()
    if prequantized:
        if quantization not in (None, prequantized):
            raise CheckpointError(f"{ckpt.directory} is pre-quantized {prequantized}: load it with "
                                  f"quantization={prequantized!r} (or none), not {quantization!r}")
        quantization = prequantized
        log.info("%s: pre-quantized %s checkpoint (bitsandbytes)", ckpt.directory, prequantized)
    quant.check_quantization(quantization)               # an unknown method or a missing library: fail now
    cfg = ckpt.config()
    with torch.device("meta"):
        skeleton = Mistral3ForConditionalGeneration(cfg)
    entries = plan(ckpt, skeleton, prequantized)         # fails before any weight data is read
    expected = set(targets(skeleton))
    model = materialize(cfg, device, dtype, quantization)
    where = targets(model)
    written = set()
    if ckpt.dummy:
        log.warning("%s: load_format='dummy': random weights made on %s, not read from disk", ckpt.directory,
                    device)
    bar = tqdm(total=sum(e.nbytes for e in entries), unit="B", unit_scale=True, disable=not progress,
               desc=f"{'making dummy' if ckpt.dummy else 'loading'} {ckpt.format} weights"
               + (f" as {quantization}" if quantization else ""))
    by_file: dict[Path, list[_Entry]] = {}
    for e in entries:
        by_file.setdefault(e.file, []).append(e)
    for f, file_entries in by_file.items():
        try:
            with _open(ckpt, f, device) as st:
                for e in file_entries:
                    target = where[e.param]
                    if e.parts:
                        _load_prequantized(e, st, target)
                    else:
                        t = st.get_tensor(e.key)
                        if e.transform is not None:
                            t = e.transform(t)
                        if target.linear is not None:
                            target.linear.load_shard(target.shard, t)    # quantized chunk by chunk if so
                        else:
                            target.param.copy_(t)     # dtype conversion and host->device copy in one step
                        del t
                    written.add(e.param)
                    bar.update(e.nbytes)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{f}: failed while reading tensor data ({err}); the file is corrupt or "
                                  "truncated") from None
        except ValueError as err:         # a quantized group that bitsandbytes' state does not describe
            raise CheckpointError(f"{f}: {err}") from None
    bar.close()
    if written != expected:   # cannot happen after plan(); never hand out a half-loaded model
        raise CheckpointError(f"internal: {len(expected - written)} parameters were not loaded")
    if quantization:
        log.info("%d decoder linears quantized to %s; weights now take %.2f GiB", len(quant.quantized_linears(model)),
                 quantization, sum(p.nbytes for p in model.parameters()) / 2**30)
    return model


def _load_prequantized(e: _Entry, st, target: Target) -> None:
    """One bitsandbytes 4-bit group: adopted as is by an nf4 linear, or dequantized into a full-precision
    parameter (a module this engine keeps unquantized, e.g. a vision tower that the checkpoint quantized)."""
    parts = {}
    for part, (f, key) in e.parts.items():
        if f == e.file:
            parts[part] = st.get_tensor(key)
        else:                               # a group split over two shards
            with safe_open(f, framework="pt", device="cpu") as other:
                parts[part] = other.get_tensor(key)
    try:
        layer = target.linear
        if layer is not None and layer.method.name == "nf4":
            layer.method.load_prequantized_shard(layer, target.shard, parts)
        elif layer is not None:
            layer.load_shard(target.shard, quant.dequantize_prequantized(parts, target.shape))
        else:
            target.param.copy_(quant.dequantize_prequantized(parts, target.param.shape))
    except ValueError as err:
        raise ValueError(f"{e.param}: {err}") from None
