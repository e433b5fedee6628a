"""What one client may ask of the server: every admission limit and timeout, in one frozen dataclass whose
fields are also `serve`'s flags (server/flags.py) and are served read-only at GET /limits (a browser page
refuses an oversize image there before sending it).

Each limit is checked before the work it protects: the body's bytes as they stream in (server/body_limit.py),
its JSON nesting depth before anything walks it, prompt characters before tokenizing, image counts and
pixels from the images' headers before any image is decoded (server/admission.py), the queue when the
request arrives, before anything is awaited.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from engine.config import option
from engine.image_processor import ALLOWED_FORMATS, MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS

MiB = 2**20
# what the image decoder itself enforces (engine/image_processor.py), served beside the flags: (type, value, help)
DECODER = {"max_image_bytes": (int, MAX_IMAGE_BYTES, "bytes of one image, after base64 decoding (the decoder's "
                               "own bound; not a flag)"),
           "image_formats": (list[str], list(ALLOWED_FORMATS), "image formats accepted, as PIL names them")}


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = option(32 * MiB, "request bodies larger than this get 413 (counted as they stream in, "
                                 "chunked bodies included)")
    max_json_depth: int = option(64, "JSON nesting deeper than this (objects and arrays) is a 400")
    max_prompt_chars: int = option(1_000_000, "characters of prompt text (messages, tools) per request; more get "
                                   "413 before tokenizing")
    max_images: int = option(8, "images per request (what vLLM's --limit-mm-per-prompt image=N sets)")
    max_image_pixels: int = option(25_000_000, f"pixels per image, read from its header before decoding "
                                   f"(at most {MAX_IMAGE_PIXELS}, the decoder's own bound)")
    max_request_pixels: int = option(50_000_000, "pixels of all of a request's images together")
    max_queue: int = option(512, "sequences admitted beyond the engine's running slots (--max-num-seqs; a "
                            "request weighs prompts x n); more get 429 / 3040")
    request_timeout: float = option(600.0, "seconds from a request's arrival to its last token; then 408 / 3007 "
                                    "(an error event when streaming); 0 = no limit")
    stall_timeout: float = option(30.0, "seconds a streaming client may leave the server unable to send; then "
                                  "its request is aborted and its connection cut; 0 = never")
    drain_timeout: float = option(30.0, "on SIGTERM, seconds in-flight requests may take to finish before they "
                                  "end with an error event")

    def __post_init__(self):
        for name in ("max_body_bytes", "max_json_depth", "max_prompt_chars", "max_image_pixels",
                     "max_request_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("max_images", "max_queue", "request_timeout", "stall_timeout", "drain_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.max_image_pixels > MAX_IMAGE_PIXELS:
            raise ValueError(f"max_image_pixels must be <= {MAX_IMAGE_PIXELS} (the image decoder's own bound)")

    def public(self) -> dict:
        """What GET /limits shows: the flags, and the decoder's own bounds."""
        return {**asdict(self), **{name: value for name, (_, value, _) in DECODER.items()}}
