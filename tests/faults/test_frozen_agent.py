"""A frozen agent (SIGSTOP past the health timeout) is fenced and cannot deliver a stale outcome."""

from __future__ import annotations

import signal
import time

import pytest

from tests.e2e.test_admin import Admin
from tests.faults.conftest import (
    HEALTH_TIMEOUT,
    SLACK,
    Agents,
    history,
    jobs,
    log_text,
    logs,
    settled_jobs,
    task_instances,
    trigger,
    wait_running,
)
from tether.embedded import Plane, wait_until

pytestmark = pytest.mark.timeout(300)


def test_a_frozen_agent_is_fenced_and_its_stale_outcome_refused(plane: Plane, agents: Agents, admin: Admin) -> None:
    frozen = agents.start("frozen-a", queues="frozenq", slots="1")
    run_id = trigger(plane, "faults_frozen")
    wait_running(plane, "faults_frozen", run_id)
    frozen.process.signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    agents.start("frozen-b", queues="frozenq", slots="1")

    wait_until(
        lambda: jobs(plane, "faults_frozen", run_id)[0]["state"] == "FAILED",
        HEALTH_TIMEOUT + SLACK,
        "the frozen agent's job failed",
    )
    stale = jobs(plane, "faults_frozen", run_id)[0]["id"]
    assert admin.call("GET", "/agents/frozen-a")["status"] == "UNHEALTHY"
    # The task process was not frozen: it runs on until Airflow fences it, or finishes into a
    # task instance that is no longer running. Wake the agent only once that try is over.
    wait_until(lambda: history(plane, "faults_frozen", run_id), 60, "the first try recorded as over")
    time.sleep(max(0.0, 27 - (time.monotonic() - stopped_at)))  # past the 25 s the task would have taken
    frozen.process.signal(signal.SIGCONT)

    assert plane.wait_for_run("faults_frozen", run_id, timeout=120) == "success", logs(plane)
    wait_until(lambda: admin.call("GET", "/agents/frozen-a")["status"] == "HEALTHY", 20, "the woken agent healthy")
    wait_until(
        lambda: "finished with exit code" in frozen.process.log_path.read_text(),
        30,
        "the woken agent reaping its stale task",
    )
    # Room for the stale report to arrive, were it to be accepted: it does arrive within it,
    # as the API server's access log (Airflow's, a line for every call answered) shows.
    wait_until(
        lambda: f"/jobs/{stale}/report query=" in log_text(plane.processes["api-server"]),
        3,
        "the stale report answered",
    )
    settled = settled_jobs(plane, "faults_frozen", run_id)
    assert [(j["try_number"], j["state"], j["agent_name"]) for j in settled] == [
        (1, "FAILED", "frozen-a"),
        (2, "SUCCESS", "frozen-b"),
    ]
    assert "missed its heartbeats" in settled[0]["reason"]
    assert [(t, n, s) for t, n, s in history(plane, "faults_frozen", run_id)] in (
        [("nap", 1, "failed")],
        [("nap", 1, "up_for_retry")],
    )
    assert [(t["try_number"], t["state"]) for t in task_instances(plane, "faults_frozen", run_id)] == [(2, "success")]
