"""Stop sequences enforced by the gateway: Shimmy's `/api/generate` ignores them.

Text is released as soon as it can no longer be the start of a stop sequence, so a stream is held back only by
the few characters that might still complete one, never by a whole token.

The matcher is an Aho-Corasick automaton fed one character at a time: its state is the longest suffix of the output
that is a prefix of some stop sequence, so the work per character is constant (amortised over the failure links)
however long the stop sequences are, and the client cannot make the processor's work grow with output x stop length.
No library fits: the Aho-Corasick packages on PyPI search a whole string, none resumes between tokens.

The client's stop sequences are bounded before any work (`check_stops`, the same limits on every API): building the
automaton costs time and memory in proportion to their characters (about 250 bytes and 0.5 us each), so a maximal
set (2,048 characters) builds in under 2 ms and weighs about 0.5 MiB, and the cache of automata is bounded by the
characters it holds, not by its count of entries.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from extproc.cache import SizedCache
from extproc.errors import InvalidRequest

__all__ = [
    "AUTOMATON_CACHE_CHARACTERS",
    "MAX_STOP_CHARACTERS",
    "MAX_STOP_LENGTH",
    "MAX_STOP_SEQUENCES",
    "StopMatcher",
    "check_stops",
]

MAX_STOP_SEQUENCES = 16  # per request, on every API (OpenAI's own limit is 4; Anthropic documents none)
MAX_STOP_LENGTH = 256  # characters per stop sequence: no real end-of-answer marker is this long
MAX_STOP_CHARACTERS = 2048  # all of a request's stop sequences together: what the automaton's size grows with
AUTOMATON_CACHE_CHARACTERS = 8192  # the cache of automata holds at most this many stop characters (~2 MiB)


def check_stops(stops: Sequence[str], param: str) -> None:
    """InvalidRequest naming `param` (`stop`, `stop_sequences`) unless the client's stop sequences are within the
    limits; the request schemas check count and length while decoding, this the total (and both again, cheaply)."""
    if len(stops) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(f"At most {MAX_STOP_SEQUENCES} stop sequences are allowed", param=param)
    for i, stop in enumerate(stops):
        if not stop or len(stop) > MAX_STOP_LENGTH:
            raise InvalidRequest(f"A stop sequence has 1 to {MAX_STOP_LENGTH} characters", param=f"{param}[{i}]")
    if sum(map(len, stops)) > MAX_STOP_CHARACTERS:
        raise InvalidRequest(f"The stop sequences have at most {MAX_STOP_CHARACTERS} characters together",
                             param=param)


class _Automaton:
    """The trie of the stop sequences with failure links; node 0 is the root (the empty prefix)."""

    __slots__ = ("depth", "fail", "firsts", "goto", "longest_match", "stop_at")

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.firsts = tuple({s[0] for s in stops})  # most tokens contain none of these: the fast path
        self.goto: list[dict[str, int]] = [{}]
        self.depth = [0]
        self.longest_match = [0]  # length of the longest stop sequence that ends at this node, 0 if none
        self.stop_at: list[str | None] = [None]  # that stop sequence itself
        for stop in stops:
            node = 0
            for char in stop:
                nxt = self.goto[node].get(char)
                if nxt is None:
                    nxt = len(self.goto)
                    self.goto[node][char] = nxt
                    self.goto.append({})
                    self.depth.append(self.depth[node] + 1)
                    self.longest_match.append(0)
                    self.stop_at.append(None)
                node = nxt
            self.longest_match[node] = len(stop)
            self.stop_at[node] = stop
        self.fail = [0] * len(self.goto)
        queue = deque(self.goto[0].values())
        while queue:  # breadth first, so a node's failure target is finished before the node
            node = queue.popleft()
            for char, child in self.goto[node].items():
                queue.append(child)
                target = self.fail[node]
                while target and char not in self.goto[target]:
                    target = self.fail[target]
                self.fail[child] = self.goto[target].get(char, 0)
                # A stop sequence ending at the failure target also ends here; the longest starts earliest.
                if not self.longest_match[child]:
                    self.longest_match[child] = self.longest_match[self.fail[child]]
                    self.stop_at[child] = self.stop_at[self.fail[child]]


_automata: SizedCache[tuple[str, ...], _Automaton] = SizedCache(
    _Automaton, lambda stops: sum(map(len, stops)), AUTOMATON_CACHE_CHARACTERS
)
"""Built once per set of stop sequences (a template's markers, plus a client's own): an automaton is never changed
after construction, and building one was a quarter of the processor's own work per request. Bounded by the stop
characters held, so many maximal sets evict each other while the templates' few markers stay."""


class StopMatcher:
    """Per-request: feed token text in order, get back the text that is safe to emit.

    The result is exactly the whole output cut at the earliest position where any stop sequence starts, however
    the output is split into tokens: when a short stop sequence completes while a longer one that started earlier
    is still possible, the text is held (not emitted) until the longer one completes or fails.
    """

    __slots__ = ("_auto", "_cut", "_held", "_held_len", "_node", "_pos", "matched", "stopped")

    def __init__(self, stops: tuple[str, ...]) -> None:
        """`stops` are non-empty strings, within the limits (`check_stops`) plus the template's markers."""
        self._auto = _automata.get(stops) if stops else None
        self._node = 0
        self._pos = 0  # characters fed so far
        self._held: deque[str] = deque()  # the text fed but not yet emitted, in pieces
        self._held_len = 0
        self._cut = -1  # earliest start of a completed stop sequence, while a longer one may still start earlier
        self.stopped = False
        self.matched: str | None = None  # the stop sequence starting at the cut, once one has completed

    def feed(self, text: str) -> str:
        """Text to emit now. After a stop sequence matches, `stopped` is set and nothing more is emitted."""
        auto = self._auto
        if self.stopped:
            return ""
        if auto is None:
            return text
        if self._node == 0 and self._cut < 0 and not any(c in text for c in auto.firsts):
            self._pos += len(text)  # nothing held, and no stop can start anywhere in this text
            return text
        goto, fail, depth, longest = auto.goto, auto.fail, auto.depth, auto.longest_match
        node, pos, cut = self._node, self._pos, self._cut
        for char in text:
            while node and char not in goto[node]:
                node = fail[node]
            node = goto[node].get(char, 0)
            pos += 1
            if longest[node]:
                start = pos - longest[node]
                if cut < 0 or start < cut:
                    cut, self.matched = start, auto.stop_at[node]
            if cut >= 0 and pos - depth[node] >= cut:  # nothing still possible starts before the cut
                self._pos += len(text)
                self._held.append(text)
                self._held_len += len(text)
                return self._stop(cut)
        self._node, self._pos, self._cut = node, pos, cut
        self._held.append(text)
        self._held_len += len(text)
        release = pos - depth[node] if cut < 0 else min(cut, pos - depth[node])
        return self._release(release)

    def flush(self) -> str:
        """At the end of generation: the held text, up to a stop sequence that completed while a longer one was
        still possible (then `stopped` is set), or all of it (it was not a stop sequence after all)."""
        if self.stopped:
            return ""
        if self._cut >= 0:
            return self._stop(self._cut)
        out = "".join(self._held)
        self._held.clear()
        self._held_len = 0
        return out

    def _stop(self, cut: int) -> str:
        out = self._release(cut)
        self.stopped = True
        self._held.clear()
        self._held_len = 0
        return out

    def _release(self, upto: int) -> str:
        """Take the held text before absolute position `upto`; each character is taken once, so this is linear."""
        count = upto - (self._pos - self._held_len)
        if count <= 0:
            return ""
        out: list[str] = []
        held = self._held
        self._held_len -= count
        while count:
            piece = held[0]
            if len(piece) <= count:
                out.append(held.popleft())
                count -= len(piece)
            else:
                out.append(piece[:count])
                held[0] = piece[count:]
                count = 0
        return "".join(out)
