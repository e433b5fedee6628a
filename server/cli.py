"""Command line: `serve` (HTTP server), `run` (one prompt, streamed), `chat` (interactive terminal chat),
`download` (the weights, into the Hugging Face cache), `--version`.

Without --model the real checkpoint is used when a complete copy is in the local Hugging Face cache;
otherwise a random-weight demo checkpoint is generated once and everything it answers is labelled DEMO.
A model named with --model is never replaced: if it fails to load, the command fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import socket
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

    from engine.weights import _HF_FILES, _NATIVE_FILES, DEFAULT_MODEL
    for patterns in (_HF_FILES, _NATIVE_FILES):     # either format, as `mistral-small download` fetches them
        try:
            return snapshot_download(DEFAULT_MODEL, allow_patterns=patterns, local_files_only=True), False
        except Exception:
            pass
    if not (DEMO_DIR / "config.json").is_file():
        from engine.tiny_checkpoint import write_checkpoint
        print(f"DEMO: {DEFAULT_MODEL} is not in the local cache (see weights.md); writing a random-weight demo "
              f"checkpoint to {DEMO_DIR}", file=sys.stderr)
        write_checkpoint(DEMO_DIR, fmt="hf")
    return str(DEMO_DIR), True


def _engine_kwargs(args) -> dict:
    """EngineConfig from the flags given (the rest keep their defaults), as LLMEngine's keyword arguments."""
    return dataclasses.asdict(from_args(EngineConfig, args))


def _model(args) -> tuple[str, bool]:
    # dummy weights are random too: served answers are labelled DEMO like the demo checkpoint's
    return (args.model, args.load_format == "dummy") if args.model else default_model()


def _sampling(args):
    return sampling_from_args(args)


def _engine(args):
    """(synchronous LLMEngine, is_demo) for `run` and `chat`."""
    from engine.llm_engine import LLMEngine

    model, demo = _model(args)
    return LLMEngine(model, args.device, args.dtype, args.load_format, **_engine_kwargs(args)), demo


def check_bindable(host: str, port: int) -> None:
    """Fail before the model loads (minutes for the real one) when the address cannot be listened on.
    SO_REUSEADDR as uvicorn sets it, so a port in TIME_WAIT is not mistaken for a busy one."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(addr)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}. Is another server running there? "
                      f"Choose another --port (or --host).") from None


def cmd_serve(args) -> int:
    import uvicorn

    from engine.async_llm import AsyncLLM
    from server.app import create_app

    settings = from_args(ServerSettings, args)
    check_bindable(settings.host, settings.port)
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
    from server.terminal import image_part, stream_answer

    params = _sampling(args)        # bad flags fail before the model loads
    engine, demo = _engine(args)
    if args.raw:
        if args.image:
            raise ValueError("--raw prompts cannot carry images")
        prompt = args.prompt
    else:
        content = [{"type": "text", "text": args.prompt}] + [image_part(p) for p in args.image]
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + \
            [{"role": "user", "content": content}]
    if demo:
        print("[DEMO: random weights, the output is meaningless]", file=sys.stderr)
    out = stream_answer(engine, prompt, params, raw=args.raw)
    print(f"[{out.usage.prompt_tokens} prompt + {out.usage.completion_tokens} completion tokens, "
          f"finish: {out.finish_reason}]", file=sys.stderr)
    return 130 if out.finish_reason == "cancelled" else 0     # 130: stopped by Ctrl-C, as shells report it


def cmd_chat(args) -> int:
    from server.chat import Chat

    params = _sampling(args)
    engine, demo = _engine(args)
    return Chat(engine, params, args.system, demo).run()


def cmd_download(args) -> int:
    from server.download import download

    download(args.repo, args.format, args.revision)
    return 0


class _VersionAction(argparse.Action):
    """--version: computed only when asked (it imports torch and probes CUDA)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print the versions (package, git commit, torch, "
                         "CUDA) and exit; the server answers the same on GET /version")

    def __call__(self, parser, namespace, values, option_string=None):
        from server.version import describe, version_info
        print(describe(version_info()))
        parser.exit()


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
    ap.add_argument("--version", action=_VersionAction)
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
    download = sub.add_parser("download", help="download the weights into the Hugging Face cache, where serve, "
                              "run and chat find them")
    download.add_argument("repo", nargs="?", help="hub id (default: the model serve uses without --model)")
    download.add_argument("--format", choices=["hf", "mistral"], default="hf",
                          help="hf: config.json + model-*.safetensors shards (default); mistral: params.json + "
                               "one consolidated.safetensors")
    download.add_argument("--revision", help="branch, tag or commit (default: main)")
    download.set_defaults(func=cmd_download)
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
    except KeyboardInterrupt:            # Ctrl-C while loading (answers handle their own): no traceback
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
