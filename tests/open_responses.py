"""Responses bodies and events checked against the Open Responses specification (tests/schemas/), offline.

The specification is loaded into a local `referencing` registry: every `$ref` resolves inside the two documents
here, nothing is fetched. What Open Responses does not define and OpenAI does (custom tools, their calls and input
events) is validated against OpenAI's own schemas for them, added to the specification's unions.

`recording()` tees every `POST /v1/responses` and `/v1/responses/compact` answer that an httpx or httpx2 client (the
`openai` and `anthropic` SDKs are on httpx2, raw tests and some frameworks on httpx) reads, so the integration
suite's fixture checks all of them.
"""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import httpx2
import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

__all__ = ["Recorder", "check_event", "check_response", "check_stream", "recording"]

_HERE = Path(__file__).parent / "schemas"
_SPEC = "urn:open-responses"
_OPENAI = "urn:openai-custom-tools"


def _load() -> tuple[Registry, dict[str, str]]:
    spec = json.loads((_HERE / "open-responses.json").read_text())
    openai = json.loads((_HERE / "openai-custom-tools.json").read_text())
    schemas = spec["components"]["schemas"]
    # A defect of the generated document: `schema` (the client's JSON schema, any object) is rendered as
    # `anyOf: [{type: null}]`, which no json_schema format that carries its schema (as OpenAI's do) can meet.
    schemas["JsonSchemaResponseFormat"]["properties"]["schema"] = {"anyOf": [{"type": "object"}, {"type": "null"}]}
    extra = {"Tool": "CustomToolParam", "ItemField": "CustomToolCall"}
    for union, name in extra.items():
        schemas[union] = copy.deepcopy(schemas[union])
        schemas[union]["oneOf"].append({"$ref": f"{_OPENAI}#/components/schemas/{name}"})
    schemas["ResponseResource"]["properties"]["tool_choice"]["oneOf"].append(
        {"$ref": f"{_OPENAI}#/components/schemas/ToolChoiceCustom"}
    )
    events = {}
    stream = spec["paths"]["/responses"]["post"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    for ref in stream["oneOf"]:
        name = ref["$ref"].rsplit("/", 1)[1]
        events[schemas[name]["properties"]["type"]["enum"][0]] = f"{_SPEC}#/components/schemas/{name}"
    for name in ("ResponseCustomToolCallInputDeltaEvent", "ResponseCustomToolCallInputDoneEvent"):
        kind = openai["components"]["schemas"][name]["properties"]["type"]["enum"][0]
        events[kind] = f"{_OPENAI}#/components/schemas/{name}"
    registry = Registry().with_resources(
        (uri, Resource.from_contents(doc, default_specification=DRAFT202012))
        for uri, doc in ((_SPEC, spec), (_OPENAI, openai))
    )
    return registry, events


_REGISTRY, _EVENTS = _load()


def _check(value: Any, ref: str) -> None:
    validator = jsonschema.Draft202012Validator({"$ref": ref}, registry=_REGISTRY)
    errors = list(validator.iter_errors(value))
    if errors:
        error = jsonschema.exceptions.best_match(errors)
        where = "/".join(map(str, error.absolute_path))
        raise AssertionError(f"not Open Responses ({ref.rsplit('/', 1)[1]}) at /{where}: {error.message}\n{value}")


def check_response(body: dict[str, Any], schema: str = "ResponseResource") -> None:
    """A Responses object (or `CompactResource`), as the specification requires it."""
    _check(body, f"{_SPEC}#/components/schemas/{schema}")


def check_event(event: dict[str, Any]) -> None:
    """One streamed event: its type is one the specification (or OpenAI, for custom tools) defines, and it
    carries what that type requires."""
    ref = _EVENTS.get(event.get("type", ""))
    assert ref is not None, f"not an Open Responses event type: {event.get('type')!r}"
    _check(event, ref)


def check_stream(text: str) -> list[dict[str, Any]]:
    """Every whole event of an SSE text (a stream read only in part ends mid-event); each `event:` line names
    its data's type. The events, in order."""
    events = []
    for block in text.split("\n\n")[:-1]:
        lines = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line)
        event = json.loads(lines["data"])
        assert lines.get("event") == event["type"], block
        check_event(event)
        events.append(event)
    return events


@dataclass
class Recorder:
    """The Responses answers clients read during a test: (path, content type, bytes, read to the end)."""

    answers: list[tuple[str, str, bytes, bool]] = field(default_factory=list)

    def check(self) -> int:
        """Validate what was recorded; how many answers were checked."""
        for path, kind, body, whole in self.answers:
            if kind.startswith("text/event-stream"):
                check_stream(body.decode())
            elif whole:
                check_response(json.loads(body), "CompactResource" if path.endswith("/compact") else "ResponseResource")
        return len(self.answers)


_PATHS = ("/v1/responses", "/v1/responses/compact")


class _Tee:
    """A response body stream that keeps a copy of what the client reads; one subclass per library below, since
    each client checks that a stream is of its own library's types."""

    def __init__(self, inner: Any, record: Any) -> None:
        self.inner, self.record, self.chunks, self.whole = inner, record, [], False

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.inner:
            self.chunks.append(chunk)
            yield chunk
        self.whole = True

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.inner:
            self.chunks.append(chunk)
            yield chunk
        self.whole = True

    def close(self) -> None:
        self.inner.close()
        self.record(b"".join(self.chunks), self.whole)

    async def aclose(self) -> None:
        await self.inner.aclose()
        self.record(b"".join(self.chunks), self.whole)


_TEES = {lib: type("Tee", (_Tee, lib.SyncByteStream, lib.AsyncByteStream), {}) for lib in (httpx, httpx2)}


def _tee(recorder: Recorder, lib: Any, request: Any, response: Any) -> None:
    path = request.url.path
    if request.method != "POST" or path not in _PATHS or response.status_code != 200:
        return
    if response.headers.get("content-encoding"):
        return
    kind = response.headers.get("content-type", "")
    response.stream = _TEES[lib](
        response.stream, lambda body, whole: recorder.answers.append((path, kind, body, whole))
    )


@contextmanager
def recording() -> Iterator[Recorder]:
    """Every Responses answer read through httpx's and httpx2's transports meanwhile, recorded for
    `Recorder.check`."""
    recorder = Recorder()
    saved = []
    for lib in (httpx, httpx2):
        sync, asynchronous = lib.HTTPTransport.handle_request, lib.AsyncHTTPTransport.handle_async_request
        saved.append((lib, sync, asynchronous))

        def handle(self: Any, request: Any, sync: Any = sync, lib: Any = lib) -> Any:
            response = sync(self, request)
            _tee(recorder, lib, request, response)
            return response

        async def handle_async(self: Any, request: Any, asynchronous: Any = asynchronous, lib: Any = lib) -> Any:
            response = await asynchronous(self, request)
            _tee(recorder, lib, request, response)
            return response

        lib.HTTPTransport.handle_request = handle
        lib.AsyncHTTPTransport.handle_async_request = handle_async
    try:
        yield recorder
    finally:
        for lib, sync, asynchronous in saved:
            lib.HTTPTransport.handle_request = sync
            lib.AsyncHTTPTransport.handle_async_request = asynchronous
