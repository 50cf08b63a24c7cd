"""DESIGN §6: an agent whose token the plane refuses stops its running tasks at once, and says so once."""

from __future__ import annotations

import time

import psutil
import pytest

from tests.e2e.test_admin import Admin
from tests.faults.conftest import Agents, jobs, log_text, trigger, wait_running
from tether.embedded import Plane, start_agent, wait_until

pytestmark = pytest.mark.timeout(300)


def _task_processes(dag_id: str) -> list[psutil.Process]:
    """The supervisor and task processes of ``dag_id``'s tasks: their titles name the DAG."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(dag_id in part for part in process.info["cmdline"] or ()):
            found.append(process)
    return found


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_revoked_agent_stops_its_running_task_at_once_and_reports_nothing(
    plane: Plane, agents: Agents, admin: Admin
) -> None:
    token = plane.create_token("fenced-agents")
    agent = start_agent(plane, "fenced-a", token, queues="fenceq", slots="1", max_backoff="2")
    agents.started.append(agent)
    wait_until(lambda: agent.health("/readyz") == 200, 90, "agent ready")
    run_id = trigger(plane, "faults_fenced")
    job = wait_running(plane, "faults_fenced", run_id)
    assert _task_processes("faults_fenced"), "the task runs on the agent"

    revoked = admin.http.post(f"/tokens/{token.split('_')[1]}/revoke")
    assert revoked.is_success, revoked.text
    started = time.monotonic()
    wait_until(lambda: not _task_processes("faults_fenced"), 60, "the task processes gone")
    gone = time.monotonic() - started
    # The plane failed the job when it revoked the token; the agent, refused, did not report over it.
    (row,) = [j for j in jobs(plane, "faults_fenced", run_id) if j["id"] == job["id"]]
    assert row["state"] == "FAILED" and "revoked" in (row["reason"] or "")
    metrics = agent.metrics()
    assert _metric(metrics, "tether_agent_fenced_jobs_total") == 1
    assert _metric(metrics, 'tether_agent_jobs_total{outcome="fenced"}') == 1

    # The refusal is logged once, however often the agent asks again (every 2 s at most here) ...
    time.sleep(8)
    log = log_text(agent.process)
    assert log.count("stopping its 1 running task(s) now") == 1
    refusals = [line for line in log.splitlines() if "The plane refuses this agent's" in line]
    assert len(refusals) == 1, refusals
    # ... and a new refusal state is logged again: the positive control of the count above.
    admin.http.put("/allowed-ip-ranges", json={"ranges": ["192.0.2.0/24"]})
    try:
        wait_until(lambda: "address_not_allowed" in log_text(agent.process), 30, "the next refusal logged")
    finally:
        admin.http.put("/allowed-ip-ranges", json={"ranges": []})
    print(f"\ntoken revoked -> task processes gone in {gone:.1f}s (heartbeat every 4 s)")
