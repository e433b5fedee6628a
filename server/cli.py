"""Command line: `mistral-small run PROMPT` generates one answer with the offline engine.

Without --model the real checkpoint is used when a complete copy is in the local Hugging Face cache;
otherwise a random-weight demo checkpoint is generated once and every output is labelled DEMO.
"""

from __future__ import annotations

import argparse
import base64
import logging
import mimetypes
import os
import sys
from pathlib import Path

DEMO_DIR = Path(os.environ.get("MISTRAL_SMALL_DEMO_DIR", Path.home() / ".cache" / "mistral-small-engine" / "demo"))


def default_model() -> tuple[str, bool]:
    """(model, is_demo). Never silently replaces a model the user asked for: only used without --model."""
    from huggingface_hub import snapshot_download

    from engine.weights import _HF_FILES, DEFAULT_MODEL
    try:
        return snapshot_download(DEFAULT_MODEL, allow_patterns=_HF_FILES, local_files_only=True), False
    except Exception:
        pass
    if not (DEMO_DIR / "config.json").is_file():
        from engine.tiny_checkpoint import write_checkpoint
        print(f"DEMO: {DEFAULT_MODEL} is not in the local cache (see weights.md); writing a random-weight demo "
              f"checkpoint to {DEMO_DIR}", file=sys.stderr)
        write_checkpoint(DEMO_DIR, fmt="hf")
    return str(DEMO_DIR), True


def _image_part(path: str) -> dict:
    mime = mimetypes.guess_type(path)[0] or "application/octet-stream"
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}


def cmd_run(args) -> int:
    from engine import LLM, SamplingParams

    model, demo = (args.model, False) if args.model else default_model()
    llm = LLM(model, device=args.device, dtype=args.dtype, load_format=args.load_format)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed)
    if args.raw:
        if args.image:
            raise SystemExit("--raw prompts cannot carry images")
        out = llm.generate(args.prompt, params, raw=True)[0]
    else:
        content = [{"type": "text", "text": args.prompt}] + [_image_part(p) for p in args.image]
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
            [{"role": "user", "content": content}]
        out = llm.generate(messages, params)[0]
    if demo:
        print("[DEMO: random weights, the output is meaningless]", file=sys.stderr)
    print(out.text)
    print(f"[{out.usage.prompt_tokens} prompt + {out.usage.completion_tokens} completion tokens, "
          f"finish: {out.finish_reason}]", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mistral-small", description="Mistral Small 3.1 local engine")
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="generate one answer to a prompt")
    run.add_argument("prompt")
    run.add_argument("--model", help="model directory or hub id (default: the real model if cached, else demo)")
    run.add_argument("--load-format", choices=["auto", "hf", "mistral"], default="auto")
    run.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    run.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bfloat16, float32")
    run.add_argument("--image", action="append", default=[], help="image file to attach (repeatable)")
    run.add_argument("--system", help="system prompt")
    run.add_argument("--raw", action="store_true", help="use the prompt verbatim (control tokens parsed)")
    run.add_argument("--max-tokens", type=int, default=256)
    run.add_argument("--temperature", type=float, default=0.15)
    run.add_argument("--top-p", type=float, default=1.0)
    run.add_argument("--top-k", type=int, default=0)
    run.add_argument("--seed", type=int)
    run.set_defaults(func=cmd_run)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from engine.weights import CheckpointError
    try:
        return args.func(args)
    except (ValueError, CheckpointError, OSError) as e:    # bad input or checkpoint: a message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
