"""A client's JSON Schema, checked once when the request arrives and then applied to the model's output safely.

A schema is data, never a locator. jsonschema's default resolver fetches any `$ref` it cannot resolve locally (an
`http://` URL, with no timeout, on the event loop; a `file://` path, whose content came back in the error), so:

- every `$ref` must be local (`#`, `#/json/pointer`, `#anchor`) and resolve inside the schema itself; validation
  runs with an empty `referencing.Registry`, so nothing outside the schema can be reached even if a check missed
  it; nested `$id`s (which would move the base of later refs) and dynamic/recursive refs are refused;
- a `$ref` loop that never consumes the instance (`{"$ref": "#"}`) is refused: it would recurse without end;
- size and depth are bounded (`MAX_SCHEMA_BYTES`, `MAX_SCHEMA_DEPTH`), so the check and the prompt stay small;
- every `pattern` and `patternProperties` key runs in RE2 (google-re2: linear time, bounded memory) instead of
  Python's backtracking `re`, where `(a+)+$` against 30 `a`s and a `!` runs for minutes; a pattern RE2 cannot
  compile (lookaround, backreferences) is refused with the reason;
- a failure applying the schema to the output is the API's own 502 (`OutputError`), never a 500.

The problems are returned as text (`check_schema`), and each API raises its 400 naming its own param. Checking a
schema against its meta-schema costs far more than the rest of a request, so results are cached by the schema's
text, and so are validators, both bounded by the bytes of schema they hold (`SizedCache`).

Measured (2 cores, shared): the check of a maximal schema (`MAX_SCHEMA_BYTES`, 300 properties with patterns) takes
about 10 ms once, then a cache hit; applying it to a model's answer is linear in the answer.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jsonschema
import msgspec
import re2
import referencing
import referencing.exceptions
import referencing.jsonschema

from extproc.cache import SizedCache
from extproc.errors import InvalidRequest

__all__ = [
    "MAX_SCHEMAS_BYTES",
    "MAX_SCHEMA_BYTES",
    "MAX_SCHEMA_DEPTH",
    "SchemaFailure",
    "check_schema",
    "check_schemas",
    "schema_violation",
]

MAX_SCHEMA_BYTES = 32 * 1024  # one schema, as compact JSON: a large real tool (GitHub's MCP tools) is under 8 KiB
MAX_SCHEMAS_BYTES = 128 * 1024  # all of a request's schemas (tools and output format) together
MAX_SCHEMA_DEPTH = 32  # nesting of objects and arrays in one schema: pydantic's nested models stay under 12
MAX_PATTERN_MEMORY = 256 * 1024  # RE2's memory for one pattern, program and DFA (its default is 8 MiB)
_PATTERN_COST = 32 * 1024  # what a cached pattern is charged: a typical one measured 5-20 KiB once it has searched
_PATTERN_CACHE = 2 << 20  # so at most 64 compiled patterns are kept (16 MiB if each used all it may)
_CACHE_BYTES = 2 << 20  # schema text held by each cache (checks, validators): ~10x that in parsed objects at most

# Keywords whose value is a schema, a list of schemas, or an object of schemas (names -> schemas): the walk follows
# these only, so a property called "$ref" or "$id" is a name, not a keyword.
_ONE = ("additionalProperties", "additionalItems", "contains", "propertyNames", "not", "if", "then", "else",
        "unevaluatedItems", "unevaluatedProperties", "contentSchema", "items")
_MANY = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_NAMED = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "dependencies")
# Keywords that apply a schema to the same instance: a loop through these alone never ends.
_IN_PLACE_ONE = ("not", "if", "then", "else")
_IN_PLACE_MANY = ("allOf", "anyOf", "oneOf")
_REFUSED = ("$dynamicRef", "$dynamicAnchor", "$recursiveRef", "$recursiveAnchor")


class SchemaFailure(Exception):
    """The schema could not be applied to the output (a check should have refused it): the caller's 502."""


def _dumps(value: object) -> str:
    return msgspec.json.encode(value).decode()


def check_schema(schema: Mapping[str, Any]) -> str | None:
    """Why `schema` is not a usable JSON Schema here, or None: checked when the request arrives, not after
    generating. Cached by the schema's text: an agent sends the same tools with every request."""
    text = _dumps(schema)
    if len(text) > MAX_SCHEMA_BYTES:
        return f"the schema has {len(text)} bytes as JSON; at most {MAX_SCHEMA_BYTES} are allowed"
    return _checks.get(text)


def check_schemas(schemas: Sequence[tuple[str, Mapping[str, Any] | None]]) -> None:
    """A request's schemas, (param, schema) with None for none: InvalidRequest naming the first that is not usable,
    or `tools` when all of them together are larger than `MAX_SCHEMAS_BYTES`."""
    total = 0
    for param, schema in schemas:
        if schema is None:
            continue
        problem = check_schema(schema)
        if problem is not None:
            raise InvalidRequest(f"Invalid JSON schema: {problem}", param=param)
        total += len(_dumps(schema))
        if total > MAX_SCHEMAS_BYTES:
            raise InvalidRequest(f"The request's JSON schemas have more than {MAX_SCHEMAS_BYTES} bytes together",
                                 param=param.partition("[")[0].partition(".")[0])


def _problem(text: str) -> str | None:
    schema = json.loads(text)
    if _depth(schema) > MAX_SCHEMA_DEPTH:
        return f"the schema is nested more than {MAX_SCHEMA_DEPTH} levels deep"
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        return str(exc.message)
    try:
        _walk(schema, cls)
    except _Refused as exc:
        return str(exc)
    return None


def _depth(value: object) -> int:
    """Nesting of objects and arrays, without recursion (a deep document must not exhaust the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, level)
            if deepest > MAX_SCHEMA_DEPTH:
                break
            stack += [(child, level + 1) for child in (node.values() if isinstance(node, dict) else node)]
    return deepest


class _Refused(Exception):
    pass


def _subschemas(node: dict[str, Any]) -> Iterator[tuple[object, bool]]:
    """(subschema, applies to the same instance) for each schema under `node`'s keywords."""
    for key in _ONE:
        if isinstance(node.get(key), dict | bool):
            yield node[key], key in _IN_PLACE_ONE
    for key in _MANY:
        if isinstance(node.get(key), list):
            yield from ((item, key in _IN_PLACE_MANY) for item in node[key])
    for key in _NAMED:
        if isinstance(node.get(key), dict):
            in_place = key in ("dependentSchemas", "dependencies")
            yield from ((item, in_place) for item in node[key].values() if isinstance(item, dict | bool))


def _walk(root: dict[str, Any], cls: type[jsonschema.protocols.Validator]) -> None:
    """Every schema the validator can reach from `root`: refs local and resolvable, patterns RE2's, no nested `$id`,
    no loop of refs and in-place keywords (allOf, not, ...) that never descends into the instance."""
    specification = referencing.jsonschema.specification_with(
        cls.META_SCHEMA.get("$id") or cls.META_SCHEMA["id"], default=referencing.jsonschema.DRAFT202012
    )
    resolver = referencing.Registry().resolver_with_root(specification.create_resource(root))
    in_place: dict[int, list[dict[str, Any]]] = {}  # schema -> the schemas it applies to its own instance
    nodes: dict[int, dict[str, Any]] = {}
    todo: list[object] = [root]
    pattern_properties = unevaluated = False
    while todo:
        node = todo.pop()
        if not isinstance(node, dict) or id(node) in nodes:
            continue
        nodes[id(node)] = node
        edges = in_place.setdefault(id(node), [])
        for key in _REFUSED:
            if key in node:
                raise _Refused(f"{key} is not supported")
        if node is not root and isinstance(node.get("$id", node.get("id")), str):
            raise _Refused("$id is allowed only at the schema's root")
        ref = node.get("$ref")
        if isinstance(ref, str):
            if not ref.startswith("#"):
                raise _Refused(f"$ref {ref[:100]!r} is not inside the schema: only local refs (#/...) are allowed")
            try:
                target = resolver.lookup(ref).contents
            except referencing.exceptions.Unresolvable:
                raise _Refused(f"$ref {ref[:100]!r} does not resolve inside the schema") from None
            if not isinstance(target, dict | bool):
                raise _Refused(f"$ref {ref[:100]!r} points at something that is not a schema")
            if isinstance(target, dict):
                edges.append(target)
                todo.append(target)
        for pattern in ([node["pattern"]] if isinstance(node.get("pattern"), str) else []) + list(
            node["patternProperties"] if isinstance(node.get("patternProperties"), dict) else ()
        ):
            problem = _pattern_problem(pattern)
            if problem is not None:
                raise _Refused(problem)
        pattern_properties = pattern_properties or "patternProperties" in node
        unevaluated = unevaluated or "unevaluatedProperties" in node
        for child, same_instance in _subschemas(node):
            if isinstance(child, dict):
                todo.append(child)
                if same_instance:
                    edges.append(child)
    if pattern_properties and unevaluated:
        raise _Refused("unevaluatedProperties together with patternProperties is not supported")
    _refuse_loops(in_place)


def _refuse_loops(edges: dict[int, list[dict[str, Any]]]) -> None:
    """A cycle in the graph of same-instance edges (refs, allOf, not...): validation would never descend, never end.
    Iterative depth-first search (white, grey, black), so a long chain does not exhaust the stack."""
    state: dict[int, int] = {}
    for start in edges:
        if state.get(start):
            continue
        stack: list[tuple[int, Iterator[dict[str, Any]]]] = [(start, iter(edges[start]))]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
            elif state.get(id(child)) == 1:
                raise _Refused("$ref loops back to itself without descending into the value")
            elif not state.get(id(child)):
                state[id(child)] = 1
                stack.append((id(child), iter(edges.get(id(child), ()))))


def _pattern_problem(pattern: str) -> str | None:
    try:
        _regex(pattern)
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        return f"pattern {pattern[:100]!r} is not supported (RE2 syntax: no lookaround, no backreferences): {reason}"
    return None


def _regex_options() -> re2.Options:
    options = re2.Options()
    options.max_mem = MAX_PATTERN_MEMORY
    options.log_errors = False  # a client's bad pattern is its 400, not a line in the processor's log
    return options


_OPTIONS = _regex_options()
_regexes: SizedCache[str, re2._Regexp] = SizedCache(
    lambda p: re2.compile(p, _OPTIONS), lambda p: _PATTERN_COST + len(p), _PATTERN_CACHE
)


def _regex(pattern: str) -> re2._Regexp:
    return _regexes.get(pattern)


# -- applying a schema -------------------------------------------------------------------------------------------


def _re2_pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[jsonschema.ValidationError]:
    if validator.is_type(instance, "string") and not _regex(pattern).search(instance):
        yield jsonschema.ValidationError(f"{instance[:100]!r} does not match {pattern[:100]!r}")


def _re2_pattern_properties(
    validator: Any, patterns: Mapping[str, Any], instance: Any, schema: Any
) -> Iterator[jsonschema.ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        regex = _regex(pattern)
        for key, value in instance.items():
            if regex.search(key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional(instance: Mapping[str, Any], schema: Mapping[str, Any]) -> list[str]:
    properties = schema.get("properties", {})
    patterns = [_regex(p) for p in schema.get("patternProperties", {})]
    return [k for k in instance if k not in properties and not any(r.search(k) for r in patterns)]


def _re2_additional_properties(
    validator: Any, additional: Any, instance: Any, schema: Any
) -> Iterator[jsonschema.ValidationError]:
    """jsonschema's own keyword, with the patterns matched in RE2."""
    if not validator.is_type(instance, "object"):
        return
    extras = _additional(instance, schema)
    if validator.is_type(additional, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], additional, path=extra)
    elif not additional and extras:
        if "patternProperties" in schema:
            verb = "does" if len(extras) == 1 else "do"
            joined = ", ".join(repr(each) for each in sorted(extras))
            patterns = ", ".join(repr(each) for each in sorted(schema["patternProperties"]))
            yield jsonschema.ValidationError(f"{joined} {verb} not match any of the regexes: {patterns}")
        else:
            listed = ", ".join(repr(extra) for extra in extras)
            yield jsonschema.ValidationError(
                f"Additional properties are not allowed ({listed} {'was' if len(extras) == 1 else 'were'} unexpected)"
            )


_RE2_KEYWORDS = {
    "pattern": _re2_pattern,
    "patternProperties": _re2_pattern_properties,
    "additionalProperties": _re2_additional_properties,
}
_classes: dict[type, type] = {}


def _validator(text: str) -> jsonschema.protocols.Validator:
    """A validator for a checked schema: RE2 patterns, and an empty registry (nothing outside the schema)."""
    schema = json.loads(text)
    base = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    cls = _classes.get(base)
    if cls is None:
        cls = _classes[base] = jsonschema.validators.extend(base, _RE2_KEYWORDS)
    return cls(schema, registry=referencing.Registry())


_checks: SizedCache[str, str | None] = SizedCache(_problem, len, _CACHE_BYTES)
_validators: SizedCache[str, jsonschema.protocols.Validator] = SizedCache(_validator, len, _CACHE_BYTES)


def schema_violation(schema: Mapping[str, Any], value: Any) -> str | None:
    """How `value` fails the (checked) `schema`, or None; SchemaFailure if the schema cannot be applied at all.
    One pass over the errors (not `is_valid` then again to describe)."""
    try:
        error = jsonschema.exceptions.best_match(_validators.get(_dumps(schema)).iter_errors(value))
    except (referencing.exceptions.Unresolvable, RecursionError, re2.error) as exc:
        raise SchemaFailure(f"the schema could not be applied: {type(exc).__name__}") from None
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path)
    return f"{error.message}" + (f" (at {where})" if where else "")
