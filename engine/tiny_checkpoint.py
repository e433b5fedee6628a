"""Write random-weight checkpoints of the real Mistral3 architecture, in HF and/or native format.

No machine here can download the real weights, so tests, the demo server and GPU benchmarks run on
checkpoints this module writes: the same tensor names, layouts and file formats as the published ones,
with small sizes ("tiny") or the real 24B shapes ("full"), plus a v7 tekken.json rebuilt from the
vocabulary that ships with mistral-common.

    python -m engine.tiny_checkpoint OUT_DIR [--preset tiny|full] [--format hf|mistral|both]
                                             [--keys 4.50|5] [--config-style 4.50|5] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.config import ModelConfig, TextConfig, VisionConfig
from engine.dummy_weights import checkpoint_tensors
from engine.weights import _HF_PREFIXES, map_name, rope_unpermute, targets

TINY = ModelConfig(
    # GQA 4:1 and q_proj width (8*16=128) != hidden (96), like the real model (32:8, 4096 vs 5120)
    text=TextConfig(vocab_size=131072, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                    num_attention_heads=8, num_key_value_heads=2, head_dim=16),
    vision=VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        head_dim=16),
)
PRESETS = {"tiny": TINY, "full": ModelConfig()}


def native_keys(cfg: ModelConfig) -> list[str]:
    return list(checkpoint_tensors(cfg, "mistral"))


def _hf_new_key(name: str) -> str:
    for new, old in _HF_PREFIXES:          # module name (4.50 key) -> transformers >= 4.52 key
        if name.startswith(old):
            return new + name[len(old):]
    return name


def random_weights(cfg: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                   device: str = "cpu"):
    """Yields (checkpoint name, tensor) in module order (one tensor per shard of a merged projection). Linear weights ~ N(0, 1/fan_in) so every layer
    moves the residual stream; norm weights ~ 1 + N(0, 0.1²) so a mix-up of norms shows in the logits."""
    from engine.models.mistral3 import Mistral3ForConditionalGeneration

    with torch.device("meta"):
        skeleton = Mistral3ForConditionalGeneration(cfg)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, target in targets(skeleton).items():       # checkpoint names: one tensor per merged shard
        shape = target.shape
        w = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
        if name.endswith("norm.weight"):
            w = 1.0 + 0.1 * w
        elif "embed_tokens" not in name:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            w = w * fan_in ** -0.5
        yield name, w.to(dtype)


def write_checkpoint(out: str | Path, cfg: ModelConfig = TINY, fmt: str = "hf", keys: str = "4.50",
                     config_style: str = "4.50", seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                     shard_bytes: int = 5 * 2**30, device: str = "cpu", tokenizer: bool = True) -> Path:
    """Write the checkpoint (and tekken.json) into `out`; fmt "both" writes the two formats side by side
    from the same random weights."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    formats = ("hf", "mistral") if fmt == "both" else (fmt,)
    if any(f not in ("hf", "mistral") for f in formats):
        raise ValueError(f"format must be hf, mistral or both, got {fmt!r}")
    if keys not in ("4.50", "5"):
        raise ValueError(f"keys must be '4.50' or '5', got {keys!r}")
    to_native = {map_name(k, "mistral", cfg)[0]: k for k in native_keys(cfg)}
    if "hf" in formats:
        (out / "config.json").write_text(json.dumps(cfg.to_hf_dict(config_style), indent=2))
    if "mistral" in formats:
        (out / "params.json").write_text(json.dumps(cfg.to_native_dict(), indent=2))
    hf_shards: list[dict[str, torch.Tensor]] = [{}]
    hf_size, native = 0, {}
    for name, w in random_weights(cfg, seed, dtype, device):
        w = w.cpu()
        if "hf" in formats:
            if hf_size + w.nbytes > shard_bytes and hf_shards[-1]:
                _flush(out, hf_shards)
                hf_size = 0
            hf_shards[-1][name if keys == "4.50" else _hf_new_key(name)] = w
            hf_size += w.nbytes
        if "mistral" in formats:
            key = to_native[name]
            if re.search(r"\.attention\.w[qk]\.weight$", key):
                heads = cfg.vision.num_attention_heads if key.startswith("vision_encoder") else (
                    cfg.text.num_attention_heads if key.endswith("wq.weight") else cfg.text.num_key_value_heads)
                w = rope_unpermute(w, heads).contiguous()
            native[key] = w
    if "hf" in formats:
        _flush(out, hf_shards, final=True)
    if "mistral" in formats:
        save_file(native, out / "consolidated.safetensors", metadata={"format": "pt"})
    if tokenizer and not (out / "tekken.json").exists():
        from engine.tokenizer import write_tekken_v7
        write_tekken_v7(out / "tekken.json")
    return out


def _flush(out: Path, shards: list[dict], final: bool = False) -> None:
    """Shards are written under temporary names as they fill (so a full-size checkpoint never sits in
    memory) and renamed to model-XXXXX-of-NNNNN.safetensors with an index once the count is known."""
    if shards[-1]:
        save_file(shards[-1], out / f".shard-{len(shards):05d}.tmp", metadata={"format": "pt"})
        shards[-1] = {k: None for k in shards[-1]}      # keep the names for the index, drop the data
        shards.append({})
    if not final:
        return
    shards.pop()
    n, weight_map = len(shards), {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        (out / f".shard-{i:05d}.tmp").rename(out / name)
        weight_map.update({k: name for k in shard})
    total = sum((out / f).stat().st_size for f in set(weight_map.values()))
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m engine.tiny_checkpoint", description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--format", choices=["hf", "mistral", "both"], default="both")
    ap.add_argument("--keys", choices=["4.50", "5"], default="4.50", help="HF key generation")
    ap.add_argument("--config-style", choices=["4.50", "5"], default="4.50", help="config.json rope_theta style")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--device", default="cpu", help="where random weights are generated (cuda is faster)")
    args = ap.parse_args(argv)
    cfg = PRESETS[args.preset]
    path = write_checkpoint(args.out, cfg, args.format, args.keys, args.config_style, args.seed,
                            getattr(torch, args.dtype), device=args.device)
    print(f"wrote a random-weight {args.preset} Mistral3 checkpoint ({args.format}) to {path}")


if __name__ == "__main__":
    main()
