"""Stop sequences enforced by the gateway: Shimmy's `/api/generate` ignores them.

Text is released as soon as it can no longer be the start of a stop sequence, so a stream is held back only by
the few characters that might still complete one, never by a whole token.
"""

from __future__ import annotations

__all__ = ["StopMatcher"]


class StopMatcher:
    """Per-request: feed token text in order, get back the text that is safe to emit."""

    __slots__ = ("_firsts", "_held", "_stops", "matched", "stopped")

    def __init__(self, stops: tuple[str, ...]) -> None:
        """`stops` are non-empty strings (the request schema refuses empty ones)."""
        self._stops = stops
        self._firsts = tuple({s[0] for s in stops})  # most tokens contain none of these: the fast path
        self._held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop sequence that ended the text, once one has

    def feed(self, text: str) -> str:
        """Text to emit now. After a stop sequence matches, `stopped` is set and nothing more is emitted."""
        if self.stopped:
            return ""
        if not self._stops:
            return text
        buf = self._held + text
        if not any(c in buf for c in self._firsts):  # no stop can start anywhere in buf, not even as a suffix
            self._held = ""
            return buf
        cut, self.matched = min(((i, s) for s in self._stops if (i := buf.find(s)) >= 0), default=(-1, None))
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return buf[:cut]
        keep = self._partial_suffix(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """At the end of generation, the held text was not a stop sequence after all."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of some stop sequence."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:n]):
                    best = n
                    break
        return best
