"""What axum 0.7.9 does around Shimmy's handlers: `Json<T>` rejections, SSE framing, empty error bodies.

Shimmy's request errors are axum's, not Shimmy's: a client sees serde_json's messages, prefixed by
serde_path_to_error's path, as plain text (spec §6.1). To reproduce the *first* error serde hits, with its line
and column, the body is walked in document order against a small schema instead of being parsed up front.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from json.decoder import scanstring  # type: ignore[attr-defined]
from typing import Any

from aiohttp import web

__all__ = [
    "ANY",
    "BOOL",
    "DONE",
    "F32",
    "I32",
    "STRING",
    "USIZE",
    "VALUE",
    "Invalid",
    "Opt",
    "Rejection",
    "Schema",
    "Seq",
    "Struct",
    "Untagged",
    "empty",
    "json_bytes",
    "json_response",
    "parse",
    "read_json",
    "rust_debug",
    "sse_event",
]

BODY_LIMIT = 2 * 1024 * 1024  # axum's DefaultBodyLimit; Shimmy never changes it
_RECURSION_LIMIT = 128  # serde_json's default nesting limit

# --- responses ------------------------------------------------------------------------------------------------


def empty(status: int, headers: dict[str, str] | None = None) -> web.Response:
    """An error with no body: what Shimmy's `StatusCode` returns and axum's fallback/405 give."""
    return web.Response(status=status, headers=headers)


def json_bytes(value: Any, *, sort_keys: bool = False) -> bytes:
    """serde_json's compact output. `json!` bodies have sorted keys; struct bodies keep field order."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=sort_keys).encode()


def json_response(value: Any, *, status: int = 200, sort_keys: bool = False) -> web.Response:
    """axum's `Json(...)` response: `content-type: application/json`, no charset."""
    return web.Response(status=status, body=json_bytes(value, sort_keys=sort_keys), content_type="application/json")


def sse_event(data: str) -> bytes:
    """axum's `Event::data`: one `data: ` line per `\\n`-separated piece, then a blank line."""
    return "".join(f"data: {line}\n" for line in data.split("\n")).encode() + b"\n"


DONE = sse_event("[DONE]")

# --- schema ---------------------------------------------------------------------------------------------------

STRING, BOOL, F32, I32, USIZE = "a string", "a boolean", "f32", "i32", "usize"  # serde's "expected ..." texts
ANY = "any"  # an unknown field: serde's IgnoredAny, syntax only, no path tracking inside
VALUE = "value"  # serde_json::Value: any JSON, with path tracking inside


@dataclass(frozen=True, slots=True)
class Opt:
    inner: Schema


@dataclass(frozen=True, slots=True)
class Seq:
    item: Schema


@dataclass(frozen=True, slots=True)
class Struct:
    name: str
    fields: dict[str, Schema]

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(k for k, v in self.fields.items() if not isinstance(v, Opt))


@dataclass(frozen=True, slots=True)
class Untagged:
    """`#[serde(untagged)]`: buffered as any JSON, then tried against each variant."""

    name: str
    accepts: Callable[[Any], bool]


Schema = str | Opt | Seq | Struct | Untagged

# --- errors ---------------------------------------------------------------------------------------------------

Path = tuple[str | int, ...]


class Invalid(Exception):
    """A serde_json error: `syntax` (400) or data (422), with serde_path_to_error's path."""

    def __init__(self, message: str, offset: int, path: Path, *, syntax: bool) -> None:
        super().__init__(message)
        self.offset, self.path, self.syntax = offset, path, syntax

    def serde_message(self, text: str) -> str:
        """`<msg> at line L column C`; columns count bytes, like serde's `position_of_index`."""
        line_start = text.rfind("\n", 0, self.offset) + 1
        line = text.count("\n", 0, self.offset) + 1
        column = len(text[line_start : self.offset].encode())
        return f"{self.args[0]} at line {line} column {column}"

    def path_message(self, text: str) -> str:
        """With serde_path_to_error's prefix (`messages[0].content: `), left out at the top level."""
        parts = [f"[{p}]" if isinstance(p, int) else p for p in self.path]
        prefix = "".join(p if i == 0 or p.startswith("[") else "." + p for i, p in enumerate(parts))
        return f"{prefix}: {self.serde_message(text)}" if prefix else self.serde_message(text)


class Rejection(Exception):
    """An axum rejection; `document` is the body as plain JSON when it parsed (for the emulator's stats)."""

    def __init__(self, status: int, text: str, document: Any = None) -> None:
        super().__init__(text)
        self.status, self.text, self.document = status, text, document

    def response(self) -> web.Response:
        return web.Response(status=self.status, text=self.text, content_type="text/plain")


# --- the walker -----------------------------------------------------------------------------------------------

_WS = re.compile(r"[ \t\n\r]*")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_NUMERIC = (F32, I32, USIZE)
_DIGITS = "0123456789"
_CONTROL = "control character (\\u0000-\\u001F) found while parsing a string"
_I32 = range(-(2**31), 2**31)
_INT_RANGE = range(-(2**63), 2**64)  # serde_json parses integers beyond i64/u64 as f64


def _rust_float(x: float) -> str:
    """Rust's `Display` for f64 (never an exponent) plus serde's `WithDecimalPoint`."""
    s = repr(x)
    if "e" in s:
        s = format(Decimal(s), "f")
    return s if "." in s else s + ".0"


def rust_debug(s: str) -> str:
    """Rust's `{:?}` of a string, as serde and Shimmy print it."""
    escapes = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\0": "\\0"}
    body = "".join(escapes.get(c) or (f"\\u{{{ord(c):x}}}" if ord(c) < 0x20 or c == "\x7f" else c) for c in s)
    return f'"{body}"'


def _unexpected(value: Any) -> str:
    """serde's `Unexpected` display of a JSON scalar."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean `{str(value).lower()}`"
    if isinstance(value, int):
        return f"integer `{value}`"
    if isinstance(value, float):
        return f"floating point `{_rust_float(value)}`"
    return f"string {rust_debug(value)}"


class _Walker:
    """Recursive descent over the text; raises `Invalid` at the first error, like serde would."""

    __slots__ = ("n", "text")

    def __init__(self, text: str) -> None:
        self.text, self.n = text, len(text)

    def ws(self, i: int) -> int:
        return _WS.match(self.text, i).end()  # type: ignore[union-attr]

    def syntax(self, message: str, offset: int, path: Path) -> Invalid:
        return Invalid(message, min(offset, self.n), path, syntax=True)

    def document(self, schema: Schema) -> Any:
        value, i = self.value(schema, 0, (), 0)
        i = self.ws(i)
        if i < self.n:
            raise self.syntax("trailing characters", i + 1, ())
        return value

    def value(self, schema: Schema, i: int, path: Path, depth: int) -> tuple[Any, int]:
        i = self.ws(i)
        if i >= self.n:
            raise self.syntax("EOF while parsing a value", i, path)
        c = self.text[i]
        if isinstance(schema, Opt):
            if c == "n":
                return self.scalar(i, path)
            schema = schema.inner
        if schema is ANY or schema is VALUE:
            return self.any(i, path, depth, track=schema is VALUE)
        if isinstance(schema, Untagged):
            value, end = self.any(i, path, depth, track=True)
            if not schema.accepts(value):
                raise Invalid(f"data did not match any variant of untagged enum {schema.name}", end, path, syntax=False)
            return value, end
        if isinstance(schema, Struct):
            if c == "{":
                return self.struct(schema, i, path, depth)
            return self.invalid_type(f"struct {schema.name}", i, path)
        if isinstance(schema, Seq):
            if c == "[":
                return self.seq(schema.item, i, path, depth, track=True)
            return self.invalid_type("a sequence", i, path)
        if (
            (schema is STRING and c == '"')
            or (schema is BOOL and c in "tf")
            or (schema in _NUMERIC and (c == "-" or c in _DIGITS))
        ):
            value, end = self.scalar(i, path)
            if schema is USIZE and isinstance(value, int) and value < 0:
                raise Invalid(f"invalid value: {_unexpected(value)}, expected usize", end, path, syntax=False)
            if schema is I32 and isinstance(value, int) and value not in _I32:
                raise Invalid(f"invalid value: {_unexpected(value)}, expected i32", end, path, syntax=False)
            if schema is F32 or not isinstance(value, float):
                return value, end
            raise Invalid(f"invalid type: {_unexpected(value)}, expected {schema}", end, path, syntax=False)
        return self.invalid_type(str(schema), i, path)

    def invalid_type(self, expected: str, i: int, path: Path) -> tuple[Any, int]:
        """serde's `peek_invalid_type`: containers are reported where they start, scalars after they end."""
        c = self.text[i]
        if c in "[{":
            kind = "sequence" if c == "[" else "map"
            raise Invalid(f"invalid type: {kind}, expected {expected}", i, path, syntax=False)
        value, end = self.scalar(i, path)
        raise Invalid(f"invalid type: {_unexpected(value)}, expected {expected}", end, path, syntax=False)

    def any(self, i: int, path: Path, depth: int, *, track: bool) -> tuple[Any, int]:
        c = self.text[i]
        if c == "{":
            return self.struct(None, i, path, depth, track=track)
        if c == "[":
            return self.seq(VALUE if track else ANY, i, path, depth, track=track)
        return self.scalar(i, path)

    def scalar(self, i: int, path: Path) -> tuple[Any, int]:
        text, c = self.text, self.text[i]
        if c == '"':
            return self.string(i, path)
        for word, value in (("null", None), ("true", True), ("false", False)):
            if c == word[0]:
                for k, expected in enumerate(word[1:], i + 1):
                    if k >= self.n:
                        raise self.syntax("EOF while parsing a value", k, path)
                    if text[k] != expected:
                        raise self.syntax("expected ident", k + 1, path)
                return value, i + len(word)
        if c == "-" or c in _DIGITS:
            return self.number(i, path)
        raise self.syntax("expected value", i + 1, path)

    def number(self, i: int, path: Path) -> tuple[Any, int]:
        text, n = self.text, self.n
        m = _NUMBER.match(text, i)
        if m is None:  # a lone `-`
            raise self.syntax("EOF while parsing a value", n, path) if i + 1 >= n else self.number_error(i + 2, path)
        end = m.end()
        if end < n and ((text[end] == "." and not m.group(1)) or (text[end] in "eE" and not m.group(2))):
            k = end + 1 + (end + 1 < n and text[end] in "eE" and text[end + 1] in "+-")  # digits missing after `.`/`e`
            raise self.syntax("EOF while parsing a value", n, path) if k >= n else self.number_error(k + 1, path)
        if end < n and text[end] in _DIGITS:  # a leading zero
            raise self.number_error(end + 1, path)
        digits = m.group()
        if m.group(1) or m.group(2) or len(digits) > 20 or int(digits) not in _INT_RANGE:
            value = float(digits)
            if value in (float("inf"), float("-inf")):
                raise self.syntax("number out of range", end, path)
            return value, end
        return int(digits), end

    def number_error(self, offset: int, path: Path) -> Invalid:
        return self.syntax("invalid number", offset, path)

    def string(self, i: int, path: Path) -> tuple[str, int]:
        try:
            return scanstring(self.text, i + 1, True)  # type: ignore[no-any-return]
        except json.JSONDecodeError as e:
            if e.msg.startswith("Unterminated"):
                raise self.syntax("EOF while parsing a string", self.n, path) from None
            if e.msg.startswith("Invalid control"):
                raise self.syntax(_CONTROL, e.pos + 1, path) from None
            raise self.syntax("invalid escape", e.pos + 2, path) from None

    def enter(self, i: int, path: Path, depth: int) -> int:
        if depth + 1 >= _RECURSION_LIMIT:
            raise self.syntax("recursion limit exceeded", i + 1, path)
        return depth + 1

    def struct(
        self, schema: Struct | None, i: int, path: Path, depth: int, *, track: bool = True
    ) -> tuple[dict[str, Any], int]:
        depth = self.enter(i, path, depth)
        text, out, i = self.text, {}, i + 1
        while True:
            i = self.ws(i)
            if i >= self.n:
                raise self.syntax("EOF while parsing an object", i, path)
            c = text[i]
            if c == "}":
                break
            if c == ",":
                if not out:
                    raise self.syntax("key must be a string", i + 1, path)
                i = self.ws(i + 1)
                if i >= self.n:
                    raise self.syntax("EOF while parsing a value", i, path)
                if text[i] == "}":
                    raise self.syntax("trailing comma", i + 1, path)
                c = text[i]
            elif out:
                raise self.syntax("expected `,` or `}`", i + 1, path)
            if c != '"':
                raise self.syntax("key must be a string", i + 1, path)
            key, i = self.string(i, path)
            field = schema.fields.get(key) if schema is not None else None
            if field is not None and key in out:
                raise Invalid(f"duplicate field `{key}`", self.ws(i), path, syntax=False)
            child = (*path, key) if track else path
            i = self.ws(i)
            if i >= self.n:
                raise self.syntax("EOF while parsing an object", i, child)
            if text[i] != ":":
                raise self.syntax("expected `:`", i + 1, child)
            unknown = VALUE if schema is None and track else ANY  # a struct ignores unknown fields
            out[key], i = self.value(field or unknown, i + 1, child, depth)
        end = i + 1
        if schema is not None:
            for name in schema.required:
                if name not in out:
                    raise Invalid(f"missing field `{name}`", end, path, syntax=False)
        return out, end

    def seq(self, item: Schema, i: int, path: Path, depth: int, *, track: bool) -> tuple[list[Any], int]:
        depth = self.enter(i, path, depth)
        text, out, i = self.text, [], i + 1
        while True:
            i = self.ws(i)
            if i >= self.n:
                raise self.syntax("EOF while parsing a list", i, path)
            if text[i] == "]":
                break
            if out:
                if text[i] != ",":
                    raise self.syntax("expected `,` or `]`", i + 1, path)
                i = self.ws(i + 1)
                if i >= self.n:
                    raise self.syntax("EOF while parsing a value", i, path)
                if text[i] == "]":
                    raise self.syntax("trailing comma", i + 1, path)
            value, i = self.value(item, i, (*path, len(out)) if track else path, depth)
            out.append(value)
        return out, i + 1


def parse(text: str, schema: Schema) -> Any:
    """Deserialize `text` as serde_json would into `schema`; raises `Invalid`."""
    return _Walker(text).document(schema)


# --- the extractor --------------------------------------------------------------------------------------------

_JSON_PREFIX = "Failed to deserialize the JSON body into the target type: "
_SYNTAX_PREFIX = "Failed to parse the request body as JSON: "


def _is_json(content_type: str | None) -> bool:
    """axum's `json_content_type`: `application/json` or `application/<x>+json`, parameters allowed."""
    if not content_type:
        return False
    mime = content_type.split(";", 1)[0].strip().lower()
    kind, _, subtype = mime.partition("/")
    return kind == "application" and (subtype == "json" or subtype.endswith("+json"))


async def read_json(request: web.Request, schema: Schema) -> Any:
    """axum's `Json<T>` extractor: content type (415), body limit (413), then serde (400/422)."""
    if not _is_json(request.headers.get("Content-Type")):
        raise Rejection(415, "Expected request with `Content-Type: application/json`")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise Rejection(413, "Failed to buffer the request body: length limit exceeded") from None
    try:
        text = raw.decode()
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise Rejection(400, f"{_SYNTAX_PREFIX}invalid unicode code point at line {line} column {column}") from None
    try:
        return parse(text, schema)
    except Invalid as e:
        if e.syntax:
            raise Rejection(400, _SYNTAX_PREFIX + e.path_message(text)) from None
        raise Rejection(422, _JSON_PREFIX + e.path_message(text), _loads(text)) from None


def _loads(text: str) -> Any:
    """The body as plain JSON, or None: a data error can come before a later syntax error."""
    try:
        return json.loads(text)
    except ValueError:
        return None
