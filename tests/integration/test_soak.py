"""Issue 4, item 6: the soak (bench/soak.py, the same code as `python -m bench.soak`) against a stack of its own.

16 clients for 20 s mixing valid, invalid, streamed and abandoned requests, with the emulator paced at 5 ms a token;
then no unexpected status, no hung request, the processor's RSS flat, and no leaked stream anywhere.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import aiohttp
import pytest

from bench import soak
from tests.integration.conftest import start_stack, stop_stack

SECONDS = 20.0
CLIENTS = 16

# Known bug (test_queue_answers_429_only_when_full below): Envoy answers 429 queue_full now and then although the
# queue holds every client. The soak still reports those 429s; this test tolerates only that one line. Set False
# once the bug is fixed.
TOLERATE_SPURIOUS_429 = False


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_soak_mixed_clients_leave_nothing_behind() -> None:
    queued = soak.queue_for(CLIENTS)
    # A queued request waits at most QUEUE_TIMEOUT_S for a slot (docs/admission.md): room for 16 clients on 2
    # slots, whose abandoned streams keep theirs while Shimmy goes on with them.
    stack = start_stack({"MAX_QUEUED_REQUESTS": str(queued), "QUEUE_TIMEOUT_S": "14"})
    try:
        report = soak.run(
            stack,
            stack.proc.pid,
            seconds=SECONDS,
            clients=CLIENTS,
            token_delay_ms=5,
            max_queued=queued,
            log=stack.output,
        )
    finally:
        stop_stack(stack)
        stack.log.unlink(missing_ok=True)
    print(report.format())  # shown with -s, and on failure

    kinds = Counter(o.kind for o in report.outcomes)
    assert all(kinds[k] >= 10 for k in soak.KINDS), kinds  # every kind of client really ran
    assert not any(o.status == "hung" for o in report.outcomes), report.format()
    assert not any(isinstance(o.status, int) and o.status >= 500 for o in report.outcomes), report.format()
    problems = [p for p in report.problems if not (TOLERATE_SPURIOUS_429 and p.startswith(soak.SPURIOUS_429))]
    assert problems == [], report.format()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_queue_answers_429_only_when_full() -> None:
    """8 clients, non-stream and abandoned streams, against the default limits (2 active + 16 queued): no 429.

    Seen before the fix (max_requests equal to max_connections): 429 queue_full for a share of the requests in most
    runs, with Envoy's cluster.shimmy.upstream_rq_active_overflow growing.
    """
    stack = start_stack()
    try:
        stack.configure(token_delay_ms=5, repeat=True)
        statuses = asyncio.run(_eight_clients(f"{stack.url}/v1/chat/completions", seconds=6))
        overflow = stack.envoy_stats("cluster.shimmy.upstream_rq_active_overflow")
    finally:
        stop_stack(stack)
        stack.log.unlink(missing_ok=True)
    assert statuses[429] == 0, (statuses, overflow)


async def _eight_clients(url: str, seconds: float) -> Counter[int]:
    statuses: Counter[int] = Counter()
    until = time.monotonic() + seconds

    async def client(i: int) -> None:
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < until:
                abandon = i % 2 == 1
                body = {
                    "model": "phi3-lora",
                    "messages": [{"role": "user", "content": "x"}],
                    "max_tokens": 64 if abandon else 16,
                    "stream": abandon,
                }
                resp = await session.post(url, json=body)
                statuses[resp.status] += 1
                if abandon and resp.status == 200:
                    await resp.content.readline()
                    resp.close()  # a client disconnect mid-stream
                else:
                    await resp.read()
                    resp.release()

    await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(8))), seconds + 30)
    return statuses
