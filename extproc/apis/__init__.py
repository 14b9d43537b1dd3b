"""One adapter per client API, each a small module: parse its request into a `GenerationRequest`, render its
answer, frame its stream, shape its errors. The generation itself is `extproc.generation`'s, shared by all.

Adding an API is one module here and its entry in `APIS`: Envoy's routes, virtual cluster and error replies for
it are rendered from the adapter's `route`, `path`, `error_shape`, `endpoints` and `subpath_error`
(gateway/envoy_config.py).
"""

from __future__ import annotations

from extproc.apis.chat import ChatCompletions
from extproc.apis.completions import Completions
from extproc.apis.messages import Messages
from extproc.apis.responses import Responses, ResponsesCompact
from extproc.generation import Api

__all__ = ["APIS"]

# Routes match in this order: compaction's path lies below /v1/responses, whose 404 for stored responses it precedes.
_ADAPTERS: tuple[type[Api], ...] = (ChatCompletions, Messages, ResponsesCompact, Responses, Completions)
APIS: dict[str, type[Api]] = {api.route: api for api in _ADAPTERS}
