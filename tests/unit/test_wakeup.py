"""What the agent API remembers of empty queues, and everything that makes it forget."""

from __future__ import annotations

import contextlib

import pytest

from tether.plane.api import wakeup
from tether.plane.api.wakeup import Wakeup


@pytest.fixture
def listening() -> Wakeup:
    w = Wakeup()
    w._connection = 1  # as the listener thread leaves it once LISTEN is in place
    w.listening = True
    return w


def _found_empty(w: Wakeup, queues: list[str], free_slots: int) -> None:
    w.found_empty(w.look(queues), free_slots)


def test_nothing_is_known_without_a_listener() -> None:
    w = Wakeup()
    _found_empty(w, ["default"], 4)
    assert not w.known_empty(["default"], 4)


def test_a_queue_found_empty_stays_known_for_agents_no_larger(listening: Wakeup) -> None:
    _found_empty(listening, ["default"], 4)
    assert listening.known_empty(["default"], 4)
    assert listening.known_empty(["default"], 1)
    # A job of five pool slots would not have been claimed by a four-slot agent.
    assert not listening.known_empty(["default"], 5)
    # A smaller agent's look afterwards does not shrink what the larger one learnt.
    _found_empty(listening, ["default"], 2)
    assert listening.known_empty(["default"], 4)


def test_every_queue_asked_for_must_be_known(listening: Wakeup) -> None:
    _found_empty(listening, ["a"], 4)
    assert not listening.known_empty(["a", "b"], 4)
    _found_empty(listening, ["b"], 4)
    assert listening.known_empty(["a", "b"], 4)


def test_a_notification_ends_it(listening: Wakeup) -> None:
    _found_empty(listening, ["a", "b"], 4)
    listening.wake("a")
    assert not listening.known_empty(["a"], 4)
    assert listening.known_empty(["b"], 4)


def test_a_notification_during_the_claim_means_nothing_was_learnt(listening: Wakeup) -> None:
    look = listening.look(["default"])
    listening.wake("default")  # a job committed while the claim's query ran
    listening.found_empty(look, 4)
    assert not listening.known_empty(["default"], 4)


def test_a_new_listen_connection_ends_it(listening: Wakeup) -> None:
    _found_empty(listening, ["default"], 4)
    listening._connection += 1  # reconnected: notifications in between were lost
    assert not listening.known_empty(["default"], 4)
    # A claim that began on the old connection teaches nothing on the new one.
    look = listening.look(["default"])
    listening._connection += 1
    listening.found_empty(look, 4)
    assert not listening.known_empty(["default"], 4)


def test_it_ends_after_a_while_even_without_notifications(listening: Wakeup, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(wakeup.time, "monotonic", lambda: now[0])
    _found_empty(listening, ["default"], 4)
    now[0] += wakeup.EMPTY_FOR / 2
    assert listening.known_empty(["default"], 4)
    now[0] += wakeup.EMPTY_FOR
    assert not listening.known_empty(["default"], 4)


def test_a_lost_listener_forgets(listening: Wakeup) -> None:
    _found_empty(listening, ["default"], 4)
    listening.listening = False
    assert not listening.known_empty(["default"], 4)


def test_what_a_claim_learnt_counts_from_when_it_began(listening: Wakeup, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(wakeup.time, "monotonic", lambda: now[0])
    look = listening.look(["default"])
    now[0] += wakeup.EMPTY_FOR * 0.75  # a slow claim: its query saw the queue at some moment in between
    listening.found_empty(look, 4)
    assert listening.known_empty(["default"], 4)
    now[0] += wakeup.EMPTY_FOR * 0.5
    assert not listening.known_empty(["default"], 4)


# -- whom a notification wakes ----------------------------------------------------------------


def _woken(events: list[object]) -> list[int]:
    return [i for i, event in enumerate(events) if event.is_set()]  # type: ignore[attr-defined]


def test_a_notification_wakes_the_longest_waiting_poll_and_each_lease_wakes_two_more() -> None:
    w = Wakeup()
    with contextlib.ExitStack() as stack:
        events = [stack.enter_context(w.subscribe(["q"], 4)) for _ in range(8)]
        other = stack.enter_context(w.subscribe(["other"], 4))
        w.wake("q")
        assert _woken(events) == [0]
        assert not other.is_set()
        # A second notification before it looked wakes the next one: each notification a poll of its own.
        w.wake("q")
        assert _woken(events) == [0, 1]
        # One of them leased: the rest of the queue may hold more, and a burst doubles the polls looking.
        w.leased(["q"])
        assert _woken(events) == [0, 1, 2, 3]
        w.leased(["q"])
        w.leased(["q"])
        assert _woken(events) == list(range(8))
        # The woken go back to waiting; the same poll, still the longest waiting, is woken next.
        for event in events:
            event.clear()
        w.wake("q")
        assert _woken(events) == [0]


def test_a_poll_that_may_not_lease_passes_the_wake_on() -> None:
    w = Wakeup()
    with contextlib.ExitStack() as stack:
        events = [stack.enter_context(w.subscribe(["q"], 1)) for _ in range(3)]
        w.wake("q")
        w.cannot_lease(["q"])
        assert _woken(events) == [0, 1]


def test_a_claim_that_found_nothing_wakes_a_poll_with_the_most_free_slots_once(listening: Wakeup) -> None:
    with contextlib.ExitStack() as stack:
        small = [stack.enter_context(listening.subscribe(["q"], 1)) for _ in range(3)]
        middle = stack.enter_context(listening.subscribe(["q"], 2))
        large = [stack.enter_context(listening.subscribe(["q"], 4)) for _ in range(2)]
        listening.wake("q")
        assert _woken(small) == [0] and _woken(large) == []
        # It found nothing for one slot: a job of more pool slots may still be there, for the largest.
        _found_empty(listening, ["q"], 1)
        assert _woken(large) == [0] and not middle.is_set()
        assert _woken(small) == [0]
        # What the largest finds is the last word: nobody has more.
        _found_empty(listening, ["q"], 4)
        assert _woken(large) == [0] and not middle.is_set()


def test_a_new_listen_connection_wakes_everyone() -> None:
    w = Wakeup()
    with contextlib.ExitStack() as stack:
        events = [stack.enter_context(w.subscribe(["q"], 1)) for _ in range(20)]
        w.wake_everyone("q")
        assert all(event.is_set() for event in events)


def test_a_poll_that_stopped_waiting_is_not_woken_in_place_of_one_that_waits() -> None:
    w = Wakeup()
    with w.subscribe(["q"], 1):
        pass
    with w.subscribe(["q"], 1) as waiting:
        w.wake("q")
        assert waiting.is_set()
    assert w._waiters == {}
