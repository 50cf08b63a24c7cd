"""ADR 4: a plane that stops answering for a while fails no healthy agent's work when it comes back.

A machine that sleeps with the plane and an agent on it: the API server, the
scheduler and the agent are stopped with SIGSTOP for longer than the health
timeout. The plane wakes first. Its scheduler then finds the agent silent for
longer than the timeout while the agent API answers at once - the agent must get
a full health timeout to be heard before its silence counts.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.faults.conftest import (
    HEALTH_TIMEOUT,
    Agents,
    agent_row,
    log_text,
    logs,
    settled_jobs,
    task_instances,
    trigger,
    wait_running,
)
from tether.embedded import Plane, wait_until

pytestmark = pytest.mark.timeout(300)

PAUSE = HEALTH_TIMEOUT + 4
AGENT_WAKES_AFTER = 3.0


def test_a_paused_plane_fails_no_running_task_when_it_resumes(plane: Plane, agents: Agents) -> None:
    agent = agents.start("pause-a", queues="pauseq", slots="1")
    run_id = trigger(plane, "faults_plane_pause")
    wait_running(plane, "faults_plane_pause", run_id)

    scheduler = plane.processes["scheduler"]
    frozen = [agent.process, scheduler, plane.processes["api-server"]]
    for process in frozen:
        process.signal(signal.SIGSTOP)
    try:
        time.sleep(PAUSE)
        logged_before = len(log_text(scheduler))
        for process in reversed(frozen[1:]):
            process.signal(signal.SIGCONT)
        # The scheduler sweeps about every second: it looks at the silent agent before the agent wakes.
        time.sleep(AGENT_WAKES_AFTER)
        # It did, within that wait: the sweep's look at the agent API, back after the pause, is in its log.
        assert "The agent API" in log_text(scheduler)[logged_before:], scheduler.tail()
    finally:
        for process in frozen:
            process.signal(signal.SIGCONT)

    # Heard again through the agent API, and never declared unhealthy meanwhile.
    paused_heartbeat = agent_row(plane, "pause-a")["last_heartbeat"]
    wait_until(
        lambda: agent_row(plane, "pause-a")["last_heartbeat"] > paused_heartbeat, 60, "a heartbeat after the pause"
    )
    assert plane.wait_for_run("faults_plane_pause", run_id, timeout=120) == "success", logs(plane)
    assert [(j["try_number"], j["state"]) for j in settled_jobs(plane, "faults_plane_pause", run_id)] == [
        (1, "SUCCESS")
    ]
    assert [(t["try_number"], t["state"]) for t in task_instances(plane, "faults_plane_pause", run_id)] == [
        (1, "success")
    ]
    assert "on pause-a: the agent missed its heartbeats" not in plane.processes["scheduler"].log_path.read_text()
