"""Server-sent events: decode Shimmy's stream, encode the OpenAI one.

Shimmy sends one event per token whose data is the raw token text (axum splits it into ``data:`` lines on ``\\n``).
Token text is not JSON, so nothing short of a spec-conforming decoder recovers it exactly: leading spaces, newline
tokens and empty tokens all matter. Envoy hands us arbitrary body chunks, so the decoder is incremental.
"""

from __future__ import annotations

__all__ = ["DONE", "MAX_PENDING_BYTES", "SSEDecoder", "SSEError", "encode_event"]

MAX_PENDING_BYTES = 1 << 20
"""Most bytes held between chunks (unterminated line plus undispatched event data) before the stream is rejected.

Shimmy's events are single tokens, so anything near this is a broken or hostile upstream, not a big token."""

DONE = b"data: [DONE]\n\n"

_DATA = b"data: "
_END = b"\n\n"


class SSEError(ValueError):
    """The upstream event stream cannot be decoded; the caller reports it as an upstream error."""


class SSEDecoder:
    """Incremental WHATWG event-stream decoder that yields only each event's data.

    Two small state machines in one pass: bytes to lines (CR, LF or CRLF; a CR ending one chunk may pair with an LF
    starting the next), then lines to events. Lines are split as bytes and only ``data`` values are decoded, once per
    event: CR and LF never occur inside a UTF-8 multibyte sequence, so a chunk ending mid-character is just an
    unterminated line. ``event``, ``id``, ``retry``, unknown fields and comments are ignored because Shimmy never
    uses them.

    Deliberate deviation from WHATWG: an event with at least one ``data`` line is dispatched even when its data is
    empty, because Shimmy sends an empty token as ``data: \\n\\n`` and the gateway counts tokens exactly.

    After :class:`SSEError` the decoder's state is undefined; do not feed it again.
    """

    __slots__ = ("_data", "_line", "_skip_lf")

    def __init__(self) -> None:
        self._line = bytearray()  # the unterminated last line, carried to the next chunk
        self._data: bytes | None = None  # the current event's data lines joined by LF; None until one arrives
        self._skip_lf = False  # the previous chunk ended with CR, so an LF starting this chunk ends no line

    def feed(self, chunk: bytes) -> list[str]:
        """Consume one body chunk and return the data of every event it completes, in order."""
        if self._skip_lf and chunk:
            self._skip_lf = False
            if chunk[0] == 0x0A:
                chunk = chunk[1:]
        if b"\r" in chunk:
            self._skip_lf = chunk.endswith(b"\r")
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = chunk.split(b"\n")
        tail = lines.pop()
        events: list[str] = []
        if lines:
            if self._line:
                lines[0] = b"".join((self._line, lines[0]))
                self._line.clear()
            data = self._data
            for line in lines:
                if not line:
                    if data is not None:
                        events.append(data.decode("utf-8", "replace"))
                        data = None
                    continue
                if line.startswith(b"data:"):
                    value = line[6:] if line.startswith(b" ", 5) else line[5:]
                elif line == b"data":
                    value = b""
                else:
                    continue
                data = value if data is None else data + b"\n" + value
            self._data = data
        if tail:
            self._line += tail
        if len(self._line) + (len(self._data) if self._data else 0) > MAX_PENDING_BYTES:
            raise SSEError(f"upstream SSE event exceeds {MAX_PENDING_BYTES} bytes without ending")
        return events

    def flush(self) -> list[str]:
        """End of stream: discard any unterminated line and event, and reset for reuse.

        Per WHATWG an event not ended by a blank line is never dispatched. Processing the pending line would only
        add to the data being discarded, so this always returns an empty list; it exists so callers treat every
        stream end alike.
        """
        self._line.clear()
        self._data = None
        self._skip_lf = False
        return []


def encode_event(payload: bytes) -> bytes:
    """Frame one event for the client.

    ``payload`` is compact JSON from the caller and must not contain a raw CR or LF (JSON escapes them inside
    strings), since a line break would split the event. Not checked here: this runs once per token.
    """
    return _DATA + payload + _END
