"""Which requests the server holds, and what may end one early.

A request holds a Ticket from the moment it passes the queue check until its response has ended. The check
and the taking of the ticket happen together, before anything is awaited, so a burst can never pass it
together: at most `--max-num-seqs` (the engine's running slots) + `--max-queue` sequences are held at once (a
request weighs its sequences: prompts × n; one larger than that bound is admitted only alone), and
`rejectIfBusy` refuses a request unless it could run at the next step (slots free for it, nothing waiting).

A ticket can be interrupted — its timeout passed, the client stopped reading, the server is shutting down,
the engine died — with the error its client gets. Before the request reaches the engine the interruption
cancels whatever it awaits (grammar compilation, preparing the prompt); once there, the Generation it is
attached to aborts the request in the engine and ends its stream with that error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from server.errors import OUT_OF_CAPACITY, ApiError, timed_out, unavailable
from server.limits import Limits

T = TypeVar("T")

# why a request ended before its end (the log's `ended_by`, and a metric label)
CLIENT_DISCONNECTED, CLIENT_STALLED, TIMEOUT, SHUTDOWN, ERROR = (
    "client_disconnected", "client_stalled", "timeout", "shutdown", "error")


def busy() -> ApiError:
    return ApiError(429, OUT_OF_CAPACITY, "Capacity temporarily exceeded, please try again.",
                    headers={"Retry-After": "1"})


def shutting_down() -> ApiError:
    return unavailable("the server is shutting down; retry on another instance or after its restart")


class Admission:
    def __init__(self):
        self.tickets: set[Ticket] = set()
        self.held = 0                           # the tickets' sequences
        self.draining = False                   # SIGTERM: new requests get 503
        self.loop: asyncio.AbstractEventLoop | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    def admit(self, limits: Limits, slots: int, engine_waiting: int, reject_if_busy: bool,
              sequences: int = 1) -> Ticket:
        """Take a ticket for a request of `sequences` engine sequences or raise (429 full or busy, 503 shutting
        down). Synchronous: nothing can slip in between the check and the taking."""
        if self.draining:
            raise shutting_down()
        held = self.held
        if (held and held + sequences > slots + limits.max_queue) or \
                (reject_if_busy and (held + sequences > slots or engine_waiting > 0)):
            raise busy()
        self.loop = asyncio.get_running_loop()
        ticket = Ticket(self, limits.request_timeout, sequences)
        self.tickets.add(ticket)
        self.held += sequences
        self._idle.clear()
        return ticket

    def interrupt_all(self, err: ApiError, reason: str) -> None:
        for ticket in list(self.tickets):
            ticket.interrupt(err, reason)

    def interrupt_all_threadsafe(self, err: ApiError, reason: str) -> None:
        """From another thread (the engine loop when it dies)."""
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.interrupt_all, err, reason)

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def _release(self, ticket: Ticket) -> None:
        if ticket in self.tickets:
            self.tickets.discard(ticket)
            self.held -= ticket.sequences
        if not self.tickets:
            self._idle.set()


class Ticket:
    def __init__(self, admission: Admission, timeout: float, sequences: int = 1):
        self.admission, self.sequences = admission, sequences
        self.error: ApiError | None = None
        self.reason: str | None = None          # why it was interrupted (see the constants above)
        self._interrupted = asyncio.get_running_loop().create_future()
        self._on_interrupt: Callable[[ApiError], None] | None = None
        self._released = False
        self._timer = asyncio.get_running_loop().call_later(
            timeout, self.interrupt, timed_out(f"the request took longer than {timeout:g} s (--request-timeout)"),
            TIMEOUT) if timeout else None

    def interrupt(self, err: ApiError, reason: str) -> None:
        """End the request with `err` (the first interruption wins)."""
        if self.error is not None or self._released:
            return
        self.error, self.reason = err, reason
        self._interrupted.set_result(None)
        if self._on_interrupt is not None:
            self._on_interrupt(err)

    async def run(self, awaitable: Awaitable[T]) -> T:
        """Await `awaitable`, unless the ticket is interrupted first: then it is cancelled and the ticket's
        error raised. A result that arrived anyway is returned (attach() then passes the interruption on)."""
        task = asyncio.ensure_future(awaitable)
        if self.error is None:
            await asyncio.wait({task, self._interrupted}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        raise self.error

    def attach(self, on_interrupt: Callable[[ApiError], None]) -> None:
        """Who ends the request once it is in the engine; called at once if the ticket is already interrupted."""
        self._on_interrupt = on_interrupt
        if self.error is not None:
            on_interrupt(self.error)

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        if self._timer is not None:
            self._timer.cancel()
        self.admission._release(self)
