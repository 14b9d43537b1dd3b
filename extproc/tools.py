"""Tool calling and structured output on a backend that has neither.

Shimmy's `/api/generate` takes a prompt and gives text: no tools, no grammar, no JSON mode. So the gateway writes
the offered tools (or the JSON schema an answer must satisfy) into the prompt in the convention of the model's
template family, writes earlier calls and their results into the conversation the same way, and reads the model's
text back into calls or a JSON document, validated against their schemas. What the model did not deliver is never
passed off as delivered: `OutputError` (502) says what was missing or invalid.

    family   tools offered in the system turn          a call looks like                   a result goes in
    chatml   <tools>...</tools> (Hermes, Qwen 2.5)     <tool_call>{"name", "arguments"}    user turn, <tool_response>
    llama3   JSON function list (Llama 3.1)            {"name", "parameters"}              `ipython` turn
    phi3     JSON function list (no tool tokens)       {"name", "arguments"}               user turn, <tool_response>
    gemma    JSON function list (no tool tokens)       {"name", "arguments"}               user turn, <tool_response>

Whatever the family, the parser also accepts a bare JSON call object (`arguments` or `parameters`), a list of
them, or either inside a ```json fence: small models emit these whatever they were shown.

Prose is never eaten: output that is not a complete call is the answer's text, unless it begins a call in one of
these syntaxes (`<tool_call>`, `<|python_tag|>`, `{"name"`, `[{"name"`) and does not finish it (an
`invalid_tool_call`), or the request requires a call (`missing_tool_call`). `[1] The answer is 42.` is text.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol

import lark
import msgspec
import re2

from extproc.errors import UpstreamError
from extproc.schemas import SchemaFailure, schema_violation

__all__ = [
    "CUSTOM_INPUT",
    "NO_TOOLING",
    "CallDetector",
    "Grammar",
    "OutputError",
    "Parsed",
    "Tool",
    "ToolCall",
    "Tooling",
    "call_id",
    "check_grammar",
    "custom_tool",
    "parse_output",
    "to_turns",
]

_NO_PARAMETERS: Mapping[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=lambda: _NO_PARAMETERS)
    grammar: Grammar | None = None  # a custom tool's: its one `input` argument must match it


@dataclass(frozen=True, slots=True)
class Grammar:
    """A custom tool's input format (OpenAI Responses): a `lark` grammar (its `start` rule) or a `regex` the whole
    input must match."""

    syntax: str  # "lark" or "regex"
    definition: str


CUSTOM_INPUT = "input"  # the one argument a custom tool is offered with: its free-form (or grammar-bound) text


def custom_tool(name: str, description: str, grammar: Grammar | None) -> Tool:
    """A custom tool (free-form text input) as the prompt conventions know tools: a function whose one string
    argument is the input; the grammar, if any, is shown in its description and checked on the call."""
    about = "The tool's input, free-form text."
    if grammar is not None:
        about = f"The tool's input: text matching this {grammar.syntax} grammar exactly:\n{grammar.definition}"
    parameters = {"type": "object", "properties": {CUSTOM_INPUT: {"type": "string", "description": about}},
                  "required": [CUSTOM_INPUT], "additionalProperties": False}
    return Tool(name, description, parameters, grammar)


def _re2_options() -> re2.Options:
    options = re2.Options()
    options.max_mem = 8 << 20  # a client's regex compiles within bounded memory
    options.log_errors = False  # a client's bad regex is its 400, not a line in the processor's log
    return options


_RE2 = _re2_options()


def check_grammar(grammar: Grammar) -> str | None:
    """Why `grammar` cannot be checked here, or None (cached by its text: agents resend their tools)."""
    return _compiled(grammar.syntax, grammar.definition)[1]


@lru_cache(maxsize=64)
def _compiled(syntax: str, definition: str) -> tuple[Any, str | None]:
    """(the compiled grammar, None) or (None, why not). Lark's Earley parser takes any context-free lark grammar;
    a regex runs in RE2 (linear time, as a schema's `pattern` does: extproc/schemas.py), and one RE2 cannot compile
    (lookaround, backreferences) is refused."""
    if syntax == "regex":
        try:
            return re2.compile(definition, _RE2), None
        except re2.error as exc:
            reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
            return None, f"a regex the gateway cannot check (RE2 syntax: no lookaround, no backreferences): {reason}"
    try:
        return lark.Lark(definition, start="start", parser="earley"), None
    except lark.exceptions.LarkError as exc:
        return None, f"a lark grammar the gateway cannot check: {str(exc).strip()[:300]}"


def _grammar_violation(grammar: Grammar, text: str) -> str | None:
    compiled, _ = _compiled(grammar.syntax, grammar.definition)
    if grammar.syntax == "regex":
        return None if compiled.fullmatch(text) else "it does not match the regex"
    try:
        compiled.parse(text)
    except lark.exceptions.LarkError as exc:
        return str(exc).strip().splitlines()[0][:200]
    return None


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, as text: every API sends it so or re-decodes it


@dataclass(frozen=True, slots=True)
class Tooling:
    """What the client offered and demands: tools and how they must be used, or a schema the answer must meet."""

    tools: tuple[Tool, ...] = ()
    choice: str = "auto"  # "auto", "required", "none", or the name of the one tool that must be called
    parallel: bool = True  # several calls in one answer allowed
    schema: Mapping[str, Any] | None = None  # structured output: the answer is JSON meeting it ({}: any object)

    @property
    def calls_allowed(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    @property
    def offered(self) -> tuple[Tool, ...]:
        """The tools the prompt shows: a named choice shows only that tool, `none` shows none."""
        if not self.calls_allowed:
            return ()
        if self.choice in ("auto", "required"):
            return self.tools
        return tuple(t for t in self.tools if t.name == self.choice)

    @property
    def active(self) -> bool:
        """The output must be read back (calls or a schema), not only relayed as text."""
        return self.calls_allowed or self.schema is not None


NO_TOOLING = Tooling()


class OutputError(UpstreamError):
    """The model's output did not deliver what the request demands (a call, a valid call, valid JSON)."""


def call_id() -> str:
    """Fresh, unique, not secret (as the processor's completion ids)."""
    return f"call_{random.getrandbits(96):024x}"


# -- into the prompt ---------------------------------------------------------------------------------------------


def _function(tool: Tool) -> dict[str, Any]:
    return {"name": tool.name, "description": tool.description, "parameters": dict(tool.parameters)}


def _dumps(value: object) -> str:
    """Compact JSON, as OpenAI sends arguments (and a cache key); msgspec is several times faster than json."""
    return msgspec.json.encode(value).decode()


def _prompt_json(value: object) -> str:
    """JSON as the families' own templates print it (`tojson`: `, ` and `: `), so the prompt looks familiar."""
    return json.dumps(value, ensure_ascii=False)


def _instructions(family: str, tooling: Tooling) -> str:
    parts: list[str] = []
    offered = tooling.offered
    if offered:
        if family == "chatml":
            listed = "\n".join(_prompt_json({"type": "function", "function": _function(t)}) for t in offered)
            parts.append(
                "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n"
                f"<tools>\n{listed}\n</tools>\n\n"
                "For each function call, return a json object with function name and arguments within "
                "<tool_call></tool_call> XML tags:\n<tool_call>\n"
                '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
            )
        else:
            key = "parameters" if family == "llama3" else "arguments"
            listed = "\n\n".join(_prompt_json({"type": "function", "function": _function(t)}) for t in offered)
            parts.append(
                "You have access to the following functions. To call a function, respond with only a JSON object "
                f'in the format {{"name": function name, "{key}": dictionary of argument name and its value}}'
                + ("; to call several, a JSON list of such objects" if tooling.parallel else "")
                + ". Do not use variables. If no function fits, answer normally.\n\n"
                + listed
            )
        if tooling.choice == "required":
            parts.append("You must call at least one of these functions.")
        elif tooling.choice not in ("auto", "none"):
            parts.append(f'You must call the function "{tooling.choice}".')
        if not tooling.parallel:
            parts.append("Call at most one function.")
    if tooling.schema is not None:
        schema = f" that conforms to this JSON schema:\n{_prompt_json(tooling.schema)}" if tooling.schema else ""
        parts.append(f"Respond only with a JSON object{schema}\nNo prose, no code fence.")
    return "\n\n".join(parts)


def _render_calls(family: str, calls: Sequence[ToolCall]) -> str:
    key = "parameters" if family == "llama3" else "arguments"
    rendered = [f'{{"name": {_prompt_json(c.name)}, "{key}": {c.arguments}}}' for c in calls]
    if family == "chatml":
        return "\n".join(f"<tool_call>\n{call}\n</tool_call>" for call in rendered)
    return rendered[0] if len(rendered) == 1 else "[" + ", ".join(rendered) + "]"


class Turn(Protocol):
    """What `to_turns` reads of a conversation turn (`extproc.generation.Message`, whose module imports this one)."""

    @property
    def role(self) -> str: ...
    @property
    def text(self) -> str: ...
    @property
    def tool_calls(self) -> tuple[ToolCall, ...]: ...


def to_turns(family: str, messages: Sequence[Turn], tooling: Tooling) -> list[tuple[str, str]]:
    """Messages with tool calls and results -> plain (role, text) turns for the template, instructions included.

    The instructions open the first system turn (or become one); `tool_choice: none` adds none, but earlier calls
    and results stay in the conversation, since they happened.
    """
    turns: list[tuple[str, str]] = []
    for m in messages:
        if m.tool_calls:
            calls = _render_calls(family, m.tool_calls)
            turns.append((m.role, f"{m.text}\n{calls}" if m.text else calls))
        elif m.role == "tool" and family != "llama3":
            turns.append(("tool", f"<tool_response>\n{m.text}\n</tool_response>"))
        else:
            turns.append((m.role, m.text))
    instructions = _instructions(family, tooling)
    if instructions:
        if turns and turns[0][0] in ("system", "developer"):
            turns[0] = (turns[0][0], f"{turns[0][1]}\n\n{instructions}" if turns[0][1] else instructions)
        else:
            turns.insert(0, ("system", instructions))
    return turns


# -- out of the output -------------------------------------------------------------------------------------------

_NATIVE_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
_FENCE = re.compile(r"```(?:json|tool_call|tool_code)?\s*\n?(.*?)\s*(?:```|$)", re.S)
_PYTHON_TAG = "<|python_tag|>"
# Where a bare JSON call may start after prose ("Sure! {"name": ...}"), as small models write it.
_JSON_OPENERS = ('{"name"', '{ "name"', '[{"name"', '[{ "name"')
# What may begin a call in a stream: text after one of these is held until the end and parsed.
_OPENERS = ("<tool_call>", "```", _PYTHON_TAG, *_JSON_OPENERS)
# The output begins a JSON call: a failure to decode it is a broken call, not prose.
_CALL_START = re.compile(r'\[?\s*\{\s*"name"\s*:')
# How an answer that is a call may begin, whitespace removed: a stream holds text back only while its start is one
# of these or could still become one (`{"` may be a call with any key first; `{x` or `[1` is prose).
_HELD_STARTS = ('{"', '[{"', "<tool_call>", _PYTHON_TAG, "```")
_RAW_DECODE = json.JSONDecoder().raw_decode


@dataclass(frozen=True, slots=True)
class Parsed:
    text: str  # the answer's content: prose around the calls, or the JSON document of a structured answer
    calls: tuple[ToolCall, ...] = ()


def _decode(candidate: str) -> Any:
    try:
        return json.loads(candidate)
    except ValueError:
        return None


def _as_calls(value: Any) -> list[tuple[str, Any]] | None:
    """(name, arguments) pairs if `value` is a call object or a non-empty list of them."""
    items = value if isinstance(value, list) and value else [value]
    out = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        if "arguments" in item:
            arguments = item["arguments"]
        elif "parameters" in item:
            arguments = item["parameters"]
        else:
            return None
        if isinstance(arguments, str):  # some models send the arguments as a JSON string, as OpenAI does
            arguments = _decode(arguments)
        out.append((item["name"], arguments))
    return out


def _find_calls(output: str) -> tuple[str, list[tuple[str, Any]]] | None:
    """(prose, calls) if the output holds call markup in any accepted form; None if it holds none."""
    native = _NATIVE_CALL.findall(output)
    if native:
        calls = []
        for block in native:
            found = _as_calls(_decode(block))
            if found is None:
                raise OutputError(f"The model wrote a tool call that is not valid JSON: {block[:200]!r}",
                                  code="invalid_tool_call")
            calls += found
        return _NATIVE_CALL.sub("", output).strip(), calls
    stripped = output.strip().removeprefix(_PYTHON_TAG).strip()
    decoded = _decode(stripped) if stripped[:1] in ("{", "[") else None
    whole = _as_calls(decoded) if decoded is not None else None
    if whole is not None:
        return "", whole
    for match in _FENCE.finditer(output):
        found = _as_calls(_decode(match.group(1)))
        if found is not None:
            return (output[: match.start()] + output[match.end() :]).strip(), found
    for start in sorted(i for i in (output.find(o) for o in _JSON_OPENERS) if i > 0):
        try:
            value, end = _RAW_DECODE(output, start)
        except ValueError:
            raise OutputError(f"The model's tool call is not valid JSON: {output[start:start + 200]!r}",
                              code="invalid_tool_call") from None
        found = _as_calls(value)
        if found is not None:
            return (output[:start] + output[end:]).strip(), found
    if decoded is None and (_CALL_START.match(stripped) or output.lstrip().startswith(_PYTHON_TAG)):
        # it set out to write a call and did not finish one
        raise OutputError(f"The model's tool call is not valid JSON: {stripped[:200]!r}", code="invalid_tool_call")
    return None


def _violation(schema: Mapping[str, Any], value: Any, code: str) -> str | None:
    """`schema_violation`, a schema that cannot be applied being the model's failure to deliver (502, `code`)."""
    try:
        return schema_violation(schema, value)
    except SchemaFailure as exc:
        raise OutputError(f"The model's output could not be checked: {exc}", code=code) from None


def _structured(output: str, schema: Mapping[str, Any]) -> Parsed:
    stripped = output.strip()
    fenced = _FENCE.search(stripped) if not stripped.startswith(("{", "[")) else None
    document = fenced.group(1) if fenced else stripped
    value = _decode(document)
    if not isinstance(value, dict):
        raise OutputError(f"The model's answer is not a JSON object: {stripped[:200]!r}", code="invalid_json_output")
    problem = _violation(schema, value, "invalid_json_output") if schema else None
    if problem is not None:
        raise OutputError(f"The model's JSON does not match the schema: {problem}", code="invalid_json_output")
    return Parsed(_dumps(value))


def parse_output(output: str, tooling: Tooling) -> Parsed:
    """The model's whole output -> content and calls, or OutputError if it fails what the request demands."""
    if tooling.calls_allowed:
        found = _find_calls(output)
        if found is not None:
            prose, raw = found
            by_name = {t.name: t for t in tooling.offered}
            if not tooling.parallel and len(raw) > 1:
                raise OutputError(f"The model made {len(raw)} tool calls; parallel_tool_calls is false",
                                  code="invalid_tool_call")
            calls = []
            for name, arguments in raw:
                tool = by_name.get(name)
                if tool is None:
                    raise OutputError(f"The model called a tool that was not offered: {name!r}",
                                      code="invalid_tool_call")
                if not isinstance(arguments, dict):
                    raise OutputError(f"The model's arguments for {name!r} are not a JSON object",
                                      code="invalid_tool_call")
                problem = _violation(tool.parameters, arguments, "invalid_tool_call")
                if problem is not None:
                    raise OutputError(f"The model's arguments for {name!r} do not match its schema: {problem}",
                                      code="invalid_tool_call")
                problem = _grammar_violation(tool.grammar, arguments[CUSTOM_INPUT]) if tool.grammar else None
                if problem is not None:
                    raise OutputError(f"The model's input for {name!r} does not match its grammar: {problem}",
                                      code="invalid_tool_call")
                calls.append(ToolCall(call_id(), name, _dumps(arguments)))
            return Parsed(prose, tuple(calls))
        if tooling.choice != "auto":
            wanted = "a tool call" if tooling.choice == "required" else f"a call to {tooling.choice!r}"
            raise OutputError(f"tool_choice requires {wanted}, and the model answered without one",
                              code="missing_tool_call")
    if tooling.schema is not None:
        return _structured(output, tooling.schema)
    return Parsed(output)


def _may_start_call(text: str) -> bool | None:
    """Whether text (stripped, non-empty) begins as a call would: True, False, or None while too short to tell."""
    compact = "".join(text[:32].split())
    if any(compact.startswith(s) for s in _HELD_STARTS):
        return True
    if any(s.startswith(compact) for s in _HELD_STARTS) and len(text) < 32:
        return None
    return False


class CallDetector:
    """A stream's text, released as it comes until a tool call (or a structured answer) may be starting; from
    there on it is held, to be parsed whole at the end, so a client never sees half a call as text.

    A call may start where the text starts as a call does (`{"`, `[{"`, `<tool_call>`, `<|python_tag|>`, a code
    fence), or wherever a call opener appears later; a structured answer is held whole. Text whose start can no
    longer become a call (`[1] The answer`) is released; the held-back tail is at most an opener's length.
    """

    __slots__ = ("_held", "_holding", "_started")

    def __init__(self, tooling: Tooling) -> None:
        self._held = ""
        self._holding = tooling.schema is not None and not tooling.calls_allowed
        self._started = False  # some non-space text has been seen

    def feed(self, text: str) -> str:
        """Text that may go to the client now."""
        buf = self._held + text
        if self._holding:
            self._held = buf
            return ""
        if not self._started:
            stripped = buf.lstrip()
            if not stripped:
                self._held = buf
                return ""
            start = _may_start_call(stripped)
            if start is None:  # too short to tell yet
                self._held = buf
                return ""
            self._started = True
            if start:
                self._holding = True
                self._held = buf
                return ""
        cut = min((i for i in (buf.find(o) for o in _OPENERS) if i >= 0), default=-1)
        if cut >= 0:
            self._holding = True
            self._held = buf[cut:]
            return buf[:cut]
        keep = max((n for o in _OPENERS for n in range(1, len(o)) if buf.endswith(o[:n])), default=0)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def finish(self) -> str:
        """The held text, for `parse_output` (or to release as text if it holds no call)."""
        held, self._held = self._held, ""
        return held

    @property
    def holding(self) -> bool:
        return self._holding
