"""Model configuration, normalized once from either checkpoint format into frozen dataclasses.

Two sources describe the same architecture:
- HF `config.json` (Mistral3ForConditionalGeneration), as written by transformers 4.50 (`rope_theta` flat)
  or 5.x (`rope_parameters: {rope_theta, rope_type}`);
- native `params.json` (`dim`, `n_layers`, ..., `vision_encoder: {...}`).
Everything downstream reads only `ModelConfig`; no other module looks at raw config dicts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

QUANTIZATIONS = ("nf4", "int8", "fp8")
KV_CACHE_DTYPES = ("auto", "fp8")
ATTENTION_BACKENDS = ("auto", "triton", "reference")


class ConfigError(ValueError):
    """A config file is missing, unreadable, or describes a model this engine does not implement."""


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 131072
    hidden_size: int = 5120
    intermediate_size: int = 32768
    num_hidden_layers: int = 40
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rope_theta: float = 1_000_000_000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    head_dim: int = 64
    patch_size: int = 14
    image_size: int = 1540
    num_channels: int = 3
    rope_theta: float = 10_000.0


@dataclass(frozen=True)
class ImageConfig:
    """Image geometry: every image is cut into patch_size² patches, merged spatial_merge_size² into one [IMG]
    token, after resizing to at most max_image_size a side. The model's own values (ModelConfig.image) are
    the only source; the defaults below are Mistral Small 3.1's."""
    patch_size: int = VisionConfig.patch_size
    max_image_size: int = VisionConfig.image_size
    spatial_merge_size: int = 2

    @property
    def token_pixels(self) -> int:
        """Pixels per [IMG] token side (28)."""
        return self.patch_size * self.spatial_merge_size


@dataclass(frozen=True)
class ModelConfig:
    text: TextConfig = TextConfig()
    vision: VisionConfig = VisionConfig()
    spatial_merge_size: int = ImageConfig.spatial_merge_size
    image_token_id: int = 10
    image_break_token_id: int = 12
    image_end_token_id: int = 13
    bos_token_id: int = 1
    eos_token_id: int = 2

    @property
    def image(self) -> ImageConfig:
        return ImageConfig(self.vision.patch_size, self.vision.image_size, self.spatial_merge_size)

    # ---- HF config.json ------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, cfg: dict) -> ModelConfig:
        if cfg.get("model_type") != "mistral3":
            raise ConfigError(f"config.json: model_type is {cfg.get('model_type')!r}, expected 'mistral3' "
                              "(Mistral3ForConditionalGeneration)")
        t, v = cfg.get("text_config"), cfg.get("vision_config")
        if not isinstance(t, dict) or not isinstance(v, dict):
            raise ConfigError("config.json: text_config and vision_config must both be present")
        _expect(cfg, "projector_hidden_act", "gelu", "config.json")
        _expect(cfg, "multimodal_projector_bias", False, "config.json")
        _expect(cfg, "vision_feature_layer", -1, "config.json")
        _expect(t, "hidden_act", "silu", "config.json text_config")
        _expect(v, "hidden_act", "silu", "config.json vision_config")
        if t.get("sliding_window") is not None:
            raise ConfigError(f"config.json text_config: sliding_window={t['sliding_window']} is not supported "
                              "(Mistral Small 3.1 attends over the full context: it must be null)")
        text = TextConfig(
            vocab_size=_req(t, "vocab_size", int, "text_config"),
            hidden_size=_req(t, "hidden_size", int, "text_config"),
            intermediate_size=_req(t, "intermediate_size", int, "text_config"),
            num_hidden_layers=_req(t, "num_hidden_layers", int, "text_config"),
            num_attention_heads=_req(t, "num_attention_heads", int, "text_config"),
            num_key_value_heads=_req(t, "num_key_value_heads", int, "text_config"),
            head_dim=_req(t, "head_dim", int, "text_config"),
            rope_theta=_rope_theta(t, "text_config"),
            rms_norm_eps=_req(t, "rms_norm_eps", float, "text_config"),
            max_position_embeddings=int(t.get("max_position_embeddings", 131072)),
        )
        vision = VisionConfig(
            hidden_size=_req(v, "hidden_size", int, "vision_config"),
            intermediate_size=_req(v, "intermediate_size", int, "vision_config"),
            num_hidden_layers=_req(v, "num_hidden_layers", int, "vision_config"),
            num_attention_heads=_req(v, "num_attention_heads", int, "vision_config"),
            # transformers derives the Pixtral head size from hidden/heads and ignores head_dim
            head_dim=_req(v, "hidden_size", int, "vision_config") // _req(v, "num_attention_heads", int,
                                                                          "vision_config"),
            patch_size=_req(v, "patch_size", int, "vision_config"),
            image_size=_req(v, "image_size", int, "vision_config"),
            num_channels=int(v.get("num_channels", 3)),
            rope_theta=_rope_theta(v, "vision_config"),
        )
        image_token = cfg.get("image_token_index", cfg.get("image_token_id"))
        if image_token is None:
            raise ConfigError("config.json: image_token_index is missing")
        return cls(text=text, vision=vision, spatial_merge_size=_req(cfg, "spatial_merge_size", int, "config"),
                   image_token_id=int(image_token)).validated()

    def to_hf_dict(self, style: str = "4.50") -> dict:
        """config.json as transformers 4.50 (`rope_theta` flat) or 5.x (`rope_parameters`) writes it."""
        t, v = self.text, self.vision
        text = {"model_type": "mistral", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
                "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
                "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
                "head_dim": t.head_dim, "max_position_embeddings": t.max_position_embeddings,
                "rms_norm_eps": t.rms_norm_eps, "sliding_window": None, "hidden_act": "silu",
                "attention_dropout": 0.0, "tie_word_embeddings": False, "use_cache": True}
        vision = {"model_type": "pixtral", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
                  "num_hidden_layers": v.num_hidden_layers, "num_attention_heads": v.num_attention_heads,
                  "head_dim": v.head_dim, "patch_size": v.patch_size, "image_size": v.image_size,
                  "num_channels": v.num_channels, "hidden_act": "silu", "attention_dropout": 0.0}
        if style == "4.50":
            text["rope_theta"], vision["rope_theta"] = t.rope_theta, v.rope_theta
            version = "4.50.0.dev0"
        elif style == "5":
            text["rope_parameters"] = {"rope_theta": t.rope_theta, "rope_type": "default"}
            vision["rope_parameters"] = {"rope_theta": v.rope_theta, "rope_type": "axial"}
            version = "5.0.0"
        else:
            raise ValueError(f"unknown config style {style!r} (use '4.50' or '5')")
        return {"architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3",
                "torch_dtype": "bfloat16", "transformers_version": version,
                "image_token_index": self.image_token_id, "multimodal_projector_bias": False,
                "projector_hidden_act": "gelu", "spatial_merge_size": self.spatial_merge_size,
                "vision_feature_layer": -1, "tie_word_embeddings": False,
                "text_config": text, "vision_config": vision}

    # ---- native params.json --------------------------------------------------------------------------
    @classmethod
    def from_native_dict(cls, p: dict) -> ModelConfig:
        v = p.get("vision_encoder")
        if not isinstance(v, dict):
            raise ConfigError("params.json: vision_encoder is missing (this engine needs the vision model)")
        if p.get("sliding_window") is not None:
            raise ConfigError("params.json: sliding_window is not supported (Mistral Small 3.1 has none)")
        if v.get("adapter_bias", False):
            raise ConfigError("params.json: vision_encoder.adapter_bias=true is not supported")
        if v.get("mm_projector_id", "patch_merge") != "patch_merge":
            raise ConfigError(f"params.json: mm_projector_id {v.get('mm_projector_id')!r} is not supported")
        if not v.get("add_pre_mm_projector_layer_norm", True):
            raise ConfigError("params.json: add_pre_mm_projector_layer_norm=false is not supported")
        dim = _req(p, "dim", int, "params.json")
        n_heads = _req(p, "n_heads", int, "params.json")
        text = TextConfig(
            vocab_size=_req(p, "vocab_size", int, "params.json"),
            hidden_size=dim,
            intermediate_size=_req(p, "hidden_dim", int, "params.json"),
            num_hidden_layers=_req(p, "n_layers", int, "params.json"),
            num_attention_heads=n_heads,
            num_key_value_heads=_req(p, "n_kv_heads", int, "params.json"),
            head_dim=int(p.get("head_dim", dim // n_heads)),
            rope_theta=float(p.get("rope_theta", 1_000_000_000.0)),
            rms_norm_eps=_req(p, "norm_eps", float, "params.json"),
            # params.json may omit max_seq_len: the model attends over 131,072 positions (the engine caps
            # the served window at 128,000 by default, as the hosted model does)
            max_position_embeddings=int(p.get("max_seq_len", p.get("max_position_embeddings", 131_072))),
        )
        vhidden = _req(v, "hidden_size", int, "params.json vision_encoder")
        vheads = _req(v, "num_attention_heads", int, "params.json vision_encoder")
        vision = VisionConfig(
            hidden_size=vhidden,
            intermediate_size=_req(v, "intermediate_size", int, "params.json vision_encoder"),
            num_hidden_layers=_req(v, "num_hidden_layers", int, "params.json vision_encoder"),
            num_attention_heads=vheads,
            head_dim=vhidden // vheads,
            patch_size=_req(v, "patch_size", int, "params.json vision_encoder"),
            image_size=int(v.get("max_image_size", v.get("image_size", 1540))),
            num_channels=int(v.get("num_channels", 3)),
            rope_theta=float(v.get("rope_theta", 10_000.0)),
        )
        return cls(text=text, vision=vision, spatial_merge_size=int(v.get("spatial_merge_size", 2)),
                   image_token_id=int(v.get("image_token_id", 10)),
                   image_break_token_id=int(v.get("image_break_token_id", 12)),
                   image_end_token_id=int(v.get("image_end_token_id", 13))).validated()

    def to_native_dict(self) -> dict:
        t, v = self.text, self.vision
        return {"dim": t.hidden_size, "n_layers": t.num_hidden_layers, "head_dim": t.head_dim,
                "hidden_dim": t.intermediate_size, "n_heads": t.num_attention_heads,
                "n_kv_heads": t.num_key_value_heads, "rope_theta": t.rope_theta, "norm_eps": t.rms_norm_eps,
                "vocab_size": t.vocab_size, "max_seq_len": t.max_position_embeddings,
                "vision_encoder": {
                    "hidden_size": v.hidden_size, "num_channels": v.num_channels, "image_size": v.image_size,
                    "max_image_size": v.image_size, "patch_size": v.patch_size, "rope_theta": v.rope_theta,
                    "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_hidden_layers,
                    "num_attention_heads": v.num_attention_heads, "adapter_bias": False,
                    "mm_projector_id": "patch_merge", "spatial_merge_size": self.spatial_merge_size,
                    "add_pre_mm_projector_layer_norm": True, "image_token_id": self.image_token_id,
                    "image_break_token_id": self.image_break_token_id,
                    "image_end_token_id": self.image_end_token_id}}

    def validated(self) -> ModelConfig:
        t, v = self.text, self.vision
        problems = []
        if t.num_attention_heads % t.num_key_value_heads:
            problems.append(f"num_attention_heads {t.num_attention_heads} is not a multiple of "
                            f"num_key_value_heads {t.num_key_value_heads}")
        if t.head_dim % 2 or v.head_dim % 4:
            problems.append("RoPE needs an even text head_dim and a vision head_dim divisible by 4")
        if v.head_dim * v.num_attention_heads != v.hidden_size:
            problems.append("vision hidden_size must equal num_attention_heads * head_dim")
        if min(t.vocab_size, t.hidden_size, t.num_hidden_layers, v.num_hidden_layers, self.spatial_merge_size) < 1:
            problems.append("sizes must be positive")
        if problems:
            raise ConfigError("unsupported model config: " + "; ".join(problems))
        return self


def read_config(path: Path) -> dict:
    """The raw JSON object of config.json / params.json."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read model config ({e})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return raw


def load_config(path: Path, raw: dict | None = None) -> ModelConfig:
    """Read config.json (HF) or params.json (native) at `path` (or parse its already-read `raw` object)."""
    raw = read_config(path) if raw is None else raw
    try:
        return ModelConfig.from_native_dict(raw) if Path(path).name == "params.json" \
            else ModelConfig.from_hf_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def _req(d: dict, key: str, typ: type, where: str):
    if key not in d or d[key] is None:
        raise ConfigError(f"{where}: required key {key!r} is missing")
    try:
        return typ(d[key])
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {key}={d[key]!r} is not a valid {typ.__name__}") from None


def _expect(d: dict, key: str, value, where: str) -> None:
    if key in d and d[key] != value:
        raise ConfigError(f"{where}: {key}={d[key]!r} is not supported (Mistral Small 3.1 uses {value!r})")


def _rope_theta(d: dict, where: str) -> float:
    # transformers 4.50 writes rope_theta flat; 5.x nests it in rope_parameters (older 5.x dev: rope_scaling)
    for nested in ("rope_parameters", "rope_scaling"):
        rp = d.get(nested)
        if isinstance(rp, dict) and "rope_theta" in rp:
            if rp.get("rope_type", "default") not in ("default", "axial"):
                raise ConfigError(f"{where}: rope_type {rp['rope_type']!r} is not supported (plain RoPE only)")
            return float(rp["rope_theta"])
    if "rope_theta" in d:
        return float(d["rope_theta"])
    raise ConfigError(f"{where}: rope_theta is missing (neither flat nor in rope_parameters)")


def option(default, help: str, flag: str | None = None, **argparse_kw):
    """A config field that is also a command-line flag: server/flags.py builds `serve`/`run`/`chat`'s parser
    from these, so a setting's default, range and name are written once, here. `flag` overrides the name
    derived from the field; `convert` maps the flag's value to the field's (GiB -> bytes)."""
    return field(default=default, metadata={"help": help, "flag": flag, **argparse_kw})


@dataclass(frozen=True)
class EngineConfig:
    """Serving limits and memory. `max_model_len` is the context window (prompt + max_tokens): 128,000 by
    default as the hosted model enforces; it may be raised to the model's 131,072."""
    max_model_len: int = option(128_000, "context window, prompt + max_tokens (up to the model's 131072)")
    max_num_seqs: int = option(256, "requests running at once")
    max_num_batched_tokens: int = option(2048, "tokens per engine step; also the prefill chunk size")
    # engine/scheduler.py: long prompts are prefilled T tokens a step while other requests run or wait
    long_prefill_token_threshold: int | None = option(
        None, "prompts with more tokens than this left to prefill get at most this many per step (together) "
        "while other requests run or wait, so that those keep their pace (vLLM's flag); default: a quarter of "
        "--max-num-batched-tokens; 0 = off", type=int)
    block_size: int = option(16, "tokens per KV-cache block")
    kv_cache_memory: int | None = option(None, "KV pool size in GiB (default: measured on a GPU, 2 on CPU)",
                                         flag="--kv-cache-gib", type=float, convert=lambda gib: int(gib * 2**30))
    gpu_memory_utilization: float = option(0.90, "fraction of GPU memory the engine may fill, KV pool included",
                                           aliases=("--kv-memory-fraction",))
    enable_prefix_caching: bool = option(True, "reuse the KV cache of shared prompt prefixes")
    # nf4 / int8 (bitsandbytes, the `quant` extra) / fp8: the decoder linears only (engine/quant.py)
    quantization: str | None = option(None, "quantize the decoder linears while loading (nf4/int8 need "
                                      "bitsandbytes: the quant extra; see weights.md)", choices=QUANTIZATIONS)
    # "auto": the model dtype; "fp8": float8_e4m3fn with one scale per (block, KV head), twice the tokens
    kv_cache_dtype: str = option("auto", "KV cache dtype: auto (the model's) or fp8 (per-block scales, twice "
                                 "the tokens)", choices=KV_CACHE_DTYPES)
    # on CUDA, decode steps replay CUDA graphs (engine/cuda_graph.py); off on CPU and for int8 (logged)
    enforce_eager: bool = option(False, "run every step eagerly, without CUDA graphs (by default decode batches "
                                 "up to 128, 64 with nf4, replay CUDA graphs on a GPU; never with int8)")
    attention_backend: str = option("auto", "attention kernels: triton (one paged kernel per layer and step; the "
                                    "CUDA default) or reference (PyTorch; the CPU default)",
                                    choices=ATTENTION_BACKENDS)

    def __post_init__(self):
        for name in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.long_prefill_token_threshold is None:       # normalized once: the scheduler reads a number
            object.__setattr__(self, "long_prefill_token_threshold", self.max_num_batched_tokens // 4)
        if self.long_prefill_token_threshold < 0:
            raise ValueError("long_prefill_token_threshold must be >= 0 (0 = off)")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError("kv_cache_memory must be a positive number of bytes")
        if self.quantization not in (None, *QUANTIZATIONS):
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)} or None, "
                             f"got {self.quantization!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got "
                             f"{self.attention_backend!r}")
