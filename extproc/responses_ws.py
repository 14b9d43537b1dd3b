"""Responses WebSocket mode: `GET /v1/responses` with `Upgrade: websocket`, several turns on one connection.

Envoy checks the API key on the upgrade and routes it here (a unix socket of the first processor worker). Each
client message `{"type": "response.create", ...}` carries a Responses create body (`stream` implied) and is one
turn; turns run one at a time, in order. A turn is the gateway's own `POST /v1/responses` with `stream: true`,
sent to Envoy on loopback, so admission, limits, stops, metrics and the access log treat it as any request; each
event of that stream is relayed as one text message, unchanged but for `previous_response_id`, which names the
response the turn continued. A refusal (a 400, 429...) becomes an `error` event with its `status`; the connection
stays open.

The state kept per connection is the last finished response (completed or incomplete): its id, and its whole
conversation (the input it ran on, previous turns included, then its output items) as Responses input items. A
`previous_response_id` naming it is resolved here, by putting that conversation before the turn's input, whatever
`store` says; any other id is 400 `previous_response_not_found`. A failed or refused turn drops the state (as
OpenAI does: nothing stale is continued). The bounds (docs/apis.md): the conversation kept is at most
MAX_REQUEST_BYTES (a longer one is dropped, since it could not be sent again), a client message at most
MAX_REQUEST_BYTES (larger: close 1009), RESPONSES_WS_MAX_CONNECTIONS at once (beyond: 429 before the upgrade),
RESPONSES_WS_MAX_TURNS per connection and MAX_AGE_S, OpenAI's 60 minutes (then `websocket_connection_limit_reached` and
close 1000), RESPONSES_WS_IDLE_TIMEOUT_S without a message between turns (close 1000).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

__all__ = ["MAX_AGE_S", "ResponsesSocket", "WsLimits", "serve"]

log = logging.getLogger("extproc.responses_ws")

MAX_AGE_S = 3600.0  # a connection's longest life, as OpenAI's WebSocket mode
_TERMINAL = ("response.completed", "response.incomplete", "response.failed")
_CONTINUABLE = ("response.completed", "response.incomplete")
# A refusal's body is an OpenAI error object of a few hundred bytes; more than this is not one.
_MAX_ERROR_BODY = 64 * 1024


@dataclass(frozen=True, slots=True)
class WsLimits:
    """The bounds of WebSocket mode (settings RESPONSES_WS_*, MAX_REQUEST_BYTES)."""

    max_connections: int = 64
    max_turns: int = 1000
    idle_timeout_s: float = 300.0
    max_age_s: float = MAX_AGE_S
    max_bytes: int = 1 << 20


@dataclass(slots=True)
class _Connection:
    """One socket's state: the last finished response's id and its conversation as input items."""

    started: float = field(default_factory=time.monotonic)
    turns: int = 0
    last_id: str | None = None
    conversation: list[Any] = field(default_factory=list)
    dropped_id: str | None = None  # a finished response too large to keep
    dropped: str = ""  # why it cannot be continued


def _error(status: int, message: str, code: str, param: str | None = None, kind: str = "invalid_request_error") -> str:
    return json.dumps(
        {"type": "error", "status": status, "error": {"type": kind, "code": code, "message": message, "param": param}}
    )


def _as_items(value: Any) -> list[Any]:
    """A Responses `input` as a list of items (a string is one user message)."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    return list(value) if isinstance(value, list) else []


class ResponsesSocket:
    """The aiohttp handler of WebSocket mode; `upstream` is Envoy's own address (`http://127.0.0.1:GATEWAY_PORT`).

    `credential`: the header (name, value) that loopback turns carry when GATEWAY_API_KEYS is set. Envoy checked
    the client's key on the upgrade and removes it before forwarding, so a turn carries one of the configured keys.
    """

    def __init__(self, upstream: str, limits: WsLimits, credential: tuple[str, str] | None = None) -> None:
        self.upstream = upstream.rstrip("/") + "/v1/responses"
        self.limits = limits
        self.credential = credential
        self.open = 0
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            # No total timeout: the gateway's own deadlines bound a turn (GENERATION_TIMEOUT_S, idle timeouts).
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, connect=5))
        return self._session

    async def handle(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=self.limits.max_bytes, autoping=True)
        if self.open >= self.limits.max_connections:
            return web.Response(
                status=429,
                headers={"Retry-After": "1"},
                content_type="application/json",
                text=json.dumps({"error": {
                    "message": f"Too many WebSocket connections (RESPONSES_WS_MAX_CONNECTIONS="
                               f"{self.limits.max_connections}); retry later or use POST /v1/responses",
                    "type": "rate_limit_error", "param": None, "code": "websocket_connection_limit_reached"}}),
            )
        self.open += 1
        try:
            await ws.prepare(request)
            await self._serve(ws)
        finally:
            self.open -= 1
        return ws

    async def _serve(self, ws: web.WebSocketResponse) -> None:
        conn = _Connection()
        while not ws.closed:
            left = self.limits.max_age_s - (time.monotonic() - conn.started)
            if left <= 0:
                await self._limit(ws, f"This connection reached its {self.limits.max_age_s:g} s limit")
                return
            try:
                message = await ws.receive(timeout=min(self.limits.idle_timeout_s, left))
            except TimeoutError:
                if left <= self.limits.idle_timeout_s:
                    continue  # the age check above says so
                await ws.close(code=aiohttp.WSCloseCode.OK, message=b"idle")
                return
            if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                return
            if message.type == aiohttp.WSMsgType.ERROR:  # a frame over max_msg_size: aiohttp closes with 1009
                return
            if message.type != aiohttp.WSMsgType.TEXT:
                await ws.send_str(_error(400, "Client events are JSON text messages", "invalid_message"))
                continue
            event = self._event(message.data)
            if isinstance(event, str):
                await ws.send_str(event)
                continue
            if conn.turns >= self.limits.max_turns:
                await self._limit(ws, f"This connection reached RESPONSES_WS_MAX_TURNS={self.limits.max_turns}")
                return
            conn.turns += 1
            await self._turn(ws, conn, event)

    async def _limit(self, ws: web.WebSocketResponse, message: str) -> None:
        with contextlib.suppress(ConnectionError):
            await ws.send_str(_error(400, f"{message}; open a new connection", "websocket_connection_limit_reached"))
        await ws.close(code=aiohttp.WSCloseCode.OK, message=b"limit reached")

    @staticmethod
    def _event(text: str) -> dict[str, Any] | str:
        """The client's response.create, or the error event that answers anything else."""
        try:
            event = json.loads(text)
        except (ValueError, RecursionError):
            return _error(400, "The message is not valid JSON", "invalid_json")
        if not isinstance(event, dict) or event.get("type") != "response.create":
            return _error(400, "The only client event is {\"type\": \"response.create\", ...the Responses create "
                               "body}", "unknown_event_type", "type")
        if event.get("background"):
            return _error(400, "background is not supported in WebSocket mode", "unsupported_parameter", "background")
        return event

    async def _turn(self, ws: web.WebSocketResponse, conn: _Connection, event: dict[str, Any]) -> None:
        """One response.create: run it as POST /v1/responses through Envoy (a request id of its own), relay it."""
        body = {k: v for k, v in event.items() if k not in ("type", "stream", "stream_options", "background")}
        previous = body.pop("previous_response_id", None)
        own_input = _as_items(body.get("input"))
        conversation = own_input
        if previous is not None:
            if previous != conn.last_id:
                why = conn.dropped if previous == conn.dropped_id else (
                    "WebSocket mode keeps only the last finished response of this connection"
                    + (f" ({conn.last_id})" if conn.last_id else ", and there is none yet"))
                await ws.send_str(_error(400, f"Previous response with id '{previous}' not found: {why}",
                                         "previous_response_not_found", "previous_response_id"))
                return
            conversation = conn.conversation + own_input
            body["input"] = conversation
        body["stream"] = True
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.credential is not None:
            headers[self.credential[0]] = self.credential[1]
        conn.last_id, conn.conversation, conn.dropped_id = None, [], None  # spent, whatever happens now
        try:
            async with self._client().post(self.upstream, data=data, headers=headers) as resp:
                if resp.status != 200 or not resp.content_type.startswith("text/event-stream"):
                    await ws.send_str(await self._refusal(resp))
                    return
                final = await self._relay(ws, resp, previous)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("WebSocket turn: the gateway's own /v1/responses failed: %r", exc)
            with contextlib.suppress(ConnectionError):
                await ws.send_str(_error(502, "The gateway could not run this turn", "gateway_error",
                                         kind="server_error"))
            return
        if final is None or final.get("type") not in _CONTINUABLE:
            return
        response = final.get("response") or {}
        kept = conversation + [_input_item(item) for item in response.get("output") or []]
        size = len(json.dumps(kept))
        conn.last_id = response.get("id")
        if size > self.limits.max_bytes:
            conn.dropped_id = conn.last_id
            conn.last_id = None
            conn.dropped = (f"its conversation ({size} bytes) is larger than MAX_REQUEST_BYTES={self.limits.max_bytes},"
                            " so it could not be sent again; send the input whole")
            return
        conn.conversation = kept

    @staticmethod
    async def _refusal(resp: aiohttp.ClientResponse) -> str:
        """The gateway's error answer as an `error` event with its HTTP status."""
        raw = await resp.content.read(_MAX_ERROR_BODY)
        try:
            error = json.loads(raw)["error"]
            if not isinstance(error, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            error = {"type": "server_error", "code": "gateway_error", "message": "The gateway refused this turn",
                     "param": None}
        return json.dumps({"type": "error", "status": resp.status, "error": error})

    async def _relay(
        self, ws: web.WebSocketResponse, resp: aiohttp.ClientResponse, previous: str | None
    ) -> dict[str, Any] | None:
        """Each SSE event's data as one text message; the terminal event, parsed, when it came."""
        final = None
        pending = b""
        async for chunk in resp.content.iter_any():
            pending += chunk
            *events, pending = pending.split(b"\n\n")
            for raw in events:
                data = b"\n".join(line[5:].lstrip() for line in raw.split(b"\n") if line.startswith(b"data:"))
                if not data:
                    continue
                text = data.decode()
                if b'"response":{' in data:  # the events that carry the response object
                    event = json.loads(text)
                    event["response"]["previous_response_id"] = previous
                    text = json.dumps(event)
                    if event.get("type") in _TERMINAL:
                        final = event
                if ws.closed:
                    raise ConnectionResetError("the client went away")
                await ws.send_str(text)
        return final


def _input_item(item: dict[str, Any]) -> dict[str, Any]:
    """An output item as the input item that stands for it in the next turn."""
    if item.get("type") == "message":
        return {"type": "message", "role": item.get("role", "assistant"), "content": [
            {"type": "output_text", "text": part.get("text", "")}
            for part in item.get("content") or [] if part.get("type") == "output_text"
        ]}
    if item.get("type") == "function_call":
        return {k: item[k] for k in ("type", "call_id", "name", "arguments") if k in item}
    return item


async def serve(path: str, handler: ResponsesSocket) -> web.AppRunner:
    """Serve `handler` on the unix socket `path`, readable and writable by this user alone (Envoy runs as it)."""
    app = web.Application(handler_args={"max_field_size": 16 * 1024})
    app.router.add_get("/v1/responses", handler.handle)
    app.on_cleanup.append(lambda _app: handler.close())
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a socket left by a worker that died
    old = os.umask(0o177)
    try:
        await web.UnixSite(runner, path).start()
    finally:
        os.umask(old)
    return runner
