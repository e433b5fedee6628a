"""A request's prompt against the admission limits (server/limits.py), before the work they protect:
characters before tokenizing, image counts and pixels from each image's header before any image is decoded."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from engine.image_processor import ImageError, image_size
from server.errors import bad_input, too_large
from server.limits import Limits


async def check_prompts(prompts: list, tools: list[dict] | None, limits: Limits,
                        run: Callable[[Awaitable], Awaitable] | None = None) -> None:
    """Everything the limits say of a request's prompts: text first, then the images' headers in a worker
    thread (a header far into its payload costs decoding the base64), awaited through `run` when given (an
    admission ticket's, so that an interruption cancels the wait)."""
    check_text(prompts, tools, limits)
    for prompt in prompts:
        if has_images(prompt):
            work = asyncio.to_thread(check_images, prompt, limits)
            await (run(work) if run is not None else work)


def check_text(prompt: str | list[dict], tools: list[dict] | None, limits: Limits) -> None:
    """Characters of text (413 when over --max-prompt-chars): the prompt, or every string of the messages
    but image data, and the tool definitions."""
    n = text_chars(prompt, images=True) + text_chars(tools)
    if n > limits.max_prompt_chars:
        raise too_large(f"the prompt has {n} characters of text; at most {limits.max_prompt_chars} are accepted "
                        f"(--max-prompt-chars)")


def text_chars(value, images: bool = False) -> int:
    """Characters of every string and key in a JSON value, without recursion. `images`: the value is chat
    messages, whose image parts (`{"type": "image_url", ...}`, counted by the image limits) are left out; any
    other `image_url` key, in a tool's schema say, is text like the rest."""
    total, stack = 0, [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, dict):
            image_part = images and v.get("type") == "image_url"
            for k, child in v.items():
                total += len(k) if isinstance(k, str) else 0
                if not (image_part and k == "image_url"):
                    stack.append(child)
        elif isinstance(v, list):
            stack.extend(v)
    return total


def image_urls(prompt) -> list[tuple[str, str]]:
    """(where, url) of every image part of the messages, in order."""
    if not isinstance(prompt, list):
        return []
    found = []
    for i, msg in enumerate(prompt):
        content = msg.get("content") if isinstance(msg, dict) else None
        parts = [content] if isinstance(content, dict) else content if isinstance(content, list) else []
        for j, part in enumerate(parts):
            if isinstance(part, dict) and part.get("type") == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if isinstance(url, str):
                    found.append((f"messages[{i}].content[{j}]", url))
    return found


def has_images(prompt) -> bool:
    return bool(image_urls(prompt))


def check_images(prompt, limits: Limits) -> None:
    """Images per request, pixels per image and per request, from the headers (400 naming the part). Runs in a
    worker thread: a header that is not near the start of its payload costs decoding the base64."""
    urls = image_urls(prompt)
    if len(urls) > limits.max_images:
        raise bad_input(f"the request has {len(urls)} images; at most {limits.max_images} are accepted per "
                        f"request (--max-images)")
    total = 0
    for where, url in urls:
        try:
            w, h = image_size(url)
        except ImageError as e:
            raise bad_input(f"{where}: {e}") from None
        if w * h > limits.max_image_pixels:
            raise bad_input(f"{where}: the image is {w}x{h} = {w * h} pixels; at most {limits.max_image_pixels} "
                            f"are accepted per image (--max-image-pixels)")
        total += w * h
        if total > limits.max_request_pixels:
            raise bad_input(f"the request's images have more than {limits.max_request_pixels} pixels together "
                            f"(--max-request-pixels); {where} passes it")
