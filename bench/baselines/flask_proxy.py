"""The seed guide's "Flask Proxy Wrapper" (`proxy-wrapper.py`), re-implemented for the benchmark.

What the guide describes (../shared/reference/seed-deployment-guide.md): a Flask app on port 8000 in front of Shimmy
on 8080 with three routes, `GET /v1/models`, `POST /v1/chat/completions` and `GET /health` (answering
`{"status": "healthy", "shimmy_status": "healthy"}`), "forwarding /v1/* to Shimmy at http://localhost:8080" with the
`requests` library. The guide's wrapper forwarded chat to `/v1/chat-completion`, a route Shimmy does not have (every
call was a 404). For a comparison that works, this one does what such a wrapper has to do: forward the body to
Shimmy's own OpenAI route `/v1/chat/completions`, with `stream` made explicit (absent, Shimmy would answer an SSE
stream, OpenAI a JSON object), and relay the answer as it comes, chunk by chunk for a stream.

It is deliberately as plain as the guide's wrapper: one `requests.post` per call (no pooled session: a new TCP
connection to Shimmy each time), no validation, no translation. The benchmark runs it the usual way, under gunicorn
with sync workers (`gunicorn -w 2 bench.baselines.flask_proxy:app`: two, one per core of the 2-core machine); a sync
worker serves one request, or one whole stream, at a time.

`SHIMMY_URL` (default `http://localhost:8080`) says where Shimmy is.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import requests
from flask import Flask, Response, jsonify, request

SHIMMY_URL = os.environ.get("SHIMMY_URL", "http://localhost:8080").rstrip("/")
TIMEOUT_S = 600

app = Flask(__name__)


def _relay(upstream: requests.Response) -> Response:
    """Shimmy's answer as it is: status, content type and body."""
    content_type = upstream.headers.get("Content-Type", "application/json")
    return Response(upstream.content, status=upstream.status_code, content_type=content_type)


@app.route("/health", methods=["GET"])
def health() -> tuple[Response, int]:
    try:
        ok = requests.get(f"{SHIMMY_URL}/health", timeout=5).status_code == 200
    except requests.RequestException:
        ok = False
    state = "healthy" if ok else "unhealthy"
    return jsonify({"status": state, "shimmy_status": state}), 200 if ok else 503


@app.route("/v1/models", methods=["GET"])
def models() -> Response:
    return _relay(requests.get(f"{SHIMMY_URL}/v1/models", timeout=TIMEOUT_S))


@app.route("/v1/chat/completions", methods=["POST"])
def chat_completions() -> Response:
    data = request.get_json(force=True)
    stream = bool(data.get("stream", False))
    data["stream"] = stream  # Shimmy streams when `stream` is absent; an OpenAI client expects JSON then
    upstream = requests.post(f"{SHIMMY_URL}/v1/chat/completions", json=data, stream=stream, timeout=TIMEOUT_S)
    if not stream:
        return _relay(upstream)

    def chunks() -> Iterator[bytes]:
        try:
            yield from upstream.iter_content(chunk_size=None)  # each chunk as soon as it arrives
        finally:
            upstream.close()

    content_type = upstream.headers.get("Content-Type", "text/event-stream")
    return Response(chunks(), status=upstream.status_code, content_type=content_type)
