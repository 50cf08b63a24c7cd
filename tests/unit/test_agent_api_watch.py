"""The executor judges agents by their silence only while the agent API has been there to hear them."""

from __future__ import annotations

from datetime import timedelta

from tether.plane.executor import AgentApiWatch


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_silence_counts_only_after_the_agent_api_has_answered_for_a_health_timeout() -> None:
    clock, up = Clock(), [True]
    watch = AgentApiWatch(lambda: up[0], grace=timedelta(seconds=6), clock=clock)
    assert watch.silence_counts() is False  # just started: agents get a full timeout first
    clock.now += 6
    assert watch.silence_counts() is True
    up[0] = False
    clock.now += 1
    assert watch.silence_counts() is False  # the agent API is away: nobody can be heard
    clock.now += 30
    assert watch.silence_counts() is False
    up[0] = True
    clock.now += 1
    assert watch.silence_counts() is False  # back: agents get a full timeout to heartbeat again
    clock.now += 5.9
    assert watch.silence_counts() is False
    clock.now += 0.2
    assert watch.silence_counts() is True
