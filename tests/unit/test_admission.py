"""The occupancy model of extproc.admission, on a fake clock: when an abandoned generation's slot comes back."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from extproc.admission import MARGIN_S, SAFETY, Admission, Busy


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def admission(clock: Clock, capacity: int = 2, serialized: bool = False, **kw: object) -> Admission:
    return Admission(capacity, 4, 0.2, serialized=serialized, clock=clock, **kw)  # type: ignore[arg-type]


def run_tokens(adm: Admission, clock: Clock, ticket, count: int, tpot: float) -> None:  # type: ignore[no-untyped-def]
    for n in range(1, count + 1):
        clock.now += tpot
        ticket.progress(n)


def test_an_abandoned_generation_keeps_its_slot_for_its_remaining_tokens_at_its_own_pace() -> None:
    clock = Clock()
    adm = admission(clock)
    t = adm.try_admit("m", max_tokens=30)
    assert t is not None
    run_tokens(adm, clock, t, 10, 0.2)
    t.abandon("client_gone")
    expected = t.last_token_at + 20 * 0.2 * SAFETY + MARGIN_S  # type: ignore[operator]
    assert adm.busy == 1 and adm.abandoned == 1
    assert adm.backlog() == pytest.approx(expected - clock.now)
    clock.now = expected - 0.01
    adm._expire()
    assert adm.busy == 1
    clock.now = expected + 0.01
    adm._expire()
    assert adm.busy == 0


def test_a_finished_generation_frees_its_slot_at_once_and_teaches_the_pace() -> None:
    clock = Clock()
    adm = admission(clock)
    t = adm.try_admit("m", max_tokens=5)
    assert t is not None
    run_tokens(adm, clock, t, 5, 0.04)
    t.finish()
    assert adm.busy == 0
    assert adm.pace.tpot < 0.25  # moved towards the 0.04 s measured


def test_the_context_bounds_what_an_abandoned_generation_can_still_produce() -> None:
    clock = Clock()
    adm = admission(clock, context_tokens=4096)
    t = adm.try_admit("m", max_tokens=100_000, prompt_tokens=4000)
    assert t is not None
    run_tokens(adm, clock, t, 2, 0.1)
    assert t.remaining_tokens(4096) == 94


def _two_abandoned(serialized: bool) -> tuple[Admission, list[float]]:
    """Two generations admitted together; the first ran 5 tokens, the second none; both abandoned."""
    clock = Clock()
    adm = admission(clock, serialized=serialized)
    first, second = adm.try_admit("m", max_tokens=20), adm.try_admit("m", max_tokens=20)
    assert first is not None and second is not None
    run_tokens(adm, clock, first, 5, 0.2)
    first.abandon("client_gone")
    second.abandon("client_gone")
    return adm, [end for _, end in adm._ends(clock.now)]


def test_serialized_shimmy_counts_the_work_ahead_of_a_generation_that_has_not_started() -> None:
    _, concurrent = _two_abandoned(serialized=False)
    serial_adm, serial = _two_abandoned(serialized=True)
    assert serial[0] == pytest.approx(concurrent[0])  # the running one ends alike
    assert serial[1] > serial[0] + 20 * serial_adm.pace.tpot  # the waiting one runs after it, all 20 tokens
    assert concurrent[1] < serial[1]


def test_serialized_shimmy_a_new_first_token_proves_the_earlier_running_generation_finished() -> None:
    clock = Clock()
    adm = admission(clock, serialized=True)
    first = adm.try_admit("m", max_tokens=100)
    second = adm.try_admit("m", max_tokens=10)
    assert first is not None and second is not None
    run_tokens(adm, clock, first, 3, 0.2)
    first.abandon("stop_sequence")
    assert adm.busy == 2
    second.progress(1)  # Shimmy runs one generation at a time: the first one is over
    assert adm.busy == 1 and not second.released


def test_concurrent_shimmy_a_new_first_token_proves_nothing() -> None:
    clock = Clock()
    adm = admission(clock)
    first, second = adm.try_admit("m", max_tokens=100), adm.try_admit("m", max_tokens=10)
    assert first is not None and second is not None
    run_tokens(adm, clock, first, 3, 0.2)
    first.abandon("stop_sequence")
    second.progress(1)
    assert adm.busy == 2


async def test_a_full_house_queues_then_answers_busy_with_a_retry_after() -> None:
    clock = Clock()
    adm = Admission(1, 1, 0.2, serialized=False, clock=clock)
    held = adm.try_admit("m", max_tokens=10)
    assert held is not None
    with pytest.raises(Busy) as caught:  # one queues ...
        await asyncio.wait_for(asyncio.gather(adm.admit("m", 1), adm.admit("m", 1)), 5)
    assert caught.value.status == 429 and caught.value.retry_after >= 1  # ... the next finds the queue full


async def test_a_queued_request_gets_the_slot_a_finished_generation_gives_back() -> None:
    adm = Admission(1, 4, 5.0, serialized=False)
    held = adm.try_admit("m", max_tokens=10)
    assert held is not None
    waiting = asyncio.create_task(adm.admit("m", 1))
    await asyncio.sleep(0)
    assert adm.queued == 1
    held.finish()
    ticket = await asyncio.wait_for(waiting, 1)
    assert ticket.slot == 0 and adm.busy == 1


async def test_a_client_that_leaves_the_queue_takes_no_slot() -> None:
    adm = Admission(1, 4, 5.0, serialized=False)
    held = adm.try_admit("m", max_tokens=10)
    assert held is not None
    waiting = asyncio.create_task(adm.admit("m", 1))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert adm.queued == 0 and adm.busy == 1


async def test_workers_share_the_slots_through_lock_files(tmp_path: Path) -> None:
    one = Admission(2, 4, 0.1, serialized=False, shared_dir=tmp_path)
    two = Admission(2, 4, 0.1, serialized=False, shared_dir=tmp_path)
    a, b = one.try_admit("m", 10), two.try_admit("m", 10)
    assert a is not None and b is not None and a.slot != b.slot
    assert one.try_admit("m", 10) is None  # the other worker holds the second slot
    with pytest.raises(Busy):
        await two.admit("m", 10)
    b.finish()
    assert (await one.admit("m", 10)).slot == b.slot


def test_a_shimmy_that_is_gone_takes_its_abandoned_generations_with_it() -> None:
    clock = Clock()
    adm = admission(clock)
    running, left = adm.try_admit("m", max_tokens=100), adm.try_admit("m", max_tokens=100)
    assert running is not None and left is not None
    left.abandon("client_gone")
    adm.shimmy_gone()
    assert adm.busy == 1 and not running.released  # the one still read ends when its response does


def test_a_generation_with_one_token_is_paced_no_slower_than_its_first_token_came() -> None:
    clock = Clock()
    adm = admission(clock)
    t = adm.try_admit("m", max_tokens=41)
    assert t is not None
    clock.now += 0.01
    t.progress(1)  # 10 ms to the first token; nothing measured yet, so the default pace would be 0.25 s
    t.abandon("client_gone")
    [(_, end)] = adm._ends(clock.now)
    assert end == pytest.approx(clock.now + 40 * 0.01 * SAFETY + MARGIN_S)
