from __future__ import annotations

from itertools import pairwise

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.sse import DONE, MAX_PENDING_BYTES, SSEDecoder, SSEError, encode_event

# Shimmy's stream for the tokens "Hi", " there", "!\n" (shimmy-api.md section 2.3).
SHIMMY_EXAMPLE = b"data: Hi\n\ndata:  there\n\ndata: !\ndata: \n\ndata: [DONE]\n\n"
SHIMMY_EXAMPLE_EVENTS = ["Hi", " there", "!\n", "[DONE]"]


def decode(chunks: list[bytes]) -> list[str]:
    decoder = SSEDecoder()
    events: list[str] = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    events += decoder.flush()
    return events


def axum_event(token: str) -> bytes:
    """Frame a token as axum 0.7.9's ``Event::data`` does: one ``data: `` line per LF-separated piece."""
    return b"".join(b"data: " + piece.encode() + b"\n" for piece in token.split("\n")) + b"\n"


@pytest.mark.parametrize(
    ("wire", "events"),
    [
        pytest.param(b"data: Hello\n\n", ["Hello"], id="token"),
        pytest.param(b"data:  world\n\n", [" world"], id="leading-space-token-keeps-one-space"),
        pytest.param(b"data: \ndata: \n\n", ["\n"], id="newline-token"),
        pytest.param(b"data: !\ndata: \ndata: \n\n", ["!\n\n"], id="token-with-trailing-newlines"),
        pytest.param(b"data: \n\n", [""], id="empty-token-is-dispatched"),
        pytest.param(b"data: [DONE]\n\n", ["[DONE]"], id="done"),
        pytest.param(b"data: [ERROR] boom\ndata: at x\n\n", ["[ERROR] boom\nat x"], id="error-multiline"),
        pytest.param(SHIMMY_EXAMPLE, SHIMMY_EXAMPLE_EVENTS, id="several-events-one-chunk"),
        pytest.param(b"data:x\n\n", ["x"], id="no-space-after-colon"),
        pytest.param(b"data\n\n", [""], id="data-without-colon-is-empty-value"),
        pytest.param(b"data\ndata: x\n\n", ["\nx"], id="data-without-colon-then-value"),
        pytest.param(b"data: a\r\n\r\ndata: b\r\n\r\n", ["a", "b"], id="crlf"),
        pytest.param(b"data: a\r\rdata: b\rdata: c\r\r", ["a", "b\nc"], id="cr"),
        pytest.param(b"data: a\r\ndata: b\rdata: c\n\r\n", ["a\nb\nc"], id="mixed-endings"),
        pytest.param(b": keep-alive\n\ndata: a\n\n", ["a"], id="comment-alone-dispatches-nothing"),
        pytest.param(b"data: a\n: note\ndata: b\n\n", ["a\nb"], id="comment-inside-event"),
        pytest.param(b"event: x\nid: 1\nretry: 5\nfoo: bar\ndata: a\n\n", ["a"], id="other-fields-ignored"),
        pytest.param(b"event: x\nid: 1\n\n", [], id="event-without-data-not-dispatched"),
        pytest.param(b"datax: a\nDATA: b\n\n", [], id="field-name-must-be-exactly-data"),
        pytest.param(b"\n\n\r\n\r", [], id="blank-lines-only"),
        pytest.param(b"data: a\n", [], id="unterminated-event-discarded"),
        pytest.param(b"data: a", [], id="unterminated-line-discarded"),
        pytest.param(b"data: \xff\xfe\n\n", ["\ufffd\ufffd"], id="invalid-utf8-replaced"),
        pytest.param("data: a\u2028b\x85c\n\n".encode(), ["a\u2028b\x85c"], id="only-cr-lf-break-lines"),
        pytest.param(b"data: a:b: c\n\n", ["a:b: c"], id="split-on-first-colon-only"),
    ],
)
def test_decode(wire: bytes, events: list[str]) -> None:
    assert decode([wire]) == events


@pytest.mark.parametrize(
    ("chunks", "events"),
    [
        pytest.param([b"data: a\r", b"\ndata: b\r\n\r\n"], ["a\nb"], id="crlf-split"),
        pytest.param([b"data: a\r", b"", b"\ndata: b\r\n\r\n"], ["a\nb"], id="crlf-split-with-empty-chunk"),
        pytest.param([b"data: a\r", b"\rdata: b\n\n"], ["a", "b"], id="cr-then-cr"),
        pytest.param([b"data: a\r\n\r", b"\n"], ["a"], id="blank-crlf-split"),
        pytest.param([b"da", b"ta", b": ", b"x", b"\n", b"\n"], ["x"], id="split-inside-field"),
        pytest.param([b"data: \xf0\x9f", b"\x98\x80\n\n"], ["😀"], id="split-in-4-byte-char"),
        pytest.param([b"data: \xe2\x82", b"\xac\n\n"], ["€"], id="split-in-3-byte-char"),
    ],
)
def test_chunk_boundaries(chunks: list[bytes], events: list[str]) -> None:
    assert decode(chunks) == events


@pytest.mark.parametrize("cut", range(len(SHIMMY_EXAMPLE) + 1))
def test_every_split_point(cut: int) -> None:
    assert decode([SHIMMY_EXAMPLE[:cut], SHIMMY_EXAMPLE[cut:]]) == SHIMMY_EXAMPLE_EVENTS


def test_byte_at_a_time_unicode() -> None:
    wire = "data: héllo 😀\ndata:  wörld\n\n".encode()
    assert decode([wire[i : i + 1] for i in range(len(wire))]) == ["héllo 😀\n wörld"]


def test_event_is_returned_by_the_chunk_that_completes_it() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\n") == []
    assert decoder.feed(b"\ndata: b\n\ndata: c") == ["a", "b"]
    assert decoder.feed(b"\n\n") == ["c"]
    assert decoder.flush() == []


def test_flush_discards_and_resets() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\ndata: b") == []
    assert decoder.flush() == []
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"data: c\n\n") == ["c"]


def test_unterminated_line_over_cap_raises() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"data: ")
    piece = b"x" * (64 * 1024)
    with pytest.raises(SSEError, match=str(MAX_PENDING_BYTES)):
        for _ in range(MAX_PENDING_BYTES // len(piece) + 1):
            decoder.feed(piece)


def test_unterminated_event_over_cap_raises() -> None:
    decoder = SSEDecoder()
    with pytest.raises(SSEError):
        decoder.feed((b"data: " + b"x" * 64 + b"\n") * (MAX_PENDING_BYTES // 64 + 1))


def test_cap_is_inclusive() -> None:
    assert SSEDecoder().feed(b"x" * MAX_PENDING_BYTES) == []


def test_sse_error_is_value_error() -> None:
    assert issubclass(SSEError, ValueError)


_token_text = st.text(st.characters(codec="utf-8", exclude_characters="\r"))
_spacey_text = st.lists(st.sampled_from([" ", "\n", "a", "é", "😀", ":", "data: ", "[DONE]"])).map("".join)


@given(
    tokens=st.lists(st.one_of(_token_text, _spacey_text), max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=12),
)
def test_axum_stream_round_trips_under_any_chunking(tokens: list[str], cuts: list[int]) -> None:
    wire = b"".join(axum_event(token) for token in tokens) + DONE
    bounds = sorted({cut % (len(wire) + 1) for cut in cuts} | {0, len(wire)})
    chunks = [wire[start:end] for start, end in pairwise(bounds)]
    assert decode(chunks) == [*tokens, "[DONE]"]


@given(tokens=st.lists(_token_text, max_size=10), data=st.data())
def test_any_line_ending_round_trips(tokens: list[str], data: st.DataObject) -> None:
    lines: list[bytes] = []
    for token in tokens:
        lines += [b"data: " + piece.encode() for piece in token.split("\n")]
        lines.append(b"")
    endings = data.draw(st.lists(st.sampled_from([b"\n", b"\r", b"\r\n"]), min_size=len(lines), max_size=len(lines)))
    wire = bytearray()
    previous = b""
    for line, ending in zip(lines, endings, strict=True):
        if not line and previous == b"\r" and ending == b"\n":
            ending = b"\r\n"  # CR then LF would be one CRLF terminator, swallowing the blank line
        wire += line + ending
        previous = ending
    size = data.draw(st.integers(min_value=1, max_value=max(1, len(wire))))
    assert decode([bytes(wire[i : i + size]) for i in range(0, len(wire), size)]) == tokens


def test_done() -> None:
    assert DONE == b"data: [DONE]\n\n"
    assert decode([DONE]) == ["[DONE]"]


def test_encode_event() -> None:
    assert encode_event(b'{"a":1}') == b'data: {"a":1}\n\n'


def test_json_payload_has_no_raw_newline_and_round_trips() -> None:
    payload = msgspec.json.encode({"delta": {"content": "a\nb\r\n\u2028 c"}})
    assert b"\n" not in payload
    assert b"\r" not in payload
    assert decode([encode_event(payload)]) == [payload.decode()]
