"""How the gateway judges Shimmy's health, and the readiness and liveness bodies it answers with.

Shimmy's own `/health` answers 200 whatever its state, so 200 alone proves only that the process serves HTTP.
The monitor calls Shimmy healthy when `/health` answers 200 within the timeout **and** `/api/models` lists the
configured model (a model that is not registered would fail every chat request with 404) **and**, with `warmup`,
once Shimmy has answered one tiny generation: it loads the model lazily, at the first request, so until then a
"healthy" pod would make its first caller wait for the load. It also keeps Shimmy's model list, which lets the
processor refuse an unknown model before Shimmy sees the request. That is readiness: can Shimmy serve now.

Liveness is a weaker question: does the Shimmy process exist. A Shimmy busy generating may answer `/health` late
(1.x runs generations on its HTTP workers, so with all of them busy even `/health` stalls), and killing the pod
for it would cut the generations it is busy with. So when `/health` gives no answer, the monitor asks only whether
Shimmy's port still accepts a TCP connection (the kernel completes it even for a stopped process); a closed port
means the process is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from urllib.parse import urlsplit

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
        self.process_up = False  # Shimmy answered /health, or at least its port accepted a connection
        self._answered = False  # the current probe got an HTTP answer from /health

    async def run(self) -> None:
        async with aiohttp.ClientSession(timeout=self.timeout) as session:
            while True:
                await self.probe(session)
                await asyncio.sleep(self.interval)

    async def probe(self, session: aiohttp.ClientSession) -> None:
        self._answered = False
        healthy, reason = await self._check(session)
        self.process_up = self._answered or await self._port_open()
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
                self._answered = True
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

    async def _port_open(self) -> bool:
        """Whether Shimmy's port accepts a TCP connection: its process exists, however busy it is."""
        url = urlsplit(self.base_url)
        try:
            async with asyncio.timeout(self.timeout.total):
                _, writer = await asyncio.open_connection(url.hostname, url.port or 80)
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

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

    def liveness(self) -> tuple[int, bytes]:
        """Status and body of `/v1/health/live`: that this processor answers at all is the rest of the check."""
        if self.process_up:
            return 200, b'{"status":"alive","shimmy_process":"up","extproc_status":"healthy"}'
        body = {"status": "unhealthy", "shimmy_process": "down", "extproc_status": "healthy", "reason": self.reason}
        return 503, _encode(body)

    def answer(self) -> tuple[int, bytes]:
        """Status and body of readiness: `/v1/health/ready`, `/v1/health` and `/health`."""
        if self.healthy:
            return 200, b'{"status":"healthy","shimmy_status":"healthy"}'
        body = {"status": "unhealthy", "shimmy_status": "unhealthy", "extproc_status": "healthy", "reason": self.reason}
        return 503, _encode(body)
