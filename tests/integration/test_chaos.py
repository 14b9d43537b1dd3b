"""Issue 13: the chaos run (bench/chaos.py, the same code as `python -m bench.chaos`), short, on both emulator profiles.

Short and long requests and clients that vanish, while Shimmy hangs (SIGSTOP), resumes, is killed and restarted by
the supervisor: every client gets a complete answer or an OpenAI error within the outer limit, nothing leaks, the
processor's memory stays flat, chat is served again after the restart, and never more generations are inside
Shimmy than the cap.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench import chaos
from tests.integration.conftest import start_stack, stop_stack

SECONDS = 12.0


@pytest.fixture(scope="module", params=["1.7.2", "2.5.0"])
def report(request: pytest.FixtureRequest) -> Iterator[chaos.ChaosReport]:
    stack = start_stack(chaos.stack_env(request.param))
    try:
        result = chaos.run(stack, stack.proc.pid, request.param, SECONDS)
    finally:
        stop_stack(stack)
        stack.log.unlink(missing_ok=True)
    print(result.figures())  # shown with -s, and on failure
    yield result


def test_every_client_is_answered_and_nothing_leaks(report: chaos.ChaosReport) -> None:
    assert report.problems == [], report.figures()
    ran = {o.kind for o in report.outcomes if o.result != "late"}
    assert ran == set(chaos.KINDS)
    details = {o.detail for o in report.outcomes if o.result == "error"}
    assert "backend_unavailable" in details, "the hang and the kill were answered with 503s"
    assert report.recovered_after_kill_s is not None, "served again after the restart"


def test_never_more_generations_in_shimmy_than_the_cap(report: chaos.ChaosReport) -> None:
    assert report.generations_seen, "the emulator was sampled"
    assert report.max_generations <= report.cap, report.figures()
