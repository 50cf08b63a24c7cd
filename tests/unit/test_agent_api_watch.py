"""The executor judges agents by their silence only while the agent API has been there to hear them."""

from __future__ import annotations

from datetime import timedelta

from tether.plane.executor import AgentApiWatch


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def looks(watch: AgentApiWatch, clock: Clock, seconds: float, every: float = 1.0) -> list[bool]:
    """What the watch says at each look the scheduler takes over ``seconds``."""
    said = []
    for _ in range(round(seconds / every)):
        clock.now += every
        said.append(watch.silence_counts())
    return said


def test_silence_counts_only_after_the_agent_api_has_answered_for_a_health_timeout() -> None:
    clock, up = Clock(), [True]
    watch = AgentApiWatch(lambda: up[0], grace=timedelta(seconds=6), max_gap=timedelta(seconds=2), clock=clock)
    assert watch.silence_counts() is False  # just started: agents get a full timeout first
    assert looks(watch, clock, 6) == [False] * 5 + [True]
    up[0] = False
    assert looks(watch, clock, 30) == [False] * 30  # the agent API is away: nobody can be heard
    up[0] = True
    # Back: agents get a full timeout to heartbeat again.
    assert looks(watch, clock, 7) == [False] * 6 + [True]


def test_a_stalled_agent_api_gives_agents_a_full_timeout_after_it_answers_again() -> None:
    clock = Clock()
    watch = AgentApiWatch(lambda: True, grace=timedelta(seconds=6), max_gap=timedelta(seconds=2), clock=clock)
    looks(watch, clock, 10)
    assert watch.silence_counts() is True
    # The server's event loop is busy for 5 s: the look taken meanwhile is answered only
    # after it, as quickly as any other, while the heartbeats that waited are not yet stored.
    clock.now += 5
    assert watch.silence_counts() is False
    assert looks(watch, clock, 6) == [False] * 5 + [True]


def test_looks_closer_than_the_gap_keep_the_agent_api_counted_as_there() -> None:
    clock = Clock()
    watch = AgentApiWatch(lambda: True, grace=timedelta(seconds=6), max_gap=timedelta(seconds=2), clock=clock)
    looks(watch, clock, 8)
    # A slow scheduler loop now and then, within the gap, changes nothing.
    assert looks(watch, clock, 8, every=2.0) == [True] * 4
