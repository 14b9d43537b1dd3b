"""Admission: at most `capacity` generations inside Shimmy, counting the ones nobody waits for any more.

Shimmy cannot be told to stop a generation: once it has a request it generates until the model's end of turn or
`max_tokens`, whether or not anyone still reads (shared/reference/shimmy-api.md §2.3, §9.3). So a slot here is held
from admission until Shimmy has finished, not until the HTTP exchange ends:

- a generation the processor still reads releases its slot when Shimmy's response ends (its `[DONE]`, its error);
- a generation that lost its reader (the client left, or the gateway ended the answer at a stop sequence or at the
  deadline) is *abandoned*: it keeps its slot until the model below says Shimmy is through with it.

The model of Shimmy's occupancy: an abandoned generation still has `max_tokens - seen` tokens to produce (at most
what the context leaves, where the version fixes it), each taking the time per output token measured on that very
request (the process's recent average before it produced two). Where it ran depends on the version:

- 1.x runs generations concurrently: each abandoned one ends at its own last token + remaining x its pace;
- 2.x serializes them behind one lock: one that has not produced a token yet still waits for the work admitted
  before it, so its end is counted from the estimated end of that work. And a generation that produces its first
  token proves that every generation seen producing tokens before it has finished (only one runs at a time), which
  frees their slots early.

Estimates carry a safety factor: a slot freed too late costs a little throughput, one freed too early puts one
generation too many into Shimmy. New requests wait (`admit`) in a bounded FIFO queue for a bounded time, then get
`Busy` (429 with Retry-After).

With several processor workers (EXTPROC_WORKERS) the slots are shared, not split: each slot is a lock file that a
worker holds with `flock` for as long as its generation occupies Shimmy, so the cap is one cap for the Shimmy they
all send to, and a worker that dies gives its slots back with its file locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from extproc import metrics
from extproc.errors import GatewayError

__all__ = ["AbandonReason", "Admission", "Busy", "Pace", "Ticket"]

AbandonReason = Literal["client_gone", "stop_sequence", "deadline", "error"]

SAFETY = 1.25  # an abandoned generation's estimated remaining time is stretched by this factor ...
MARGIN_S = 0.5  # ... plus this, for the scheduling jitter of Shimmy and of this process
POLL_S = 0.05  # how often a queued request looks for a slot another worker gave back
_ALPHA = 0.5  # weight of the newest request in the process's average pace


class Busy(GatewayError):
    """429: every slot is taken by generations Shimmy is still running, and the queue is full or waited too long."""

    status = 429
    type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(slots=True)
class Pace:
    """This process's recent speed of Shimmy: the fallback for a generation that has not shown its own yet.

    The defaults, before any generation was measured, are deliberately slow (a large model on a small CPU).
    """

    tpot: float = 0.25  # seconds per output token
    ttft: float = 5.0  # seconds from admission to the first token (1.x loads the model for every request)
    tpot_learned: bool = False  # a measurement replaced the default: later ones are averaged with it
    ttft_learned: bool = False

    def learn(self, tpot: float | None, ttft: float | None) -> None:
        """The first measurement replaces the default outright (a default averaged in would keep a fast Shimmy's
        abandoned slots taken for several times their real work); later ones move the average."""
        if tpot is not None:
            self.tpot = tpot if not self.tpot_learned else self.tpot + _ALPHA * (tpot - self.tpot)
            self.tpot_learned = True
        if ttft is not None:
            self.ttft = ttft if not self.ttft_learned else self.ttft + _ALPHA * (ttft - self.ttft)
            self.ttft_learned = True


@dataclass(eq=False, slots=True)
class Ticket:
    """One generation's slot, from admission until Shimmy is done with it."""

    admission: Admission
    slot: int
    model: str
    max_tokens: int
    prompt_tokens: int = 0
    admitted_at: float = 0.0  # the admission's clock
    first_token_at: float | None = None
    last_token_at: float | None = None
    tokens: int = 0  # Shimmy's tokens seen so far (SSE events)
    abandoned: AbandonReason | None = None
    abandoned_at: float | None = None
    released: bool = False

    def progress(self, tokens: int) -> None:
        """Shimmy has produced `tokens` so far (a running total)."""
        if tokens <= self.tokens or self.released:
            return
        now = self.admission.clock()
        first = self.first_token_at is None
        if first:
            self.first_token_at = now
        self.last_token_at, self.tokens = now, tokens
        if first:
            self.admission.first_token(self)

    @property
    def tpot(self) -> float | None:
        """Seconds per output token measured on this request, once it has produced two."""
        if self.tokens < 2 or self.first_token_at is None or self.last_token_at is None:
            return None
        return (self.last_token_at - self.first_token_at) / (self.tokens - 1)

    def remaining_tokens(self, context_tokens: int | None) -> int:
        """Tokens Shimmy may still produce: up to `max_tokens`, and no further than the context leaves."""
        left = self.max_tokens - self.tokens
        if context_tokens is not None:
            left = min(left, context_tokens - self.prompt_tokens - self.tokens)
        return max(left, 0)

    def finish(self) -> None:
        """Shimmy's response is over (or it never started one): the slot is free now."""
        self.admission.release(self, observed=True)

    def abandon(self, reason: AbandonReason) -> None:
        """Nobody reads this generation any more, but Shimmy goes on with it: keep the slot for the estimate."""
        if self.released or self.abandoned is not None:
            return
        self.abandoned, self.abandoned_at = reason, self.admission.clock()
        self.admission.abandon(self)


class _SlotFiles:
    """Slots shared by the processor workers of one Shimmy: slot i is held by whoever holds `flock` on file i."""

    def __init__(self, directory: Path, capacity: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.paths = [directory / f"slot-{i}" for i in range(capacity)]
        self.held: dict[int, int] = {}  # slot -> fd

    def take(self, slot: int) -> bool:
        fd = os.open(self.paths[slot], os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.held[slot] = fd
        return True

    def give(self, slot: int) -> None:
        fd = self.held.pop(slot, None)
        if fd is not None:
            os.close(fd)  # closing the only descriptor drops the lock


class Admission:
    """The slots, the queue in front of them, and the occupancy model behind them (see the module docstring)."""

    def __init__(
        self,
        capacity: int,
        queue_limit: int,
        queue_wait: float,
        *,
        serialized: bool,
        context_tokens: int | None = None,
        shared_dir: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity < 1:
            raise ValueError("MAX_ACTIVE_REQUESTS must be at least 1")
        self.capacity = capacity
        self.queue_limit = max(queue_limit, 0)
        self.queue_wait = max(queue_wait, 0.0)
        self.serialized = serialized
        self.context_tokens = context_tokens
        self.pace = Pace()
        self.clock = clock
        self.tickets: list[Ticket] = []  # in admission order
        self._files = _SlotFiles(shared_dir, capacity) if shared_dir is not None else None
        self._waiters: deque[asyncio.Event] = deque()
        self._timer: asyncio.TimerHandle | None = None
        metrics.watch_admission(self)

    # --- what /metrics shows ---------------------------------------------------------------------------------

    @property
    def busy(self) -> int:
        """Slots this process holds: generations inside Shimmy, read or abandoned."""
        return len(self.tickets)

    @property
    def abandoned(self) -> int:
        return sum(1 for t in self.tickets if t.abandoned is not None)

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def backlog(self) -> float:
        """Estimated seconds until Shimmy is through with every abandoned generation this process counts."""
        now = self.clock()
        ends = [end for t, end in self._ends(now) if t.abandoned is not None]
        return max(max(ends, default=now) - now, 0.0)

    # --- admission -------------------------------------------------------------------------------------------

    def try_admit(self, model: str, max_tokens: int, prompt_tokens: int = 0) -> Ticket | None:
        """A slot now, if one is free and nobody queues ahead; else None."""
        if self._waiters:
            return None
        return self._take(model, max_tokens, prompt_tokens)

    async def admit(self, model: str, max_tokens: int, prompt_tokens: int = 0) -> Ticket:
        """A slot, waiting in the FIFO queue for up to `queue_wait`; Busy when the queue is full or the wait ends."""
        ticket = self.try_admit(model, max_tokens, prompt_tokens)
        if ticket is not None:
            return ticket
        if len(self._waiters) >= self.queue_limit:
            metrics.ADMISSION_REJECTED.labels("queue_full").inc()
            raise Busy("Shimmy is busy and the gateway's queue is full; retry later", self.retry_after())
        deadline = self.clock() + self.queue_wait
        me = asyncio.Event()
        self._waiters.append(me)
        try:
            while True:
                if self._waiters[0] is me:
                    ticket = self._take(model, max_tokens, prompt_tokens)
                    if ticket is not None:
                        return ticket
                left = deadline - self.clock()
                if left <= 0:
                    metrics.ADMISSION_REJECTED.labels("queue_timeout").inc()
                    raise Busy(
                        f"Shimmy is busy: no generation slot came free within {self.queue_wait:g}s; retry later",
                        self.retry_after(),
                    )
                me.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(me.wait(), min(left, POLL_S) if self._files else left)
        finally:
            self._waiters.remove(me)
            if self._waiters:
                self._waiters[0].set()  # the next in line looks again

    def retry_after(self) -> int:
        """Whole seconds until a slot is expected to come free (at least 1)."""
        now = self.clock()
        ends = [end for t, end in self._ends(now)]
        soonest = min(ends, default=now + 1) - now
        return max(1, min(math.ceil(soonest), 600))

    def _take(self, model: str, max_tokens: int, prompt_tokens: int) -> Ticket | None:
        held = {t.slot for t in self.tickets}
        for slot in range(self.capacity):
            if slot in held or (self._files is not None and not self._files.take(slot)):
                continue
            ticket = Ticket(self, slot, model, max_tokens, prompt_tokens, admitted_at=self.clock())
            self.tickets.append(ticket)
            return ticket
        return None

    # --- release ---------------------------------------------------------------------------------------------

    def release(self, ticket: Ticket, observed: bool, reschedule: bool = True) -> None:
        """Free `ticket`'s slot; `observed`: Shimmy was seen finishing, so its pace teaches the average."""
        if ticket.released:
            return
        ticket.released = True
        self.tickets.remove(ticket)
        if self._files is not None:
            self._files.give(ticket.slot)
        if observed and ticket.abandoned is None:
            ttft = None if ticket.first_token_at is None else ticket.first_token_at - ticket.admitted_at
            self.pace.learn(ticket.tpot, ttft)
        if ticket.tpot is not None:
            metrics.TIME_PER_OUTPUT_TOKEN.labels(ticket.model).observe(ticket.tpot)
        if self._waiters:
            self._waiters[0].set()
        if reschedule and self.serialized:  # the work ahead of the others shrank
            self._expire()

    def shimmy_gone(self) -> None:
        """Shimmy's process is gone (its port refuses connections): the generations nobody read died with it."""
        for t in [t for t in self.tickets if t.abandoned is not None]:
            self.release(t, observed=False, reschedule=False)
        self._expire()

    def abandon(self, ticket: Ticket) -> None:
        metrics.ABANDONED.labels(ticket.abandoned or "client_gone").inc()
        self._expire()

    def first_token(self, ticket: Ticket) -> None:
        """In a serialized Shimmy, a generation that starts proves the earlier running ones have finished."""
        if not self.serialized:
            return
        for other in list(self.tickets):
            if other is not ticket and other.abandoned is not None and other.tokens > 0:
                self.release(other, observed=False, reschedule=False)
        self._expire()

    def _ends(self, now: float) -> list[tuple[Ticket, float]]:
        """Each ticket's estimated end inside Shimmy, in admission order (see the module docstring)."""
        out: list[tuple[Ticket, float]] = []
        ahead = -math.inf  # serialized: when Shimmy is through with the work admitted so far
        # A generation that has not shown its own pace gets the slowest one measured on those running now (the
        # freshest figure, under today's load), else the average of the finished ones.
        measured = [p for t in self.tickets if (p := t.tpot) is not None]
        fallback = max(measured) if measured else self.pace.tpot
        for t in self.tickets:
            pace = t.tpot or fallback
            if t.tpot is None and t.first_token_at is not None:
                # One token seen: its latency bounds a token's (the first took at least one forward pass too).
                pace = min(pace, t.first_token_at - t.admitted_at)
            work = t.remaining_tokens(self.context_tokens) * pace
            if t.last_token_at is not None:
                start = t.last_token_at  # it is (or was) running
            else:  # not started yet: expected after the usual time to first token, and not before it left
                start = max(t.admitted_at + self.pace.ttft, now if t.abandoned_at is None else t.abandoned_at)
                if self.serialized:
                    start = max(start, ahead + self.pace.ttft)
            end = start + work * SAFETY + MARGIN_S
            if self.serialized:
                ahead = max(ahead, end)
            out.append((t, end))
        return out

    def _expire(self) -> None:
        """Free the abandoned generations Shimmy should be through with by now; wake up for the next one."""
        now = self.clock()
        due = [t for t, end in self._ends(now) if t.abandoned is not None and end <= now]
        for t in due:
            self.release(t, observed=False, reschedule=False)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending = [end for t, end in self._ends(now) if t.abandoned is not None]
        if pending:
            with contextlib.suppress(RuntimeError):  # no running loop: a synchronous unit test
                self._timer = asyncio.get_running_loop().call_later(max(min(pending) - now, 0.0), self._expire)
