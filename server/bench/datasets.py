"""The workload: which prompts, how long, how many output tokens (vLLM's `--dataset-name` choices).

- random: text decoded from random token ids, fitted so that the prompt's usage.prompt_tokens (chat template
  included) is exactly the planned length; lengths uniform in [len·(1−r), len·(1+r)] (`--random-range-ratio`),
  an optional shared prefix (`--random-prefix-len`).
- sharegpt: a ShareGPT JSON file (`[{"conversations": [{"from": "human", "value"}, {"from": "gpt", ...}]}]`):
  the first human turn is the prompt, the first answer's token count the output length (vLLM's filters).
- prefix_repetition: a few random prefixes shared by many requests, each with its own random suffix.
- random-mm: random text plus random-noise PNG images (`--random-mm-bucket-config {(h, w, 1): probability}`);
  the planned length counts the image tokens too.
- custom: JSON lines `{"prompt": ..., "output_tokens_count": N}` (guidellm reads the same file).

Every sample's `prompt_len` is what the PromptCounter measured, never a guess: a length the fitting could not
hit exactly is recorded as it is.
"""

from __future__ import annotations

import ast
import base64
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from server.bench.tokens import FIRST_TEXT_ID, PromptCounter

DATASETS = ("random", "sharegpt", "prefix_repetition", "random-mm", "custom")
# 40 short conversations written for this project, shipped with the package (sharegpt without --dataset-path)
SHAREGPT_DEMO = Path(__file__).with_name("data") / "sharegpt_mini.json"
_FIT_ROUNDS = 24
_PAD = " x"                     # one token after any text (Tekken splits on the space)


@dataclass
class SampleRequest:
    index: int
    prompt: str                                         # the user's text (the whole prompt on completions)
    prompt_len: int                                     # planned usage.prompt_tokens
    expected_output_len: int                            # max_tokens
    images: list[str] = field(default_factory=list)     # data URIs, after the text
    tools: list[dict] | None = None
    json_schema: dict | None = None
    feature: str = "text"                               # compare's label: text | image | tools | json

    def messages(self) -> list[dict]:
        if not self.images:
            return [{"role": "user", "content": self.prompt}]
        return [{"role": "user", "content": [{"type": "text", "text": self.prompt}] + [
            {"type": "image_url", "image_url": {"url": u}} for u in self.images]}]


@dataclass(frozen=True)
class WorkloadConfig:
    """The workload flags, checked once."""
    dataset_name: str = "random"
    dataset_path: str | None = None
    num_prompts: int = 1000
    seed: int = 0
    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    random_prefix_len: int = 0
    sharegpt_output_len: int | None = None
    prefix_repetition_prefix_len: int = 256
    prefix_repetition_suffix_len: int = 256
    prefix_repetition_num_prefixes: int = 10
    prefix_repetition_output_len: int = 128
    random_mm_base_items_per_request: int = 1
    random_mm_bucket_config: str = "{(256, 256, 1): 0.5, (720, 1280, 1): 0.5}"
    custom_output_len: int = 256

    def __post_init__(self):
        if self.dataset_name not in DATASETS:
            raise ValueError(f"--dataset-name must be one of {', '.join(DATASETS)}")
        if self.num_prompts < 1:
            raise ValueError("--num-prompts must be >= 1")
        if not 0 <= self.random_range_ratio < 1:
            raise ValueError("--random-range-ratio must be in [0, 1)")
        for name in ("random_input_len", "random_output_len", "prefix_repetition_output_len", "custom_output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.dataset_name == "custom" and not self.dataset_path:
            raise ValueError("--dataset-name custom needs --dataset-path (JSON lines with a 'prompt' field)")
        if self.dataset_name == "random-mm":
            buckets(self.random_mm_bucket_config)

    @classmethod
    def from_args(cls, args) -> WorkloadConfig:
        return cls(**{k: getattr(args, k) for k in cls.__dataclass_fields__ if hasattr(args, k)})


def buckets(spec: str) -> tuple[list[tuple[int, int]], np.ndarray]:
    """vLLM's `{(height, width, frames): probability}`; images only (frames 1)."""
    try:
        table = ast.literal_eval(spec)
        sizes = [(int(h), int(w)) for (h, w, _) in table]
        if any(int(t) != 1 for (_, _, t) in table):
            raise ValueError("only images (frames 1) are supported")
        probs = np.array([float(p) for p in table.values()])
    except (ValueError, SyntaxError, TypeError, AttributeError) as e:
        raise ValueError(f"--random-mm-bucket-config {spec!r}: expected {{(height, width, 1): probability, ...}} "
                         f"({e})") from None
    if not sizes or probs.sum() <= 0 or (probs < 0).any() or min(min(s) for s in sizes) < 1:
        raise ValueError(f"--random-mm-bucket-config {spec!r}: needs positive sizes and probabilities")
    return sizes, probs / probs.sum()


def noise_png(rng: np.random.Generator, height: int, width: int) -> str:
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class Planner:
    """Prompts of planned lengths for one route kind (chat-templated or completions)."""

    def __init__(self, counter: PromptCounter, chat: bool, rng: np.random.Generator):
        self.counter, self.chat, self.rng = counter, chat, rng
        self.tok = counter.tokenizer

    def count(self, text: str, images=(), tools=None) -> int:
        if self.chat:
            return self.counter.chat(SampleRequest(0, text, 0, 0, list(images)).messages(), tools)
        if images:
            raise ValueError("images need a chat route: --backend workers or openai-chat")
        return self.counter.completion(text)

    def random_text(self, n_tokens: int) -> str:
        return self.tok.decode(self.rng.integers(FIRST_TEXT_ID, self.tok.vocab_size, max(n_tokens, 0)).tolist())

    def fit(self, target: int, images=(), prefix: str = "") -> tuple[str, int]:
        """Random text after `prefix` such that the whole prompt counts `target` tokens (or as close as the
        tokenizer allows: the measured count is returned with it)."""
        base = self.count(prefix, images)
        if target < base:
            raise ValueError(f"a {target}-token prompt is impossible: the template{', images' if images else ''} "
                             f"and prefix already take {base} tokens")
        ids = self.rng.integers(FIRST_TEXT_ID, self.tok.vocab_size, target - base).tolist()
        under = (prefix, base)          # the longest version known to be at or under the target
        for _ in range(_FIT_ROUNDS):
            text = prefix + self.tok.decode(ids)
            n = self.count(text, images)
            if n == target:
                return text, n
            if n < target:
                under = max(under, (text, n), key=lambda t: t[1])
                ids += self.rng.integers(FIRST_TEXT_ID, self.tok.vocab_size, target - n).tolist()
            else:
                ids = ids[:len(ids) - (n - target)]
        text = under[0] + _PAD * (target - under[1])    # single-token words close the last gap
        return text, self.count(text, images)


def _lengths(rng, n: int, length: int, ratio: float) -> list[int]:
    if ratio == 0:
        return [length] * n
    lo, hi = max(1, int(length * (1 - ratio))), int(length * (1 + ratio))
    return rng.integers(lo, hi + 1, n).tolist()


def build(cfg: WorkloadConfig, counter: PromptCounter, chat: bool) -> list[SampleRequest]:
    rng = np.random.default_rng(cfg.seed)
    plan = Planner(counter, chat, rng)
    make = {"random": _random, "random-mm": _random, "sharegpt": _sharegpt,
            "prefix_repetition": _prefix_repetition, "custom": _custom}[cfg.dataset_name]
    return make(cfg, plan, rng)


def _random(cfg: WorkloadConfig, plan: Planner, rng) -> list[SampleRequest]:
    n = cfg.num_prompts
    ins = _lengths(rng, n, cfg.random_input_len, cfg.random_range_ratio)
    outs = _lengths(rng, n, cfg.random_output_len, cfg.random_range_ratio)
    prefix = plan.random_text(cfg.random_prefix_len) if cfg.random_prefix_len else ""
    sizes, probs = buckets(cfg.random_mm_bucket_config) if cfg.dataset_name == "random-mm" else ([], None)
    samples = []
    for i in range(n):
        images = []
        for _ in range(cfg.random_mm_base_items_per_request if sizes else 0):
            h, w = sizes[rng.choice(len(sizes), p=probs)]
            images.append(noise_png(rng, h, w))
        text, n_tokens = plan.fit(ins[i] + cfg.random_prefix_len, images, prefix)
        samples.append(SampleRequest(i, text, n_tokens, outs[i], images))
    return samples


def _prefix_repetition(cfg: WorkloadConfig, plan: Planner, rng) -> list[SampleRequest]:
    prefixes = [plan.random_text(cfg.prefix_repetition_prefix_len) for _ in range(cfg.prefix_repetition_num_prefixes)]
    # the prefix's own count (random text re-encodes to roughly, not exactly, its length) plus the suffix
    targets = [plan.count(p) + cfg.prefix_repetition_suffix_len for p in prefixes]
    samples = []
    for i in range(cfg.num_prompts):
        k = i % len(prefixes)
        text, n_tokens = plan.fit(targets[k], (), prefixes[k])
        samples.append(SampleRequest(i, text, n_tokens, cfg.prefix_repetition_output_len))
    order = rng.permutation(len(samples)).tolist()
    return [_renumber(samples[j], k) for k, j in enumerate(order)]


def _sharegpt(cfg: WorkloadConfig, plan: Planner, rng) -> list[SampleRequest]:
    path = Path(cfg.dataset_path) if cfg.dataset_path else SHAREGPT_DEMO
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"--dataset-path {path}: not a readable ShareGPT JSON file ({e})") from None
    pairs = []
    for entry in data if isinstance(data, list) else []:
        turns = (entry.get("conversations") or entry.get("conversation") or []) if isinstance(entry, dict) else []
        if len(turns) >= 2 and all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns[:2]):
            pairs.append((turns[0]["value"], turns[1]["value"]))
    if not pairs:
        raise ValueError(f"{path}: no conversation with a prompt and an answer")
    samples = []
    for j in rng.permutation(len(pairs)).tolist():
        prompt, answer = pairs[j]
        out_len = cfg.sharegpt_output_len or plan.counter.text_tokens(answer)
        in_len = plan.count(prompt)
        # vLLM's filters: very short prompts or answers, or over 1024 / 2048 tokens, are skipped
        if in_len < 4 or (cfg.sharegpt_output_len is None and out_len < 4) or in_len > 1024 \
                or in_len + out_len > 2048:
            continue
        samples.append(SampleRequest(len(samples), prompt, in_len, out_len))
        if len(samples) == cfg.num_prompts:
            break
    if not samples:
        raise ValueError(f"{path}: every conversation was filtered out (prompt 4..1024 tokens, total <= 2048)")
    return _cycle(samples, cfg.num_prompts, str(path))


def _custom(cfg: WorkloadConfig, plan: Planner, rng) -> list[SampleRequest]:
    samples = []
    path = Path(cfg.dataset_path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ValueError(f"--dataset-path {path}: {e}") from None
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt = row["prompt"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path} line {k + 1}: expected a JSON object with a 'prompt' string") from None
        out_len = int(row.get("output_tokens_count") or cfg.custom_output_len)
        samples.append(SampleRequest(len(samples), prompt, plan.count(prompt), out_len))
        if len(samples) == cfg.num_prompts:
            break
    if not samples:
        raise ValueError(f"{path}: no prompts")
    return _cycle(samples, cfg.num_prompts, str(path))


def _cycle(samples: list[SampleRequest], n: int, where: str) -> list[SampleRequest]:
    """Fewer usable prompts than --num-prompts: repeat them (said, not hidden)."""
    if len(samples) < n:
        print(f"note: {where} has {len(samples)} usable prompts; repeating them to make {n}")
    return [_renumber(samples[i % len(samples)], i) for i in range(n)]


def _renumber(s: SampleRequest, index: int) -> SampleRequest:
    return SampleRequest(index, s.prompt, s.prompt_len, s.expected_output_len, list(s.images), s.tools,
                         s.json_schema, s.feature)
