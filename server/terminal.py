"""One answer streamed to the terminal (`run`, `chat`).

While an answer streams, Ctrl-C only raises a flag that the loop reads between engine steps: the request is
then aborted in the engine (its KV blocks freed) and the text shown so far is returned, instead of a
KeyboardInterrupt tearing through a half-done step. On a terminal, echo is off during the answer and
whatever was typed meanwhile is discarded when it ends (termios.tcflush), so typed-ahead text never lands
inside the answer nor becomes the next message unseen.
"""

from __future__ import annotations

import base64
import contextlib
import mimetypes
import signal
import sys
import threading
from pathlib import Path


def image_part(path: str) -> dict:
    """An OpenAI-style image part (data URI) for a file; OSError if it cannot be read."""
    mime = mimetypes.guess_type(path)[0] or "application/octet-stream"
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}


def stream_answer(engine, prompt, params, raw: bool = False):
    """Generate one answer on a synchronous LLMEngine, printing text as it is decided. Returns the final
    RequestOutput; its finish_reason is "cancelled" when Ctrl-C stopped it."""
    shown = 0
    with _answering() as stop:
        rid = engine.add_request(prompt, params, raw=raw)
        out = None
        while engine.has_unfinished():
            if stop.is_set():
                out = engine.abort(rid) or out
                break
            for o in engine.step():
                if o.request_id == rid:
                    out = o
                    print(out.text[shown:], end="", flush=True)
                    shown = len(out.text)
        if out is not None:       # after an abort: the detokenizer's flushed tail
            print(out.text[shown:], end="", flush=True)
    print()
    return out


@contextlib.contextmanager
def _answering():
    stop = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():   # signal handlers live in the main thread
        previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        with _quiet_input():
            yield stop
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _quiet_input():
    """Terminal echo off; on the way out, input typed meanwhile is dropped and the settings restored."""
    try:
        fd = sys.stdin.fileno()
        tty = sys.stdin.isatty()
    except (AttributeError, ValueError, OSError):   # stdin replaced (tests) or closed
        tty = False
    if not tty:
        yield
        return
    import termios

    saved = termios.tcgetattr(fd)
    quiet = list(saved)
    quiet[3] &= ~termios.ECHO     # lflag; ICANON and ISIG stay: Ctrl-C still arrives as SIGINT
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcflush(fd, termios.TCIFLUSH)
        termios.tcsetattr(fd, termios.TCSANOW, saved)
