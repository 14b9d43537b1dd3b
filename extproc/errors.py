"""OpenAI-shaped errors: the one error type the processor raises, and its wire body.

    GatewayError            any failure the client must see, with status, type, code and param
      InvalidRequest        400 invalid_request_error (bad JSON, bad field, unsupported parameter)
      ModelNotFound         404 invalid_request_error / model_not_found
      UpstreamError         502 server_error / upstream_error (Shimmy failed or spoke garbage)
      Timeout               504 server_error / timeout (the generation outlived the gateway's deadline)
      Unavailable           503 server_error / backend_unavailable (Shimmy cannot serve now; Retry-After)

Bodies are always built by the JSON encoder, never by string formatting.
"""

from __future__ import annotations

import msgspec

__all__ = ["GatewayError", "InvalidRequest", "ModelNotFound", "Timeout", "Unavailable", "UpstreamError", "error_json"]

_encode = msgspec.json.Encoder().encode


class GatewayError(Exception):
    status = 500
    type = "server_error"
    code: str | None = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> bytes:
        return error_json(self.message, self.type, self.param, self.code)


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_value"


class ModelNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model '{model}' does not exist", param="model")


class UpstreamError(GatewayError):
    status = 502
    type = "server_error"
    code = "upstream_error"


class Timeout(GatewayError):
    status = 504
    type = "server_error"
    code = "timeout"


class Unavailable(GatewayError):
    status = 503
    type = "server_error"
    code = "backend_unavailable"
    retry_after = 5  # seconds: a couple of health checks, as Envoy's own 503 says


def error_json(message: str, type_: str, param: str | None = None, code: str | None = None) -> bytes:
    return _encode({"error": {"message": message, "type": type_, "param": param, "code": code}})
