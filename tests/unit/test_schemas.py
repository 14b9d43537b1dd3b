"""Issue 22: a client's JSON Schema is data, bounded and checked when the request arrives (extproc/schemas.py), and
the caches of what the processor builds from client values are bounded by size (extproc/cache.py)."""

from __future__ import annotations

import json
import time

import pytest

from extproc.cache import SizedCache
from extproc.errors import InvalidRequest
from extproc.schemas import (
    MAX_SCHEMA_BYTES,
    MAX_SCHEMA_DEPTH,
    MAX_SCHEMAS_BYTES,
    check_schema,
    check_schemas,
    schema_violation,
)
from extproc.tools import CallDetector, OutputError, Tool, Tooling, parse_output


def _nested(levels: int) -> dict:
    schema: dict = {"type": "object"}
    node = schema
    for _ in range(levels):
        node["properties"] = {"x": {"type": "object"}}
        node = node["properties"]["x"]
    return schema


@pytest.mark.parametrize(
    ("schema", "said"),
    [
        ({"properties": {"a": {"$ref": "http://127.0.0.1:9/x.json"}}}, "only local refs"),
        ({"properties": {"a": {"$ref": "file:///etc/passwd"}}}, "only local refs"),
        ({"properties": {"a": {"$ref": "other.json#/a"}}}, "only local refs"),
        ({"properties": {"a": {"$ref": "#/$defs/missing"}}}, "does not resolve"),
        ({"properties": {"a": {"$ref": "#/properties/b/enum"}, "b": {"enum": [1]}}}, "not a schema"),
        ({"$ref": "#"}, "loops back"),
        ({"$defs": {"a": {"allOf": [{"$ref": "#/$defs/b"}]}, "b": {"not": {"$ref": "#/$defs/a"}}},
          "$ref": "#/$defs/a"}, "loops back"),
        ({"properties": {"a": {"$id": "http://127.0.0.1:9/y.json", "type": "string"}}}, "only at the schema's root"),
        ({"$dynamicRef": "#meta"}, "$dynamicRef is not supported"),
        ({"type": "string", "pattern": "(?=a)a"}, "RE2 syntax"),
        ({"type": "object", "patternProperties": {"(a)\\1": {}}}, "RE2 syntax"),
        ({"patternProperties": {"^x": {}}, "unevaluatedProperties": False}, "unevaluatedProperties"),
        (_nested(MAX_SCHEMA_DEPTH), "nested more than"),
        ({"description": "x" * MAX_SCHEMA_BYTES}, "bytes as JSON"),
        ({"type": 5}, "is not valid"),
    ],
)
def test_unusable_schemas_are_refused_with_the_reason(schema: dict, said: str) -> None:
    problem = check_schema(schema)
    assert problem is not None and said in problem, problem


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"child": {"$ref": "#"}}},  # recursion through the value is fine
        {"properties": {"a": {"$ref": "#x"}}, "$defs": {"x": {"$anchor": "x", "type": "integer"}}},
        {"$id": "https://example.com/person.json", "properties": {"a": {"$ref": "#/$defs/n"}},
         "$defs": {"n": {"type": "string"}}},
        {"$schema": "http://json-schema.org/draft-07/schema#", "definitions": {"n": {"type": "string"}},
         "properties": {"a": {"$ref": "#/definitions/n"}}},
        {"type": "object", "properties": {"$ref": {"type": "string"}, "$id": {"type": "string"}}},  # names
        _nested(MAX_SCHEMA_DEPTH // 2 - 1),
    ],
)
def test_local_refs_anchors_a_root_id_and_property_names_are_accepted(schema: dict) -> None:
    assert check_schema(schema) is None


def test_a_backtracking_pattern_runs_in_linear_time() -> None:
    schema = {"type": "string", "pattern": "^(a+)+$"}
    assert check_schema(schema) is None
    started = time.perf_counter()
    problem = schema_violation(schema, "a" * 50_000 + "!")
    assert problem is not None and "does not match" in problem and len(problem) < 300
    assert time.perf_counter() - started < 1  # Python's re: minutes (30 a's already take seconds)
    assert schema_violation({"patternProperties": {"^(a+)+$": {"type": "integer"}}, "additionalProperties": False},
                            {"a" * 40: 1, "b": 2}) is not None


def test_a_request_schemas_are_bounded_together_and_name_the_param() -> None:
    one = {"type": "object", "description": "x" * (MAX_SCHEMA_BYTES - 100)}
    with pytest.raises(InvalidRequest) as caught:
        check_schemas([(f"tools[{i}].input_schema", one) for i in range(MAX_SCHEMAS_BYTES // MAX_SCHEMA_BYTES + 1)])
    assert caught.value.param == "tools"
    with pytest.raises(InvalidRequest) as caught:
        check_schemas([("tools[0].parameters", None), ("tools[1].parameters", {"$ref": "http://x/"})])
    assert caught.value.param == "tools[1].parameters"


def test_the_sized_cache_holds_at_most_its_budget_and_never_an_entry_larger_than_it() -> None:
    built: list[str] = []
    cache: SizedCache[str, int] = SizedCache(lambda k: built.append(k) or len(k), len, 10)
    assert cache.get("aaaa") == 4 and cache.get("bbbb") == 4 and cache.get("aaaa") == 4
    assert built == ["aaaa", "bbbb"]
    cache.get("cccc")  # "bbbb" is the least recently used
    assert cache.total <= 10 and len(cache) == 2
    cache.get("bbbb")
    assert built == ["aaaa", "bbbb", "cccc", "bbbb"]
    assert cache.get("x" * 11) == 11 and cache.total <= 10


TOOLING = Tooling(tools=(Tool("f", "", {"type": "object", "properties": {"a": {"type": "integer"}}}),))


@pytest.mark.parametrize("prose", ["[1] The answer is 42.", "[citation needed] maybe", "{braces} too", "<b>x</b>",
                                   '{"answer": 42}', "[ ] unchecked"])
def test_prose_and_json_that_is_no_call_are_text(prose: str) -> None:
    assert parse_output(prose, TOOLING).text == prose
    detector = CallDetector(TOOLING)
    released = "".join(detector.feed(c) for c in prose)
    assert released + parse_output(detector.finish(), TOOLING).text == prose


def test_a_stream_releases_prose_as_soon_as_it_cannot_be_a_call() -> None:
    detector = CallDetector(TOOLING)
    assert detector.feed("[") == ""
    assert detector.feed("1") == "[1"
    assert detector.feed("] The answer") == "] The answer"


@pytest.mark.parametrize("broken", ['{"name": "f", "arguments": {"a": ', '[{"name": "f"', "<tool_call>\n{nope"])
def test_a_call_that_was_begun_and_not_finished_is_still_an_invalid_call(broken: str) -> None:
    with pytest.raises(OutputError) as caught:
        parse_output(broken, TOOLING)
    assert caught.value.code == "invalid_tool_call"
    detector = CallDetector(TOOLING)
    assert detector.feed(broken) == ""


def test_a_required_call_is_still_required_of_prose() -> None:
    with pytest.raises(OutputError) as caught:
        parse_output("[1] The answer is 42.", Tooling(tools=TOOLING.tools, choice="required"))
    assert caught.value.code == "missing_tool_call"


def _too_many(api: str) -> list[tuple[bytes, str]]:
    from extproc.openai_schema import MAX_CONTENT_PARTS, MAX_MESSAGES, MAX_TOOLS

    def encode(value: object) -> bytes:
        return json.dumps(value).encode()

    user = {"role": "user", "content": "x"}
    parts = [{"type": "text", "text": "x"}] * (MAX_CONTENT_PARTS + 1)
    if api == "chat":
        base = {"model": "m"}
        return [(encode({**base, "messages": [user] * (MAX_MESSAGES + 1)}), "messages"),
                (encode({**base, "messages": [{"role": "user", "content": parts}]}), "messages[0].content")]
    if api == "messages":
        base = {"model": "m", "max_tokens": 3}
        tool = {"name": "f", "input_schema": {"type": "object"}}
        return [(encode({**base, "messages": [user] * (MAX_MESSAGES + 1)}), "messages"),
                (encode({**base, "messages": [{"role": "user", "content": parts}]}), "messages[0].content"),
                (encode({**base, "messages": [user], "system": parts}), "system"),
                (encode({**base, "messages": [user], "tools": [tool] * (MAX_TOOLS + 1)}), "tools")]
    parts = [{"type": "input_text", "text": "x"}] * (MAX_CONTENT_PARTS + 1)
    return [(encode({"model": "m", "input": [user] * (MAX_MESSAGES + 1)}), "input"),
            (encode({"model": "m", "input": [{"role": "user", "content": parts}]}), "input[0].content")]


@pytest.mark.parametrize("api", ["chat", "messages", "responses"])
def test_messages_content_parts_and_tools_are_counted_before_any_work(api: str) -> None:
    from extproc.apis.messages import Messages
    from extproc.openai_schema import parse_chat_request, parse_responses_request

    parse = {"chat": parse_chat_request, "messages": Messages.parse, "responses": parse_responses_request}[api]
    for body, param in _too_many(api):
        with pytest.raises(InvalidRequest) as caught:
            parse(body)
        assert caught.value.param == param, caught.value.message
