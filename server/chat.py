"""`mistral-small chat`: an interactive conversation in the terminal.

Lines starting with / are commands and never reach the model (unknown ones are refused with the list);
`//text` sends "/text". Ctrl-C while an answer streams stops that answer (terminal.stream_answer) and the
conversation goes on: the words already shown stay in the history as the assistant's turn, and an answer
stopped before its first word is dropped together with its question. Ctrl-C at the prompt asks for a second
one, which quits. The prompt goes to stdout; token counts go to stderr.
"""

from __future__ import annotations

import sys

from server.terminal import image_part, stream_answer

HELP = """commands:
  /image PATH   attach an image to your next message (shows its size and how many tokens it costs)
  /reset        forget the conversation (the --system prompt stays)
  /help         this list
  /exit         quit (also /quit, Ctrl-D, or Ctrl-C twice at the prompt)
Ctrl-C during an answer stops it. Start a message with // to send text that begins with /."""
QUIT_HINT = "(press Ctrl-C again or /exit to quit)"


class Chat:
    def __init__(self, engine, params, system: str | None = None, demo: bool = False):
        self.engine, self.params, self.demo = engine, params, demo
        self.system = [{"role": "system", "content": system}] if system else []
        self.history: list[dict] = list(self.system)
        self.images: list[dict] = []
        self.interactive = sys.stdin.isatty()
        self.commands = {"/help": self._help, "/image": self._image, "/reset": self._reset,
                         "/exit": None, "/quit": None}

    def run(self) -> int:
        print(("DEMO (random weights, meaningless answers). " if self.demo else "") +
              "Chat: type a message; /help lists the commands.")
        try:
            self._loop()
        except KeyboardInterrupt:                     # the second Ctrl-C, even while the hint prints
            pass
        if self.interactive:
            print()
        return 0

    def _loop(self) -> None:
        interrupted = False
        while True:
            try:
                line = self._read()
                interrupted = False
                if line is None:                      # Ctrl-D / end of input
                    return
                line = line.strip()
                if line.startswith("/") and not line.startswith("//"):
                    name, _, arg = line.partition(" ")
                    if name not in self.commands:
                        print(f"unknown command {name}; nothing was sent to the model.\n{HELP}")
                    elif self.commands[name] is None:
                        return
                    else:
                        self.commands[name](arg.strip())
                elif line:
                    self._answer(line.removeprefix("/"))
            except KeyboardInterrupt:                 # at the prompt (answers handle their own Ctrl-C)
                if interrupted:
                    return
                interrupted = True
                print(f"\n{QUIT_HINT}")

    def _read(self) -> str | None:
        if self.interactive:
            sys.stdout.write("you> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        return line or None

    def _help(self, _arg: str) -> None:
        print(HELP)

    def _reset(self, _arg: str) -> None:
        self.history, self.images = list(self.system), []
        print("(conversation cleared)")

    def _image(self, path: str) -> None:
        if not path:
            print("usage: /image PATH")
            return
        try:
            part = image_part(path)
            width, height, tokens = self._measure(part)
        except (OSError, ValueError) as e:
            print(f"error: {path}: {e}")
            return
        self.images.append(part)
        print(f"attached {path.rsplit('/', 1)[-1]} ({width}x{height}, {tokens:,} image tokens) "
              f"to your next message")

    def _measure(self, part: dict) -> tuple[int, int, int]:
        """Width, height and the image tokens this model's tokenizer gives it (ImageError if unusable)."""
        from engine.image_processor import load_image

        tok = self.engine.tokenizer
        image = load_image(part["image_url"]["url"])
        ids = tok.encode_chat([{"role": "user", "content": [part]}]).token_ids
        special = {tok.image_token_id, tok.image_break_id, tok.image_end_id}
        return image.width, image.height, sum(i in special for i in ids)

    def _answer(self, text: str) -> None:
        turn = {"role": "user", "content": [{"type": "text", "text": text}] + self.images}
        print("assistant> ", end="", flush=True)
        try:
            out = stream_answer(self.engine, self.history + [turn], self.params)
        except ValueError as e:           # context window, ...: the chat goes on
            print(f"error: {e}")
            return
        print(f"[{out.usage.prompt_tokens} prompt + {out.usage.completion_tokens} completion tokens]",
              file=sys.stderr)
        if out.finish_reason == "cancelled":
            kept = bool(out.text)
            print("[stopped: " + ("the partial answer stays in the conversation]" if kept else
                                  "nothing was said; your message was dropped]"))
            if not kept:
                return                    # images stay attached for the next message
        self.history += [turn, {"role": "assistant", "content": out.text}]
        self.images = []
