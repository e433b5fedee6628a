"""Command line: `serve` (HTTP server), `run` (one prompt, streamed), `chat` (interactive terminal chat).

Without --model the real checkpoint is used when a complete copy is in the local Hugging Face cache;
otherwise a random-weight demo checkpoint is generated once and everything it answers is labelled DEMO.
A model named with --model is never replaced: if it fails to load, the command fails.
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
    kw = {"max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs,
          "gpu_memory_utilization": args.kv_memory_fraction}
    if args.kv_cache_gib is not None:
        kw["kv_cache_memory"] = int(args.kv_cache_gib * 2**30)
    if args.quantization is not None:
        kw["quantization"] = args.quantization
    if args.kv_cache_dtype != "auto":
        kw["kv_cache_dtype"] = args.kv_cache_dtype
    if args.enforce_eager:
        kw["enforce_eager"] = True
    if args.attention_backend != "auto":
        kw["attention_backend"] = args.attention_backend
    return kw


def _model(args) -> tuple[str, bool]:
    return (args.model, False) if args.model else default_model()


def _sampling(args):
    from engine import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed)


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
    from server.generation import CLOUDFLARE_MODEL, ServerSettings

    model, demo = _model(args)
    if demo:
        log.warning("DEMO MODE: serving a random-weight checkpoint from %s; answers are meaningless. Pass --model "
                    "or put the real weights in the Hugging Face cache (weights.md).", model)
    llm = AsyncLLM(model, device=args.device, dtype=args.dtype, load_format=args.load_format,
                   **_engine_kwargs(args))
    eng = llm.engine
    names = (args.served_model_name or CLOUDFLARE_MODEL, "mistralai/Mistral-Small-3.1-24B-Instruct-2503")
    settings = ServerSettings(model_names=names, api_key=args.api_key, max_queue=args.max_queue,
                              stream_padding=not args.no_stream_padding, demo=demo, model_path=str(model))
    app = create_app(llm, settings)
    weights = sum(p.nbytes for p in eng.model.parameters())
    print(f"{'DEMO (random weights) ' if demo else ''}model {eng.checkpoint.directory} ({eng.checkpoint.format}) | "
          f"{str(eng.dtype).removeprefix('torch.')} on {eng.device} | memory {weights / 2**30:.2f} GiB weights + "
          f"{eng.runner.kv_cache.nbytes / 2**30:.2f} GiB KV | KV capacity {eng.runner.capacity_tokens:,} tokens | "
          f"loaded in {eng.load_seconds:.1f} s | http://{args.host}:{args.port}", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        llm.shutdown()
    return 0


def cmd_run(args) -> int:
    from engine.llm_engine import LLMEngine

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
    out = _stream(engine, prompt, _sampling(args), raw=args.raw)
    print(f"[{out.usage.prompt_tokens} prompt + {out.usage.completion_tokens} completion tokens, "
          f"finish: {out.finish_reason}]", file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from engine.llm_engine import LLMEngine

    model, demo = _model(args)
    engine = LLMEngine(model, args.device, args.dtype, args.load_format, **_engine_kwargs(args))
    print(("DEMO (random weights). " if demo else "") +
          "Chat: type a message; /image PATH attaches an image to the next message; /reset; /exit.")
    history = [{"role": "system", "content": args.system}] if args.system else []
    images: list[dict] = []
    params = _sampling(args)
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
    p.add_argument("--load-format", choices=["auto", "hf", "mistral"], default="auto")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bfloat16, float32")
    p.add_argument("--max-model-len", type=int, default=128_000, help="context window (up to 131072)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--kv-memory-fraction", type=float, default=0.90,
                   help="fraction of GPU memory the engine may fill, KV pool included")
    p.add_argument("--kv-cache-gib", type=float, help="KV pool size in GiB (default: measured; 2 on CPU)")
    p.add_argument("--quantization", choices=["nf4", "int8", "fp8"],
                   help="quantize the decoder linears while loading (nf4/int8 need bitsandbytes: the quant "
                        "extra); see weights.md")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                   help="fp8: a float8_e4m3fn KV cache with per-block scales, twice the tokens (default: the "
                        "model dtype)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="run every step eagerly: no CUDA graphs (by default decode batches up to 128, 64 with "
                        "nf4, replay CUDA graphs on a GPU; never with int8)")
    p.add_argument("--attention-backend", choices=["auto", "triton", "reference"], default="auto",
                   help="attention kernels: triton (one paged kernel per layer; the CUDA default) or the "
                        "PyTorch reference (the CPU default)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.15)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="mistral-small", description="Mistral Small 3.1 local engine")
    sub = ap.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the HTTP server (Workers AI + OpenAI routes)")
    _common(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=os.environ.get("MISTRAL_SMALL_API_KEY"),
                       help="bearer token every API route requires (env MISTRAL_SMALL_API_KEY)")
    serve.add_argument("--max-queue", type=int, default=512, help="waiting requests before 429")
    serve.add_argument("--served-model-name", help="model name of the routes (default: the Workers AI name)")
    serve.add_argument("--no-stream-padding", action="store_true", help="omit the random 'p' field in streams")
    serve.add_argument("--log-level", default="info")
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
