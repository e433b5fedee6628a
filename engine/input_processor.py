"""Input processing (vLLM v1's InputProcessor): a prompt and its parameters -> a Request ready to schedule.

`process` does all the CPU work a request needs before it reaches the engine loop: the chat template or raw
tokenization, image decoding, preprocessing and hashing, the placeholder spans, the context-window and
KV-capacity checks, the seed, and the grammar matcher. It reads no engine state that changes while serving,
so it is safe to call from many threads at once: the HTTP layer runs it in a worker pool, never on the event
loop, and the engine thread only queues the finished Request.
"""

from __future__ import annotations

import itertools
import secrets
import threading
from concurrent.futures import Future

import numpy as np

from engine.block_manager import cdiv
from engine.config import EngineConfig, ImageConfig
from engine.guided import GrammarCompiler
from engine.image_processor import image_hash
from engine.request import ImageInput, Request
from engine.sampling_params import SamplingParams
from engine.tokenizer import EncodedPrompt, Tokenizer



class ContextWindowError(ValueError):
    """prompt tokens + max_tokens exceed the context window, or the request can never fit the KV pool."""

    def __init__(self, message: str, prompt_tokens: int, max_tokens: int, limit: int):
        super().__init__(message)
        self.prompt_tokens, self.max_tokens, self.limit = prompt_tokens, max_tokens, limit


class InputProcessor:
    def __init__(self, tokenizer: Tokenizer, config: EngineConfig, num_blocks: int,
                 image: ImageConfig = ImageConfig()):
        self.tokenizer, self.config, self.num_blocks, self.image = tokenizer, config, num_blocks, image
        self._grammars: GrammarCompiler | None = None
        self._grammar_lock = threading.Lock()
        self._ids = itertools.count()       # next() on a count is atomic under the GIL

    def process(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                raw: bool = False, tools: list[dict] | None = None) -> Request:
        """Validate and build a request (thread-safe). Raises before anything is queued when the request can
        never run (ContextWindowError) or is malformed (PromptError, ImageError, GrammarError, ValueError)."""
        return self.make_request(self.encode(prompt, raw, tools), params, request_id)

    def encode(self, prompt, raw: bool = False, tools: list[dict] | None = None) -> EncodedPrompt:
        """str: one user message through the chat template (raw=True: verbatim); a list of message dicts: a chat;
        an EncodedPrompt or a list of token ids: used as is."""
        if isinstance(prompt, EncodedPrompt):
            return prompt
        if isinstance(prompt, str):
            if raw:
                ids = self.tokenizer.encode_raw(prompt)
                if self.tokenizer.image_token_id in ids:
                    # raw text can name [IMG] but carries no pixels to fill it
                    raise ValueError("a raw prompt cannot contain [IMG] tokens: images need the chat format")
                return EncodedPrompt(ids)
            return self.tokenizer.encode_chat([{"role": "user", "content": prompt}], tools)
        if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            return self.tokenizer.encode_chat(prompt, tools)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            if self.tokenizer.image_token_id in prompt:
                raise ValueError("token-id prompts cannot contain [IMG] tokens: images need the chat format")
            return EncodedPrompt(list(prompt))
        raise TypeError("a prompt is a string, a list of message dicts, a list of token ids or an EncodedPrompt")

    def make_request(self, enc: EncodedPrompt, params: SamplingParams | None = None,
                     request_id: str | None = None) -> Request:
        params = params or SamplingParams()
        request_id = request_id or f"req-{next(self._ids)}"
        n, window, bs = len(enc.token_ids), self.config.max_model_len, self.config.block_size
        if n == 0:
            raise ValueError("the prompt is empty")
        if n + params.max_tokens > window:
            raise ContextWindowError(
                f"The estimated number of input and maximum output tokens ({n + params.max_tokens}) exceeded "
                f"this model context window limit ({window}): {n} prompt tokens + max_tokens "
                f"{params.max_tokens}", n, params.max_tokens, window)
        need = cdiv(n + params.max_tokens, bs)
        if need > self.num_blocks:
            raise ContextWindowError(
                f"{n} prompt tokens + max_tokens {params.max_tokens} need {need} KV blocks but the whole cache "
                f"holds {self.num_blocks} ({self.num_blocks * bs} tokens)", n, params.max_tokens,
                self.num_blocks * bs)
        return Request(request_id, enc.token_ids, params,
                       seed=params.seed if params.seed is not None else secrets.randbits(63),
                       images=self._image_inputs(enc), max_tokens=params.max_tokens,
                       matcher=self.grammars.matcher(params.grammar) if params.grammar else None)

    # ---- grammars ----------------------------------------------------------------------------------------------
    @property
    def grammars(self) -> GrammarCompiler:
        """Built on first use (2-3 s for the 131k vocabulary); safe to call from any thread: callers arriving
        during the build wait for it."""
        with self._grammar_lock:
            if self._grammars is None:
                self._grammars = GrammarCompiler(self.tokenizer)
            return self._grammars

    def warm_grammars(self) -> Future:
        """Build the grammar compiler on a background thread now (e.g. at server start), so the first guided
        request does not pay for it. The Future resolves to the compiler, or to the build's exception."""
        done: Future = Future()

        def build():
            try:
                done.set_result(self.grammars)
            except BaseException as e:      # noqa: BLE001 - handed to whoever waits on the future
                done.set_exception(e)
        threading.Thread(target=build, name="grammar-warmup", daemon=True).start()
        return done

    # ---- images ------------------------------------------------------------------------------------------------
    def _image_inputs(self, enc: EncodedPrompt) -> list[ImageInput]:
        """Each image's pixels, content hash and placeholder span (hashing reads every pixel: done here, off
        the engine and event-loop threads)."""
        ids = np.asarray(enc.token_ids)
        img_id, end_id = self.tokenizer.image_token_id, self.tokenizer.image_end_id
        starts = np.flatnonzero((ids == img_id) & np.r_[True, ids[:-1] != img_id] &
                                np.r_[True, ids[:-1] != self.tokenizer.image_break_id])
        ends = np.flatnonzero(ids == end_id) + 1
        if not (len(starts) == len(ends) == len(enc.images)):
            raise ValueError(f"prompt has {len(starts)} image placeholder spans for {len(enc.images)} images")
        out = []
        for pixels, s, e in zip(enc.images, starts, ends):
            positions = s + np.flatnonzero(ids[s:e] == img_id)
            m = self.image.token_pixels
            if len(positions) != (pixels.shape[1] // m) * (pixels.shape[2] // m):
                raise ValueError("image placeholder count does not match the image size")
            out.append(ImageInput(pixels, image_hash(pixels), int(s), int(e), positions))
        return out
