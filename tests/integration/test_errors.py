"""Issue 4: the error table's rows that Envoy's routes and the processor answer, through the real stack."""

from __future__ import annotations

import httpx
import pytest

from tests.integration.conftest import Stack

CHAT = {"model": "phi3-lora", "messages": [{"role": "user", "content": "x"}]}


def assert_error(resp: httpx.Response, status: int, type_: str, code: str) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == (type_, code)
    return error


@pytest.mark.parametrize("headers", [{"content-length": "0"}, {}], ids=["length-0", "no-length"])
def test_missing_body(stack: Stack, headers: dict[str, str]) -> None:
    resp = httpx.post(f"{stack.url}/v1/chat/completions", headers={"content-type": "application/json", **headers})
    assert_error(resp, 400, "invalid_request_error", "missing_body")
    assert stack.emulator_stats()["generate_requests"] == 0


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/chat/completions"), ("POST", "/v1/models"),
                                              ("DELETE", "/v1/health"), ("PUT", "/health")])
def test_wrong_method(stack: Stack, method: str, path: str) -> None:
    assert_error(httpx.request(method, f"{stack.url}{path}"), 405, "invalid_request_error", "method_not_allowed")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "application/xml"])
def test_unsupported_media_type(stack: Stack, content_type: str) -> None:
    resp = httpx.post(f"{stack.url}/v1/chat/completions", content=b'{"model":"phi3-lora"}',
                      headers={"content-type": content_type})
    assert_error(resp, 415, "invalid_request_error", "unsupported_media_type")


def test_json_subtypes_are_accepted(stack: Stack) -> None:
    resp = httpx.post(f"{stack.url}/v1/chat/completions", json=CHAT,
                      headers={"content-type": "application/json; charset=utf-8"})
    assert resp.status_code == 200


@pytest.mark.parametrize("path", ["/", "/v1", "/v1/embeddings", "/api/generate", "/v2/models"])
def test_unknown_path(stack: Stack, path: str) -> None:
    assert_error(httpx.get(f"{stack.url}{path}"), 404, "invalid_request_error", "not_found")


def test_malformed_json_and_invalid_utf8(stack: Stack) -> None:
    headers = {"content-type": "application/json"}
    assert_error(httpx.post(f"{stack.url}/v1/chat/completions", content=b'{"model": ', headers=headers),
                 400, "invalid_request_error", "invalid_json")
    bad = b'{"model":"phi3-lora","messages":[{"role":"user","content":"\xff\xfe"}]}'
    assert_error(httpx.post(f"{stack.url}/v1/chat/completions", content=bad, headers=headers),
                 400, "invalid_request_error", "invalid_encoding")


def test_shimmy_load_failure_is_502(versioned_stack: Stack) -> None:
    stack = versioned_stack
    stack.configure(fail_load=True)
    # 1.x answers a non-stream client's one-piece request with the same empty 502 for a failed load and a failed
    # generation; 2.x's stream tells them apart (a load failure comes before the stream starts).
    code = "generation_failed" if stack.shimmy_version().startswith("1.") else "upstream_error"
    assert_error(httpx.post(f"{stack.url}/v1/chat/completions", json=CHAT), 502, "server_error", code)


def test_generation_error_in_a_non_stream_request_is_502(versioned_stack: Stack) -> None:
    """Version-dependent: 1.x swallows a stream's failure, so the gateway must ask 1.x for a non-stream answer."""
    stack = versioned_stack
    stack.configure(error_after=1)
    assert_error(httpx.post(f"{stack.url}/v1/chat/completions", json=CHAT), 502, "server_error", "generation_failed")


def test_truncated_shimmy_answer_in_a_non_stream_request_is_an_error(versioned_stack: Stack) -> None:
    stack = versioned_stack
    stack.configure(drop_after=2)
    resp = httpx.post(f"{stack.url}/v1/chat/completions", json=CHAT)
    if stack.shimmy_version().startswith("1."):  # one piece: Shimmy is gone before its answer's headers (Envoy: UC)
        assert_error(resp, 503, "server_error", "backend_unavailable")
    else:  # the stream had begun: the processor sees it end before [DONE]
        assert_error(resp, 502, "server_error", "upstream_error")
