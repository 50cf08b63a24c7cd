"""What the agent API remembers of empty queues, and everything that makes it forget."""

from __future__ import annotations

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
