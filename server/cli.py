"""Command line: `serve` (HTTP server), `run` (one prompt, streamed), `chat` (interactive terminal chat).

Without --model the real checkpoint is used when a complete copy is in the local Hugging Face cache;
otherwise a random-weight demo checkpoint is generated once and everything it answers is labelled DEMO.
A model named with --model is never replaced: if it fails to load, the command fails.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import logging
import mimetypes
import os
import sys
from pathlib import Path

from engine.config import EngineConfig
from server.config import ServerSettings
from server.flags import add_flags, add_sampling_flags, from_args, sampling_from_args

DEMO_DIR = Path(os.environ.get("MISTRAL_SMALL_DEMO_DIR", Path.home() / ".cache" / "mistral-small-engine" / "demo"))
log = logging.getLogger("server")


def default_model() -> tuple[str, bool]:
    """(model, is_demo). Only used without --model."""
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


def _engine_kwargs(args) -> dict:
    """EngineConfig from the flags given (the rest keep their defaults), as LLMEngine's keyword arguments."""
    return dataclasses.asdict(from_args(EngineConfig, args))


def _model(args) -> tuple[str, bool]:
    # dummy weights are random too: served answers are labelled DEMO like the demo checkpoint's
    return (args.model, args.load_format == "dummy") if args.model else default_model()


def _sampling(args):
    return sampling_from_args(args)


def _stream(engine, prompt, params, raw=False) -> object:
    """Generate one answer on a synchronous LLMEngine, printing text as it is decided."""
    rid = engine.add_request(prompt, params, raw=raw)
    out = None
    while engine.has_unfinished():
        for o in engine.step():
            if o.request_id == rid:
                out = o
                print(o.delta_text, end="", flush=True)
    print()
    return out


def cmd_serve(args) -> int:
    import uvicorn

    from engine.async_llm import AsyncLLM
    from server.app import create_app

    settings = from_args(ServerSettings, args)
    model, demo = _model(args)
    if demo:
        log.warning("DEMO MODE: serving a random-weight checkpoint from %s; answers are meaningless. Pass --model "
                    "or put the real weights in the Hugging Face cache (weights.md).", model)
    llm = AsyncLLM(model, device=args.device, dtype=args.dtype, load_format=args.load_format,
                   **_engine_kwargs(args))
    eng = llm.engine
    settings = dataclasses.replace(settings, demo=demo, model_path=str(model))
    app = create_app(llm, settings)
    eng.warm_grammars()         # llguidance's tokenizer (seconds) is built in the background, not on first use
    weights = sum(p.nbytes for p in eng.model.parameters())
    print(f"{'DEMO (random weights) ' if demo else ''}model {eng.checkpoint.directory} ({eng.checkpoint.format}) | "
          f"{str(eng.dtype).removeprefix('torch.')} on {eng.device} | memory {weights / 2**30:.2f} GiB weights + "
          f"{eng.runner.kv_cache.nbytes / 2**30:.2f} GiB KV | KV capacity {eng.runner.capacity_tokens:,} tokens | "
          f"loaded in {eng.load_seconds:.1f} s | http://{settings.host}:{settings.port}", flush=True)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level)
    finally:
        llm.shutdown()
    return 0


def cmd_run(args) -> int:
    from engine.llm_engine import LLMEngine

    params = _sampling(args)        # bad flags fail before the model loads
    model, demo = _model(args)
    engine = LLMEngine(model, args.device, args.dtype, args.load_format, **_engine_kwargs(args))
    if args.raw:
        if args.image:
            raise ValueError("--raw prompts cannot carry images")
        prompt = args.prompt
    else:
        content = [{"type": "text", "text": args.prompt}] + [_image_part(p) for p in args.image]
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + \
            [{"role": "user", "content": content}]
    if demo:
        print("[DEMO: random weights, the output is meaningless]", file=sys.stderr)
    out = _stream(engine, prompt, params, raw=args.raw)
    print(f"[{out.usage.prompt_tokens} prompt + {out.usage.completion_tokens} completion tokens, "
          f"finish: {out.finish_reason}]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from engine.llm_engine import LLMEngine

    params = _sampling(args)
    model, demo = _model(args)
    engine = LLMEngine(model, args.device, args.dtype, args.load_format, **_engine_kwargs(args))
    print(("DEMO (random weights). " if demo else "") +
          "Chat: type a message; /image PATH attaches an image to the next message; /reset; /exit.")
    history = [{"role": "system", "content": args.system}] if args.system else []
    images: list[dict] = []
    while True:
        try:
            line = input("you> " if sys.stdin.isatty() else "").strip()
        except EOFError:
            break
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history, images = history[:1] if args.system else [], []
            continue
        if line.startswith("/image "):
            try:
                images.append(_image_part(line[7:].strip()))
            except OSError as e:
                print(f"error: {e}")
            continue
        turn = {"role": "user", "content": [{"type": "text", "text": line}] + images}
        print("assistant> ", end="")
        try:
            out = _stream(engine, history + [turn], params)
        except ValueError as e:           # bad image, context window, ...: the chat goes on
            print(f"error: {e}")
            continue
        print(f"[{out.usage.prompt_tokens} prompt + {out.usage.completion_tokens} completion tokens]",
              file=sys.stderr)
        history += [turn, {"role": "assistant", "content": out.text}]
        images = []
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model directory or hub id (default: the real model if cached, else a demo)")
    p.add_argument("--load-format", choices=["auto", "hf", "mistral", "dummy"], default="auto",
                   help="dummy: random weights made on the device; the directory needs only config.json or "
                        "params.json + tekken.json (benchmarks)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bfloat16, float32")
    add_flags(p, EngineConfig)


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", help="system prompt")
    add_sampling_flags(p)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mistral-small", description="Mistral Small 3.1 local engine")
    sub = ap.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the HTTP server (Workers AI + OpenAI routes)")
    _common(serve)
    add_flags(serve, ServerSettings)
    serve.add_argument("--log-level", default="info", help="uvicorn's log level")
    serve.set_defaults(func=cmd_serve)
    run = sub.add_parser("run", help="generate one answer to a prompt, streamed to the terminal")
    run.add_argument("prompt")
    _common(run)
    _sampling_args(run)
    run.add_argument("--image", action="append", default=[], help="image file to attach (repeatable)")
    run.add_argument("--raw", action="store_true", help="use the prompt verbatim (control tokens parsed)")
    run.set_defaults(func=cmd_run)
    chat = sub.add_parser("chat", help="interactive chat in the terminal")
    _common(chat)
    _sampling_args(chat)
    chat.set_defaults(func=cmd_chat)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from engine.weights import CheckpointError
    try:
        return args.func(args)
    # bad input or checkpoint, or a missing optional library (--quantization nf4 without bitsandbytes): a
    # message, not a traceback
    except (ValueError, CheckpointError, OSError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
