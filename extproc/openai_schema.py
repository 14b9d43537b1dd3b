"""The OpenAI requests (chat completions, legacy completions, Responses), decoded and validated in one msgspec pass.

msgspec checks types, ranges and the closed sets (roles, content-part types) in C while it decodes, and its
error says where (`... - at $.messages[0].role`), which becomes the error's `param` (`decode`, which the
Anthropic adapter uses too). What msgspec cannot express (parameters we accept but cannot honour) is checked
after decoding, in each `parse_*_request`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from extproc.errors import InvalidRequest
from extproc.schemas import check_schemas
from extproc.stops import MAX_STOP_LENGTH, MAX_STOP_SEQUENCES, check_stops
from extproc.tools import Grammar, check_grammar

__all__ = [
    "ChatRequest",
    "CompactRequest",
    "CompletionRequest",
    "InputItem",
    "JsonObjectFormat",
    "JsonSchemaFormat",
    "Message",
    "NamedToolChoice",
    "ResponsesNamedChoice",
    "ResponsesRequest",
    "StreamOptions",
    "TextPart",
    "decode",
    "parse_chat_request",
    "parse_compact_request",
    "parse_completion_request",
    "parse_responses_request",
]

MAX_TOOLS = 128  # OpenAI's own limit; Messages uses it too
MAX_MESSAGES = 4096  # messages (Responses: input items) per request, on every API: each costs the prompt's rendering
MAX_CONTENT_PARTS = 1024  # content parts (Messages: blocks) per message
MAX_TOKENS_LIMIT = 131072  # Shimmy 2.x rejects more; no GGUF we serve has a longer context
I32_MAX = 2**31 - 1  # Shimmy reads top_k as i32 and answers 422 beyond it

Role = Literal["system", "developer", "user", "assistant", "tool"]


class TextPart(msgspec.Struct, tag="text", tag_field="type"):
    """The only content part we accept; any other `type` fails decoding and names the param."""

    text: str


class FunctionCall(msgspec.Struct):
    name: Annotated[str, msgspec.Meta(min_length=1)]
    arguments: str  # a JSON object as text, as OpenAI sends it back in a history


class ToolCallItem(msgspec.Struct):
    """An earlier call in an assistant message of the history."""

    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class Message(msgspec.Struct):
    role: Role
    content: str | Annotated[list[TextPart], msgspec.Meta(max_length=MAX_CONTENT_PARTS)] | None = None  # null (or
    # absent) only in an assistant message with tool_calls
    tool_calls: list[ToolCallItem] | None = None  # assistant messages only
    tool_call_id: str | None = None  # tool messages: the call this is the result of
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


ToolName = Annotated[str, msgspec.Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]  # OpenAI's rule for function names


class FunctionDefinition(msgspec.Struct):
    name: ToolName
    description: str = ""
    parameters: dict[str, Any] | None = None  # a JSON Schema; absent means no parameters
    strict: bool | None = None  # accepted: arguments are always validated against `parameters`


class ToolDefinition(msgspec.Struct):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(msgspec.Struct):
    name: ToolName


class NamedToolChoice(msgspec.Struct):
    type: Literal["function"]
    function: NamedFunction


class TextFormat(msgspec.Struct, tag="text", tag_field="type"):
    pass


class JsonObjectFormat(msgspec.Struct, tag="json_object", tag_field="type"):
    pass


class JsonSchemaSpec(msgspec.Struct):
    name: Annotated[str, msgspec.Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    schema: dict[str, Any] | None = None  # absent: any JSON object
    description: str = ""
    strict: bool | None = None  # accepted: the output is always validated against `schema`


class JsonSchemaFormat(msgspec.Struct, tag="json_schema", tag_field="type"):
    json_schema: JsonSchemaSpec


ResponseFormat = TextFormat | JsonObjectFormat | JsonSchemaFormat


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


TokenLimit = Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKENS_LIMIT)]  # OpenAI refuses limits below 1
StopText = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_STOP_LENGTH)]
StopList = Annotated[list[StopText], msgspec.Meta(max_length=MAX_STOP_SEQUENCES)]
Stop = StopText | StopList  # chat's `stop`, also legacy completions' (their total: `check_stops`)


class ChatRequest(msgspec.Struct):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    messages: Annotated[list[Message], msgspec.Meta(min_length=1, max_length=MAX_MESSAGES)]
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: TokenLimit | None = None
    max_completion_tokens: TokenLimit | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    top_k: Annotated[int, msgspec.Meta(ge=1, le=I32_MAX)] | None = None  # not OpenAI's; llama.cpp users send it
    stop: Stop | None = None
    n: Annotated[int, msgspec.Meta(ge=1)] | None = None
    # Accepted and ignored: Shimmy's /api/generate has no such knobs (README lists what is honoured).
    seed: int | None = None
    user: str | None = None
    presence_penalty: Annotated[float, msgspec.Meta(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, msgspec.Meta(ge=-2, le=2)] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    tools: Annotated[list[ToolDefinition], msgspec.Meta(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    # Present only to be refused by name when they ask for something we cannot do.
    functions: list[Any] | None = None
    function_call: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    modalities: list[str] | None = None
    audio: Any = None

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(msgspec.Struct):
    """Legacy `POST /v1/completions`: one raw prompt, sent to Shimmy untemplated."""

    model: Annotated[str, msgspec.Meta(min_length=1)]
    prompt: str | Annotated[list[str], msgspec.Meta(min_length=1, max_length=1)]
    max_tokens: TokenLimit = 16  # OpenAI's default for this endpoint
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    top_k: Annotated[int, msgspec.Meta(ge=1, le=I32_MAX)] | None = None
    stop: Stop | None = None
    # Accepted and ignored, as in chat.
    seed: int | None = None
    user: str | None = None
    presence_penalty: Annotated[float, msgspec.Meta(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, msgspec.Meta(ge=-2, le=2)] | None = None
    # Refused by name when they ask for more than one plain completion of the prompt.
    n: Annotated[int, msgspec.Meta(ge=1)] | None = None
    best_of: Annotated[int, msgspec.Meta(ge=1)] | None = None
    echo: bool | None = None
    suffix: str | None = None
    logprobs: Annotated[int, msgspec.Meta(ge=0)] | None = None
    logit_bias: dict[str, float] | None = None

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class InputText(msgspec.Struct, tag="input_text", tag_field="type"):
    text: str


class OutputText(msgspec.Struct, tag="output_text", tag_field="type"):
    """An earlier answer sent back as context (the client's own copy: the gateway stores none)."""

    text: str


STATELESS = "the gateway stores no responses (its replicas share no state); send the whole conversation in input"


class InputItem(msgspec.Struct, kw_only=True):
    """A Responses input item: a message (`type` may be left out), an earlier `function_call`, or its
    `function_call_output`, or a `compaction` item (`/v1/responses/compact`'s summary). One struct for all, because
    a message item may come without its `type` tag; `check()` then requires each type's own fields. An
    `item_reference` is refused with the stateless reason; other item types (reasoning...) fail by name."""

    type: Literal["message", "function_call", "function_call_output", "custom_tool_call", "custom_tool_call_output",
                  "compaction", "item_reference"] = "message"
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | Annotated[list[InputText | OutputText], msgspec.Meta(max_length=MAX_CONTENT_PARTS)] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | Annotated[list[InputText | OutputText], msgspec.Meta(max_length=MAX_CONTENT_PARTS)] | None = None
    input: str | None = None  # a custom tool call's
    encrypted_content: str | None = None  # a compaction item's summary (plain text: see extproc/apis/responses.py)
    id: str | None = None  # accepted: an earlier output item's own id
    status: str | None = None

    def check(self, i: int) -> None:
        if self.type == "item_reference":
            raise InvalidRequest(f"Item references are not supported: {STATELESS}", param=f"input[{i}]",
                                 code="unsupported_parameter")
        needs = {"message": ("role", "content"), "function_call": ("call_id", "name", "arguments"),
                 "function_call_output": ("call_id", "output"), "custom_tool_call": ("call_id", "name", "input"),
                 "custom_tool_call_output": ("call_id", "output"), "compaction": ("encrypted_content",)}[self.type]
        for field in needs:
            if getattr(self, field) is None:
                raise InvalidRequest(f"A {self.type} item needs {field}", param=f"input[{i}].{field}")

    def text(self) -> str:
        content = self.output if self.type.endswith("_output") else self.content
        if content is None or isinstance(content, str):
            return content or ""
        return "".join(part.text for part in content)


MAX_GRAMMAR_CHARS = 65536  # a custom tool's grammar: ours (OpenAI documents none); it is compiled per request


class CustomToolFormat(msgspec.Struct):
    """A custom tool's input format: free-form `text`, or a `grammar` (`lark` or `regex`) the input must match."""

    type: Literal["text", "grammar"] = "text"
    syntax: Literal["lark", "regex"] | None = None
    definition: Annotated[str, msgspec.Meta(max_length=MAX_GRAMMAR_CHARS)] | None = None


class ResponsesTool(msgspec.Struct):
    """A `function` tool (JSON arguments against `parameters`) or a `custom` one (one text input, free-form or
    bound by `format`'s grammar). Built-in tools (web search, file search, computer use...) fail by name."""

    type: Literal["function", "custom"]
    name: ToolName
    description: str = ""
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # accepted: arguments are always validated against `parameters`
    format: CustomToolFormat | None = None  # custom tools only


class ResponsesNamedChoice(msgspec.Struct):
    type: Literal["function", "custom"]
    name: ToolName


class ResponsesTextFormat(msgspec.Struct):
    """Responses' `text.format`: text, json_object, or json_schema with the schema inline."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None  # accepted: the output is always validated against `schema`
    description: str | None = None


class TextOptions(msgspec.Struct):
    format: ResponsesTextFormat | None = None
    verbosity: str | None = None  # accepted without effect


ResponsesInput = (
    Annotated[str, msgspec.Meta(min_length=1)]
    | Annotated[list[InputItem], msgspec.Meta(min_length=1, max_length=MAX_MESSAGES)]
)


class ResponsesRequest(msgspec.Struct):
    """`POST /v1/responses`, stateless: the whole conversation comes in `input` every time."""

    model: Annotated[str, msgspec.Meta(min_length=1)]
    input: ResponsesInput
    instructions: str | None = None
    max_output_tokens: TokenLimit | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    stream: bool | None = None
    # Accepted without effect (docs/apis.md): nothing is stored, there is no reasoning to configure.
    store: bool | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    parallel_tool_calls: bool | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    stream_options: dict[str, Any] | None = None
    text: TextOptions | None = None
    tools: Annotated[list[ResponsesTool], msgspec.Meta(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | ResponsesNamedChoice | None = None
    # Refused by name.
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None
    top_logprobs: int | None = None
    prompt: Any = None


class CompactRequest(msgspec.Struct):
    """`POST /v1/responses/compact`, stateless: the conversation to compact comes whole in `input`."""

    model: Annotated[str, msgspec.Meta(min_length=1)]
    input: ResponsesInput | None = None
    instructions: str | None = None
    # Accepted without effect: there is no prompt cache, and one service tier.
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    service_tier: str | None = None
    # Refused by name.
    previous_response_id: str | None = None


_chat = msgspec.json.Decoder(ChatRequest)
_completion = msgspec.json.Decoder(CompletionRequest)
_responses = msgspec.json.Decoder(ResponsesRequest)
_compact = msgspec.json.Decoder(CompactRequest)
_AT = re.compile(r" - at `\$\.?(?P<path>[^`]*)`$")
_MISSING = re.compile(r"Object missing required field `(?P<field>[^`]+)`")

T = TypeVar("T")


def _param_of(message: str) -> tuple[str, str | None]:
    """Split msgspec's message into (text, OpenAI param path)."""
    match = _AT.search(message)
    path = match["path"] if match else None
    text = message[: match.start()] if match else message
    missing = _MISSING.search(text)
    if missing:
        path = f"{path}.{missing['field']}" if path else missing["field"]
    return text, path or None


def decode(decoder: msgspec.json.Decoder[T], body: bytes) -> T:
    """Decode and validate any API's request, or raise InvalidRequest naming the offending param."""
    try:
        return decoder.decode(body)
    except UnicodeDecodeError:
        raise InvalidRequest("The request body is not valid UTF-8", code="invalid_encoding") from None
    except RecursionError:  # msgspec decodes nested JSON recursively; a hostile body can nest thousands deep
        raise InvalidRequest("The request body is nested too deeply", code="invalid_json") from None
    except msgspec.ValidationError as exc:
        text, param = _param_of(str(exc))
        raise InvalidRequest(f"Invalid request: {text}", param=param) from None
    except msgspec.DecodeError as exc:
        if not _is_utf8(body):  # msgspec 0.23 reports bad UTF-8 as a DecodeError, 0.19 as a UnicodeDecodeError
            raise InvalidRequest("The request body is not valid UTF-8", code="invalid_encoding") from None
        raise InvalidRequest(f"The request body is not valid JSON: {exc}", code="invalid_json") from None


def _is_utf8(body: bytes) -> bool:
    try:
        body.decode()
    except UnicodeDecodeError:
        return False
    return True


def refuse(unsupported: tuple[tuple[str, bool, str], ...]) -> None:
    """The first (param, refused, message) that is refused, as InvalidRequest naming the param."""
    for param, refused, message in unsupported:
        if refused:
            raise InvalidRequest(message, param=param, code="unsupported_parameter")


def parse_chat_request(body: bytes) -> ChatRequest:
    """Decode and validate, or raise InvalidRequest naming the offending param."""
    request = decode(_chat, body)
    _refuse_unsupported(request)
    check_stops(request.stop_sequences, "stop")
    return request


def parse_completion_request(body: bytes) -> CompletionRequest:
    request = decode(_completion, body)
    refuse(
        (
            ("n", request.n is not None and request.n > 1, "Only n=1 is supported"),
            ("best_of", request.best_of is not None and request.best_of > 1, "Only best_of=1 is supported"),
            ("echo", bool(request.echo), "echo is not supported"),
            ("suffix", bool(request.suffix), "suffix (insertion) is not supported"),
            ("logprobs", request.logprobs is not None, "logprobs are not supported"),
            ("logit_bias", bool(request.logit_bias), "logit_bias is not supported"),
        )
    )
    if request.stream_options is not None and not request.stream:
        raise InvalidRequest("stream_options is only allowed with stream=true", param="stream_options")
    check_stops(request.stop_sequences, "stop")
    return request


def parse_responses_request(body: bytes) -> ResponsesRequest:
    request = decode(_responses, body)
    refuse(
        (
            ("previous_response_id", request.previous_response_id is not None, f"Not supported: {STATELESS}"),
            ("conversation", request.conversation is not None, f"Not supported: {STATELESS}"),
            ("background", bool(request.background), "Background responses are not supported: nothing is stored"),
            ("top_logprobs", bool(request.top_logprobs), "logprobs are not supported"),
            ("prompt", request.prompt is not None, "Stored prompt templates are not supported"),
        )
    )
    _check_responses_tools(request)
    return request


def parse_compact_request(body: bytes) -> CompactRequest:
    request = decode(_compact, body)
    refuse((("previous_response_id", request.previous_response_id is not None, f"Not supported: {STATELESS}"),))
    if request.input is None:
        raise InvalidRequest(f"input is required: there is nothing stored to compact ({STATELESS})", param="input")
    for i, item in enumerate(request.input if isinstance(request.input, list) else ()):
        item.check(i)
    return request


def _check_responses_tools(request: ResponsesRequest) -> None:
    """As chat's `_check_tools`, in Responses' field names; and each input item has its type's fields."""
    choice = request.tool_choice
    _check_offer(
        [t.name for t in request.tools or ()],
        choice.name if isinstance(choice, ResponsesNamedChoice) else None,
        choice == "required",
    )
    for i, tool in enumerate(request.tools or ()):
        custom = tool.format if tool.type == "custom" else None
        if custom is not None and custom.type == "grammar":
            if custom.syntax is None or custom.definition is None:
                raise InvalidRequest("A grammar format needs syntax and definition", param=f"tools[{i}].format")
            problem = check_grammar(Grammar(custom.syntax, custom.definition))
            if problem is not None:
                raise InvalidRequest(f"Unsupported grammar: {problem}", param=f"tools[{i}].format.definition")
    fmt = request.text.format if request.text is not None else None
    if fmt is not None and fmt.type == "json_schema" and (fmt.schema is None or not fmt.name):
        raise InvalidRequest("A json_schema format needs name and schema", param="text.format")
    check_schemas(
        [(f"tools[{i}].parameters", t.parameters) for i, t in enumerate(request.tools or ())]
        + [("text.format.schema", fmt.schema if fmt is not None and fmt.type == "json_schema" else None)]
    )
    for i, item in enumerate(request.input if isinstance(request.input, list) else ()):
        item.check(i)


def _refuse_unsupported(request: ChatRequest) -> None:
    unsupported = (
        ("n", request.n is not None and request.n > 1, "Only n=1 is supported"),
        ("functions", bool(request.functions), "The deprecated functions parameter is not supported; use tools"),
        (
            "function_call",
            request.function_call not in (None, "none"),
            "The deprecated function_call parameter is not supported; use tool_choice",
        ),
        ("logprobs", bool(request.logprobs), "logprobs are not supported"),
        ("top_logprobs", bool(request.top_logprobs), "logprobs are not supported"),
        ("logit_bias", bool(request.logit_bias), "logit_bias is not supported"),
        ("modalities", request.modalities not in (None, ["text"]), "Only text output is supported"),
        ("audio", request.audio is not None, "Audio output is not supported"),
    )
    refuse(unsupported)
    if request.stream_options is not None and not request.stream:
        raise InvalidRequest("stream_options is only allowed with stream=true", param="stream_options")
    _check_tools(request)


def _check_offer(names: list[str], named: str | None, required: bool) -> None:
    """An OpenAI tool offer (chat and Responses name its fields apart, check them alike): unique names, a `named`
    tool_choice among the tools, `required` with tools. The schemas: `check_schemas`, with the output format's."""
    if len(set(names)) != len(names):
        raise InvalidRequest("Tool names must be unique", param="tools")
    if named is not None and named not in names:
        raise InvalidRequest(f"tool_choice names {named!r}, which is not in tools", param="tool_choice")
    if required and not names:
        raise InvalidRequest("tool_choice 'required' needs tools", param="tool_choice")


def _check_tools(request: ChatRequest) -> None:
    """What msgspec cannot see: tool_choice names an offered tool, schemas are schemas, histories are coherent."""
    choice = request.tool_choice
    _check_offer(
        [t.function.name for t in request.tools or ()],
        choice.function.name if isinstance(choice, NamedToolChoice) else None,
        choice == "required",
    )
    fmt = request.response_format
    output = fmt.json_schema.schema if isinstance(fmt, JsonSchemaFormat) else None
    check_schemas(
        [(f"tools[{i}].function.parameters", t.function.parameters) for i, t in enumerate(request.tools or ())]
        + [("response_format.json_schema.schema", output)]
    )
    for i, m in enumerate(request.messages):
        if m.tool_calls and m.role != "assistant":
            raise InvalidRequest("Only assistant messages carry tool_calls", param=f"messages[{i}].tool_calls")
        if m.content is None and not m.tool_calls:
            raise InvalidRequest("Message content is required", param=f"messages[{i}].content")
        if m.role == "tool" and not m.tool_call_id:
            raise InvalidRequest("A tool message needs tool_call_id", param=f"messages[{i}].tool_call_id")
