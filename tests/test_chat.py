"""`mistral-small chat` (and `run`) at a real (pseudo-)terminal, against the tiny random checkpoint: commands
never reach the model, /image confirms, typed-ahead text stays out of the answer, Ctrl-C stops an answer and
keeps the conversation, Ctrl-C twice at the prompt quits cleanly."""

import os
import re
import sys

import pytest
from PIL import Image
from terminal_session import CTRL_C, TerminalSession

from engine.image_processor import image_grid, image_token_ids
from server.chat import QUIT_HINT

USAGE = r"\[(\d+) prompt \+ (\d+) completion tokens\]"


@pytest.fixture
def chat(tiny_dir):
    sessions = []

    def start(max_tokens: int) -> TerminalSession:
        t = TerminalSession([sys.executable, "-m", "server", "chat", "--model", str(tiny_dir), "--temperature",
                             "0", "--max-tokens", str(max_tokens), "--kv-cache-gib", "0.25"], env=dict(os.environ))
        sessions.append(t)
        t.expect(r"/help lists the commands\.\r\nyou> ")      # the prompt, on the terminal (stdout)
        return t

    yield start
    for t in sessions:
        t.close()


def test_commands_images_and_typed_ahead_input(chat, tmp_path):
    t = chat(200)
    t.send("/help\r")
    t.expect(r"/image PATH .*\r\n.*/reset.*\r\n.*/help.*\r\n.*/exit.*\r\n.*\r\nyou> ")
    t.send("/frobnicate now\r")
    m = t.expect(r"unknown command /frobnicate; nothing was sent to the model\.\r\ncommands:(.|\r\n)*?you> ")
    assert "assistant> " not in m.group(0)

    t.send("/image /nonexistent.png\r")
    t.expect(r"error: /nonexistent.png: \[Errno 2\] No such file or directory.*\r\nyou> ")
    Image.new("RGB", (64, 48), "red").save(tmp_path / "red.png")
    t.send(f"/image {tmp_path / 'red.png'}\r")
    tokens = len(image_token_ids(*image_grid(64, 48)))
    t.expect(rf"attached red\.png \(64x48, {tokens} image tokens\) to your next message\r\nyou> ")

    t.send("Describe it\r")
    t.expect(r"assistant> [\s\S]")              # the answer is streaming: now type ahead
    t.send("typed ahead\r")
    prompt_tokens = int(t.expect(USAGE).group(1))
    assert prompt_tokens > tokens                # the image went with the message
    t.expect("you> ")
    t.send("/help\r")                            # the next line read is this one: the typed-ahead line is gone
    m = t.expect(r"((.|\r\n)*?)commands:")
    assert "assistant> " not in m.group(1)
    assert "typed ahead" not in t.log            # and was never echoed into the answer
    t.expect("you> ")

    t.send(CTRL_C)
    t.expect(re.escape(QUIT_HINT))
    t.send(CTRL_C)
    assert t.wait() == 0 and "Traceback" not in t.log


def test_ctrl_c_stops_the_answer_and_keeps_the_conversation(chat):
    t = chat(20_000)                             # answers far longer than the test waits
    t.send("Hello\r")
    t.expect(r"assistant> [\s\S]{10}")         # the answer is streaming
    t.send(CTRL_C)
    first, said = map(int, t.expect(USAGE).groups())
    assert said < 20_000
    t.expect(r"\[stopped: the partial answer stays in the conversation\]\r\nyou> ")

    t.send("And then?\r")
    t.expect(r"assistant> [\s\S]{10}")         # the answer is streaming
    t.send(CTRL_C)
    second = int(t.expect(USAGE).group(1))
    assert second > first + said // 2            # the stopped answer is part of the new prompt
    t.expect("you> ")
    t.send("/exit\r")
    assert t.wait() == 0 and "Traceback" not in t.log


def test_run_stops_at_ctrl_c_with_the_words_so_far(tiny_dir):
    t = TerminalSession([sys.executable, "-m", "server", "run", "Hello", "--model", str(tiny_dir), "--temperature",
                         "0", "--max-tokens", "20000", "--kv-cache-gib", "0.25"], env=dict(os.environ))
    try:
        t.expect(r"vocabulary to first \d+ tokens\.\r\n")   # mistral-common's last line while loading
        t.expect(r"[\s\S]{40}")                   # then the answer streams
        t.send(CTRL_C)
        said = int(t.expect(r"\[\d+ prompt \+ (\d+) completion tokens, finish: cancelled\]").group(1))
        assert 0 < said < 20_000
        assert t.wait() == 130 and "Traceback" not in t.log
    finally:
        t.close()
