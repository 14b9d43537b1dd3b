"""One request's generation slot, as a small state machine that every path of the processor goes through.

    idle --acquire--> held --shimmy_done--> released     Shimmy's response is over: its [DONE], its error, its
                        |                                non-200 answer, or an Envoy reply instead of Shimmy's
                        +--abandon/close--> abandoned    nobody reads any more, Shimmy goes on: the slot stays
                                                         taken for the occupancy model's estimate (admission.py)

The processor never touches an `admission.Ticket` itself: it tells the lease what happened (Shimmy's status, its
progress, the end of its response, the stream's close), and the lease decides. `close` is the one exit every
stream takes, so a branch that forgets to free the slot can only leave it abandoned with the reason it gives,
never held; and Shimmy's response status is handed over before any branch looks at it, so an answer from
Shimmy that ends its generation (a 502 of a one-piece 1.x answer, a 404) frees the slot at once.
"""

from __future__ import annotations

from typing import Literal

from extproc.admission import AbandonReason, Admission, Ticket

__all__ = ["SlotLease"]

LeaseState = Literal["idle", "held", "released", "abandoned"]


class SlotLease:
    """The slot of one generation, from admission until Shimmy is done with it (or nobody waits for it)."""

    __slots__ = ("admission", "ticket")

    def __init__(self, admission: Admission | None) -> None:
        self.admission = admission  # None: no slots (Envoy's circuit breaker alone); every call is a no-op
        self.ticket: Ticket | None = None

    @property
    def state(self) -> LeaseState:
        ticket = self.ticket
        if ticket is None:
            return "idle"
        if ticket.abandoned is not None:
            return "abandoned"
        return "released" if ticket.released else "held"

    @property
    def tokens(self) -> int:
        """Shimmy's tokens seen so far."""
        return 0 if self.ticket is None else self.ticket.tokens

    def try_acquire(self, model: str, max_tokens: int, prompt_tokens: int) -> bool:
        """A slot now if one is free (always, without admission)."""
        if self.admission is None:
            return True
        self.ticket = self.admission.try_admit(model, max_tokens, prompt_tokens)
        return self.ticket is not None

    async def acquire(self, model: str, max_tokens: int, prompt_tokens: int) -> None:
        """Wait in the admission queue; `admission.Busy` when it is full or the wait ran out."""
        if self.admission is not None:
            self.ticket = await self.admission.admit(model, max_tokens, prompt_tokens)

    def progress(self, tokens: int) -> None:
        """Shimmy has produced `tokens` so far (a running total): the pace the occupancy model learns from."""
        if self.ticket is not None:
            self.ticket.progress(tokens)

    def upstream_status(self, status: int, envoy_reply: bool) -> None:
        """Shimmy's response headers arrived (or Envoy's reply in their place): anything but 200 ends the generation.

        Shimmy's own non-200 answers (404, 422, the 502 of a failed one-piece 1.x answer) come once it is done;
        Envoy's 504 is its route timeout, past which Shimmy may still be generating; any other reply of Envoy's
        means Shimmy's connection failed or never opened.
        """
        if status == 200 and not envoy_reply:
            return
        if envoy_reply and status == 504:
            self.abandon("deadline")
        else:
            self.shimmy_done()

    def shimmy_done(self) -> None:
        """Shimmy's response is over: the slot is free at once."""
        ticket = self.ticket
        if ticket is not None and not ticket.released:
            ticket.finish()

    def abandon(self, reason: AbandonReason) -> None:
        """Nobody reads the generation any more, but Shimmy goes on with it: the slot waits for the estimate."""
        ticket = self.ticket
        if ticket is not None and not ticket.released:
            ticket.abandon(reason)

    def close(self, reason: AbandonReason) -> None:
        """The ext_proc stream ended: a slot still held is abandoned for `reason` (Shimmy was not seen finishing)."""
        self.abandon(reason)
