"""Shimmy's native generation API, the facts both sides of it need (shared/reference/shimmy-api.md §2, §3).

The processor speaks it (`extproc.shimmy_protocol` builds and reads its bodies), the emulator answers it
(`shimmy.native`). A stream's events are raw token text; `[DONE]` ends it; `[ERROR] <text>` (2.x) reports a failure.
"""

from __future__ import annotations

__all__ = ["DEFAULT_MAX_TOKENS", "DONE", "ERROR_PREFIX", "GENERATE_PATH"]

GENERATE_PATH = "/api/generate"
DEFAULT_MAX_TOKENS = 256  # GenOptions::default(): what Shimmy generates when a request names no max_tokens
DONE = "[DONE]"
ERROR_PREFIX = "[ERROR]"
