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

__all__ = [
    "ChatRequest",
    "CompletionRequest",
    "Message",
    "ResponsesRequest",
    "StreamOptions",
    "TextPart",
    "decode",
    "parse_chat_request",
    "parse_completion_request",
    "parse_responses_request",
]

MAX_STOP_SEQUENCES = 4  # OpenAI's own limit
MAX_STOP_LENGTH = 256  # characters per stop sequence: ours (OpenAI documents none); the matcher's cost does not grow
# with it, but its automaton is built per request, and no real end-of-answer marker is this long
MAX_TOKENS_LIMIT = 131072  # Shimmy 2.x rejects more; no GGUF we serve has a longer context
I32_MAX = 2**31 - 1  # Shimmy reads top_k as i32 and answers 422 beyond it

Role = Literal["system", "developer", "user", "assistant", "tool"]


class TextPart(msgspec.Struct, tag="text", tag_field="type"):
    """The only content part we accept; any other `type` fails decoding and names the param."""

    text: str


class Message(msgspec.Struct):
    role: Role
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


TokenLimit = Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKENS_LIMIT)]  # OpenAI refuses limits below 1
StopText = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_STOP_LENGTH)]
StopList = Annotated[list[StopText], msgspec.Meta(max_length=MAX_STOP_SEQUENCES)]
Stop = StopText | StopList  # chat's `stop`, also legacy completions'


class ChatRequest(msgspec.Struct):
    model: Annotated[str, msgspec.Meta(min_length=1)]
    messages: Annotated[list[Message], msgspec.Meta(min_length=1)]
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
    # Present only to be refused by name when they ask for something we cannot do.
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
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


class InputMessage(msgspec.Struct):
    """A Responses input item. Only messages: any other item `type` (function calls, reasoning, references)
    fails decoding and names the param."""

    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText | OutputText]
    type: Literal["message"] = "message"

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class TextFormat(msgspec.Struct):
    type: str = "text"


class TextOptions(msgspec.Struct):
    format: TextFormat | None = None


class ResponsesRequest(msgspec.Struct):
    """`POST /v1/responses`, stateless: the whole conversation comes in `input` every time."""

    model: Annotated[str, msgspec.Meta(min_length=1)]
    input: Annotated[str, msgspec.Meta(min_length=1)] | Annotated[list[InputMessage], msgspec.Meta(min_length=1)]
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
    # Refused by name.
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    top_logprobs: int | None = None
    prompt: Any = None

    @property
    def messages(self) -> list[tuple[str, str]]:
        head = [("system", self.instructions)] if self.instructions else []
        if isinstance(self.input, str):
            return [*head, ("user", self.input)]
        return head + [(item.role, item.text()) for item in self.input]


_chat = msgspec.json.Decoder(ChatRequest)
_completion = msgspec.json.Decoder(CompletionRequest)
_responses = msgspec.json.Decoder(ResponsesRequest)
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
        raise InvalidRequest(f"The request body is not valid JSON: {exc}", code="invalid_json") from None


def refuse(unsupported: tuple[tuple[str, bool, str], ...]) -> None:
    """The first (param, refused, message) that is refused, as InvalidRequest naming the param."""
    for param, refused, message in unsupported:
        if refused:
            raise InvalidRequest(message, param=param, code="unsupported_parameter")


def parse_chat_request(body: bytes) -> ChatRequest:
    """Decode and validate, or raise InvalidRequest naming the offending param."""
    request = decode(_chat, body)
    _refuse_unsupported(request)
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
    return request


def parse_responses_request(body: bytes) -> ResponsesRequest:
    request = decode(_responses, body)
    stateless = "the gateway stores no responses (its replicas share no state); send the whole conversation in input"
    refuse(
        (
            ("previous_response_id", request.previous_response_id is not None, f"Not supported: {stateless}"),
            ("conversation", request.conversation is not None, f"Not supported: {stateless}"),
            ("background", bool(request.background), "Background responses are not supported: nothing is stored"),
            ("tools", bool(request.tools), "Tool calling is not supported"),
            ("tool_choice", request.tool_choice not in (None, "none", "auto"), "Tool calling is not supported"),
            ("top_logprobs", bool(request.top_logprobs), "logprobs are not supported"),
            ("prompt", request.prompt is not None, "Stored prompt templates are not supported"),
            (
                "text.format",
                request.text is not None and request.text.format is not None and request.text.format.type != "text",
                "Only text format 'text' is supported",
            ),
        )
    )
    return request


def _refuse_unsupported(request: ChatRequest) -> None:
    unsupported = (
        ("n", request.n is not None and request.n > 1, "Only n=1 is supported"),
        ("tools", bool(request.tools), "Tool calling is not supported"),
        ("tool_choice", request.tool_choice not in (None, "none"), "Tool calling is not supported"),
        ("functions", bool(request.functions), "Function calling is not supported"),
        ("function_call", request.function_call not in (None, "none"), "Function calling is not supported"),
        ("logprobs", bool(request.logprobs), "logprobs are not supported"),
        ("top_logprobs", bool(request.top_logprobs), "logprobs are not supported"),
        ("logit_bias", bool(request.logit_bias), "logit_bias is not supported"),
        ("modalities", request.modalities not in (None, ["text"]), "Only text output is supported"),
        ("audio", request.audio is not None, "Audio output is not supported"),
        (
            "response_format",
            request.response_format is not None and request.response_format.get("type") != "text",
            "Only response_format type 'text' is supported",
        ),
    )
    refuse(unsupported)
    if request.stream_options is not None and not request.stream:
        raise InvalidRequest("stream_options is only allowed with stream=true", param="stream_options")
