"""The Task SDK supervisor, as the agent's child runs it, notices the task process's exit when it happens."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import pytest
from airflow.sdk.execution_time import supervisor

from tests.unit.sdk_probe import probe_supervisor
from tether.agent.runner import watch_task_exit


def _quiet_then_exit() -> None:
    """A task process that closes every channel to its supervisor and exits a second later."""
    os.closerange(0, 4096)
    time.sleep(1.0)


def _wait_in_thread(process: Any, timeout: float) -> dict[str, int]:
    result: dict[str, int] = {}
    waiter = threading.Thread(target=lambda: result.update(code=process.wait()), daemon=True)
    waiter.start()
    waiter.join(timeout)
    return result


@pytest.fixture
def no_heartbeat_wakeups(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing but the exit itself may wake the supervisor within the test's bounds."""
    monkeypatch.setattr(supervisor, "MIN_HEARTBEAT_INTERVAL", 3600)


@pytest.mark.usefixtures("no_heartbeat_wakeups")
@pytest.mark.parametrize("watched", [True, False], ids=["watched", "unwatched"])
def test_the_supervisor_notices_an_exit_after_its_sockets_closed(watched: bool) -> None:
    probe = probe_supervisor(_quiet_then_exit)
    if watched:
        assert watch_task_exit(probe)
    process = probe.start()
    try:
        # The stand-in exits after a second. The same 5 s that show the unwatched wait never
        # ends see the watched one end: the exit is there to be noticed within them.
        result = _wait_in_thread(process, timeout=5)
        if watched:
            assert result == {"code": 0}
        else:
            # Without the watch the supervisor sleeps on until its next heartbeat is due:
            # the case the watch exists for, shown to happen with this SDK version.
            assert result == {}
    finally:
        try:
            os.kill(process.pid, signal.SIGKILL)
            os.waitpid(process.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def test_an_sdk_without_the_expected_start_is_left_alone() -> None:
    class NoStart:
        pass

    assert watch_task_exit(NoStart) is False
    assert "start" not in NoStart.__dict__
