"""How the gateway judges Shimmy's health, and the `/health` body it answers with.

Shimmy's own `/health` answers 200 whatever its state, so 200 alone proves only that the process serves HTTP.
The monitor calls Shimmy healthy when `/health` answers 200 within the timeout **and** `/api/models` lists the
configured model (a model that is not registered would fail every chat request with 404) **and**, with `warmup`,
once Shimmy has answered one tiny generation: it loads the model lazily, at the first request, so until then a
"healthy" pod would make its first caller wait for the load. It also keeps Shimmy's model list, which lets the
processor refuse an unknown model before Shimmy sees the request.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import msgspec

from extproc.admission import Admission, Busy
from extproc.errors import UpstreamError
from extproc.shimmy_protocol import model_names

__all__ = ["ShimmyMonitor"]

log = logging.getLogger("extproc.health")
WARMUP_TIMEOUT = aiohttp.ClientTimeout(total=900)  # a multi-GB GGUF on a slow disk takes minutes to load
_encode = msgspec.json.Encoder().encode


class ShimmyMonitor:
    """Probes Shimmy every `interval` seconds; `healthy`, `reason` and `models` describe the last probe."""

    def __init__(
        self,
        base_url: str,
        model: str,
        interval: float,
        timeout: float = 2.0,
        warmup: bool = False,
        admission: Admission | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.interval = interval
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.warmed = not warmup  # without warm-up there is nothing to wait for
        self.healthy = False
        self.reason = "not probed yet"
        self.models: frozenset[str] | None = None
        self.admission = admission  # the warm-up is a generation like any other: it takes a slot

    async def run(self) -> None:
        async with aiohttp.ClientSession(timeout=self.timeout) as session:
            while True:
                await self.probe(session)
                await asyncio.sleep(self.interval)

    async def probe(self, session: aiohttp.ClientSession) -> None:
        healthy, reason = await self._check(session)
        if healthy != self.healthy:
            log.log(
                logging.INFO if healthy else logging.WARNING,
                "Shimmy is %s%s",
                "healthy" if healthy else "unhealthy",
                "" if healthy else f": {reason}",
            )
        self.healthy, self.reason = healthy, reason

    async def _check(self, session: aiohttp.ClientSession) -> tuple[bool, str]:
        try:
            async with session.get(self.base_url + "/health") as resp:
                if resp.status != 200:
                    return False, f"/health answered {resp.status}"
            async with session.get(self.base_url + "/api/models") as resp:
                if resp.status != 200:
                    return False, f"/api/models answered {resp.status}"
                self.models = frozenset(model_names(await resp.read()))
        except (aiohttp.ClientError, TimeoutError) as exc:
            if isinstance(exc, aiohttp.ClientConnectorError) and self.admission is not None:
                self.admission.shimmy_gone()  # refused: no process, so none of its generations runs on
            return False, f"unreachable: {exc.__class__.__name__} {exc}".strip()
        except UpstreamError as exc:
            return False, exc.message
        if self.model not in self.models:
            return False, f"model '{self.model}' is not in Shimmy's list {sorted(self.models)}"
        if not self.warmed:
            return await self._warm_up(session)
        return True, "ok"

    async def _warm_up(self, session: aiohttp.ClientSession) -> tuple[bool, str]:
        """One generation of one token; the first one pays the model load, so it gets a long timeout."""
        log.info("warming up: asking Shimmy for one token of '%s'", self.model)
        self.reason = "warming up: waiting for Shimmy's first generation (the model loads at the first request)"
        body = {"model": self.model, "prompt": "Hello", "max_tokens": 1, "stream": False}
        try:
            ticket = None if self.admission is None else await self.admission.admit(self.model, 1)
        except Busy:
            return False, "warm-up generation waits for a free generation slot"
        try:
            async with session.post(self.base_url + "/api/generate", json=body, timeout=WARMUP_TIMEOUT) as resp:
                if resp.status != 200:
                    return False, f"warm-up generation answered {resp.status}"
                await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            if ticket is not None:
                ticket.abandon("error")  # Shimmy may still be loading or generating it
                ticket = None
            return False, f"warm-up generation failed: {exc.__class__.__name__} {exc}".strip()
        finally:
            if ticket is not None:
                ticket.finish()
        self.warmed = True
        return True, "ok"

    def answer(self) -> tuple[int, bytes]:
        """Status and body of the gateway's `/health`."""
        if self.healthy:
            return 200, b'{"status":"healthy","shimmy_status":"healthy"}'
        body = {"status": "unhealthy", "shimmy_status": "unhealthy", "extproc_status": "healthy", "reason": self.reason}
        return 503, _encode(body)
