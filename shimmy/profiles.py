"""Version profiles: the protocol quirks that differ between Shimmy releases (spec §1.2, §3, §4, §5.4).

Every flag is derived from the version by the thresholds the spec gives, so any release from v0.1.0 on can be
mimicked; the pinned release (`shimmy_spec.versions.PINNED`, 1.x) and `2.5.0` (HEAD) are the ones the gateway is tested
against. What a release does with a generation (context, batch, errors, concurrency) is `shimmy_spec.versions`' backend
profile, carried here as `backend`.
"""

from __future__ import annotations

from dataclasses import dataclass

from shimmy_spec import versions

__all__ = ["HEAD", "Profile", "Route", "profile_for"]

HEAD = "2.5.0"

Route = tuple[str, str]  # (method, axum path pattern)

_BASE_ROUTES: frozenset[Route] = frozenset(
    {
        ("GET", "/health"),
        ("GET", "/diag"),
        ("POST", "/api/generate"),
        ("GET", "/api/models"),
        ("POST", "/api/models/discover"),
        ("POST", "/api/models/:name/load"),
        ("POST", "/api/models/:name/unload"),
        ("GET", "/api/models/:name/status"),
        ("GET", "/api/tools"),
        ("POST", "/api/tools/:name/execute"),
        ("POST", "/api/workflows/execute"),
        ("GET", "/ws/generate"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
    }
)


@dataclass(frozen=True, slots=True)
class Profile:
    """What one Shimmy version does differently. Field comments give the version that changed it."""

    version: str
    routes: frozenset[Route]  # +/metrics 1.0.1, +/v1/messages 1.7.4, +/v1/completions and /api/tags 2.0.0
    health: str  # "ok" <1.0.1, "basic" <1.3.5, "full" after: the body of GET /health (§4.1)
    cors: bool  # 1.3.5: CORS headers on every response and OPTIONS -> 200 (§9.2)
    chat_double_framing: bool  # <1.4.2: chat SSE lines read `data: data: {...}` (§5.3.1)
    chat_assistant_turn: bool  # 1.0.1: chat prompt ends with the last user turn and an assistant opener (§8.3)
    chat_404_json: bool  # 1.5.5: chat's unknown model is an OpenAI JSON 404, before that an empty 404
    chat_validation: bool  # 2.0.0: chat 400s for empty `messages` and `max_tokens` outside [1, 131072]
    content_parts: bool  # 2.0.0: chat `content` may be an array of parts
    metrics_gpu: bool  # 1.7.4: /metrics has gpu_detected/gpu_vendor
    metrics_llama_feature: bool  # <2.4.0: /metrics features has a `llama` key
    models_created_now: bool  # 1.8.0: /v1/models `created` is the current time, before that 0
    models_root: bool  # 1.7.4 only: /v1/models entries carry `root`
    duplicate_discovered: bool  # 1.x: discovered models are copied into the manual registry (§3.1)
    caches_model: bool  # 2.x keeps the first loaded model; 1.x reloads it for every request (§8.4)
    stream_error_event: bool  # 2.0.0: a stream failure sends `[ERROR] <msg>` before `[DONE]` (1.x swallows it)
    llama3_markers: tuple[str, ...]  # model-name substrings that select the Llama3 template (§8.1)
    backend: versions.BackendProfile  # context, prompt batch, concurrency, sampling: what the engine does


def profile_for(version: str) -> Profile:
    """The profile of `version` (`1.7.2`, `v2.5.0`, ...); ValueError when it is not a version from v0.1.0 on."""
    v = versions.parse_version(version)
    if v < (0, 1, 0):
        raise ValueError(f"Shimmy {version} predates the first release, v0.1.0")
    routes = set(_BASE_ROUTES)
    if v >= (1, 0, 1):
        routes.add(("GET", "/metrics"))
    if v >= (1, 7, 4):
        routes.add(("POST", "/v1/messages"))
    if v >= (2, 0, 0):
        routes |= {("POST", "/v1/completions"), ("GET", "/api/tags")}
    two = v >= (2, 0, 0)
    backend = versions.profile_for(version)
    return Profile(
        version="{}.{}.{}".format(*v),
        routes=frozenset(routes),
        health="ok" if v < (1, 0, 1) else "basic" if v < (1, 3, 5) else "full",
        cors=v >= (1, 3, 5),
        chat_double_framing=v < (1, 4, 2),
        chat_assistant_turn=v >= (1, 0, 1),
        chat_404_json=v >= (1, 5, 5),
        chat_validation=two,
        content_parts=two,
        metrics_gpu=v >= (1, 7, 4),
        metrics_llama_feature=v < (2, 4, 0),
        models_created_now=v >= (1, 8, 0),
        models_root=(1, 7, 4) <= v < (1, 8, 0),
        duplicate_discovered=not two,
        caches_model=not backend.model_load_per_request,
        stream_error_event=backend.stream_errors_reported,
        llama3_markers=("llama-3", "llama3", "meta-llama-3") if two else ("llama",),
        backend=backend,
    )
