"""How a serving process ends.

- SIGTERM (or Ctrl-C): intake stops at once — /health answers 503, new requests 503 with Retry-After, while
  the port stays open so that clients hear it — and requests in flight may finish for --drain-timeout
  seconds. Those still running then end with an error event (503 when not streamed); the process exits 0.
- A second SIGTERM (or Ctrl-C) exits at once, with status 128 + the signal's number.
- The engine loop dying ends every request the server holds with an error at once (server/state.py); the
  process then exits with status 1 so that its supervisor (systemd, Docker's restart policy, Kubernetes)
  starts a fresh one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import uvicorn

from server.admission import SHUTDOWN, shutting_down
from server.state import ServerState

log = logging.getLogger("server")
ERROR_EVENTS_S = 5.0      # after the drain: time for the interrupted responses to write their error events
ENGINE_DIED = 1


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state
        self.exit_code = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self._signalled = False

    async def serve(self, sockets=None) -> None:
        self.loop = asyncio.get_running_loop()
        if self.state.engine is not None:
            self.state.engine.on_death(
                lambda e: self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._engine_died())))
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        """uvicorn's signal handler (SIGINT, SIGTERM), on the main thread, which also runs the event loop."""
        if self._signalled:
            log.warning("second %s: exiting now", signal.Signals(sig).name)
            os._exit(128 + sig)
        self._signalled = True
        if self.loop is None:           # not serving yet
            self.should_exit = True
            return
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self.drain(signal.Signals(sig).name)))

    async def drain(self, why: str) -> None:
        admission = self.state.admission
        admission.draining = True
        timeout = self.state.settings.limits.drain_timeout
        log.info("%s: no new requests; %d in flight may finish within %g s (--drain-timeout)", why,
                 len(admission.tickets), timeout)
        try:
            await asyncio.wait_for(admission.wait_idle(), timeout)
        except TimeoutError:
            log.warning("drain timeout: ending %d requests with an error", len(admission.tickets))
            admission.interrupt_all(shutting_down(), SHUTDOWN)
            try:
                await asyncio.wait_for(admission.wait_idle(), ERROR_EVENTS_S)
            except TimeoutError:
                pass
        self.should_exit = True

    async def _engine_died(self) -> None:
        """Every held request has been interrupted (server/state.py): let their errors be written while the port
        still answers (/health 503), then exit."""
        log.error("the engine loop died: exiting with status %d so that a supervisor restarts the server",
                  ENGINE_DIED)
        self.exit_code = ENGINE_DIED
        self.state.admission.draining = True
        try:
            await asyncio.wait_for(self.state.admission.wait_idle(), ERROR_EVENTS_S)
        except TimeoutError:
            pass
        self.should_exit = True
