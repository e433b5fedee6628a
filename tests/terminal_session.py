"""A command run on a pseudo-terminal, driven as a person at the keyboard would (a tiny `expect`).

The child gets the terminal as its controlling tty, so Ctrl-C typed here ("\\x03") reaches it as SIGINT
through the line discipline, and echo, flushing and isatty behave as in a real terminal.
"""

from __future__ import annotations

import codecs
import fcntl
import os
import pty
import re
import select
import subprocess
import termios
import time

CTRL_C = "\x03"
CTRL_D = "\x04"


class TerminalSession:
    def __init__(self, argv: list[str], env: dict | None = None, timeout: float = 300):
        self.timeout = timeout
        master, slave = pty.openpty()
        self.master = master
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True,
                                     start_new_session=True,
                                     # the terminal becomes the child's controlling tty (Ctrl-C -> SIGINT)
                                     preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))  # noqa: PLW1509
        os.close(slave)
        self.log = ""            # everything the terminal showed, \r\n as written
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._seen = 0           # expect() searches self.log from here

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def expect(self, pattern: str, timeout: float | None = None) -> re.Match:
        """Wait for `pattern` (a regex) in what the terminal shows after the previous match."""
        end = time.monotonic() + (timeout or self.timeout)
        rx = re.compile(pattern)
        while True:
            m = rx.search(self.log, self._seen)
            if m:
                self._seen = m.end()
                return m
            if not self._read(end - time.monotonic()):
                raise AssertionError(f"{pattern!r} never came (timeout, or the program ended); the terminal "
                                     f"showed (the last 3000 characters):\n{self.log[-3000:]}")

    def _read(self, wait: float) -> bool:
        """Take what the terminal shows within `wait` s; False once the time is up or the terminal closed."""
        if wait <= 0:
            return False
        ready, _, _ = select.select([self.master], [], [], min(wait, 0.5))
        if not ready:
            return True
        try:
            data = os.read(self.master, 65536)
        except OSError:              # EIO: every writer closed the terminal (the child exited)
            return False
        self.log += self._decoder.decode(data)
        return bool(data)

    def wait(self, timeout: float | None = None) -> int:
        """Exit status, after reading everything the child wrote."""
        end = time.monotonic() + (timeout or self.timeout)
        while self._read(end - time.monotonic()):
            pass
        return self.proc.wait(timeout=max(end - time.monotonic(), 1))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
