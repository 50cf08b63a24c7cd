"""DESIGN §6.4: restarting the API server or the scheduler loses no job; agents reconnect by themselves."""

from __future__ import annotations

import time

import pytest

from tests.faults.conftest import (
    Agents,
    agent_api,
    agent_row,
    jobs,
    logs,
    settled_jobs,
    task_instances,
    trigger,
    wait_running,
)
from tether.embedded import Plane, wait_until

pytestmark = pytest.mark.timeout(360)

OUTAGE = 30.0


def test_a_task_outlives_an_api_server_outage(plane: Plane, agents: Agents) -> None:
    agent = agents.start("api-a", queues="apiq", slots="1")
    run_id = trigger(plane, "faults_api_restart")
    wait_running(plane, "faults_api_restart", run_id)

    plane.processes["api-server"].stop()
    down_at = time.monotonic()
    wait_until(lambda: agent.health("/readyz") == 503, OUTAGE, "the agent noticing the plane is gone")
    time.sleep(max(0.0, OUTAGE - (time.monotonic() - down_at)))
    plane.start_component("api-server")
    plane.wait_for_api()

    wait_until(lambda: agent.health("/readyz") == 200, 60, "the agent reconnected by itself")
    assert agent.process.alive()
    assert plane.wait_for_run("faults_api_restart", run_id, timeout=120) == "success", logs(plane)
    assert [
        (j["try_number"], j["state"], j["agent_name"]) for j in settled_jobs(plane, "faults_api_restart", run_id)
    ] == [(1, "SUCCESS", "api-a")]
    assert [(t["try_number"], t["state"]) for t in task_instances(plane, "faults_api_restart", run_id)] == [
        (1, "success")
    ]
    assert not plane.query(
        "SELECT 1 FROM task_instance_history WHERE dag_id = 'faults_api_restart' AND run_id = :r", r=run_id
    )
    assert "Registered as api-a" in agent.process.log_path.read_text()


def test_a_restarted_scheduler_adopts_queued_leased_and_running_jobs(plane: Plane, agents: Agents, token: str) -> None:
    agents.start("sched-a", queues="schedq", slots="1")
    running = trigger(plane, "faults_sched_running")
    wait_running(plane, "faults_sched_running", running)
    waiting = trigger(plane, "faults_sched_waiting")
    wait_until(
        lambda: [j["state"] for j in jobs(plane, "faults_sched_waiting", waiting)] == ["QUEUED"] * 4,
        60,
        "four jobs queued behind the busy agent",
    )
    # One of them leased to the busy agent (its own token and incarnation) and not started.
    row = agent_row(plane, "sched-a")
    with agent_api(plane, token) as api:
        leased = api.post(
            f"/agents/{row['id']}/lease",
            json={"incarnation": row["incarnation"], "free_slots": 1, "queues": ["schedq"], "wait": 0},
        )
    assert leased.status_code == 200 and len(leased.json()["leases"]) == 1, leased.text
    states = sorted(j["state"] for j in jobs(plane, "faults_sched_waiting", waiting))
    assert states == ["LEASED", "QUEUED", "QUEUED", "QUEUED"]

    plane.processes["scheduler"].stop()
    time.sleep(5)
    plane.start_component("scheduler")

    assert plane.wait_for_run("faults_sched_running", running, timeout=120) == "success", logs(plane)
    assert plane.wait_for_run("faults_sched_waiting", waiting, timeout=120) == "success", logs(plane)
    for dag_id, run_id, count in (("faults_sched_running", running, 1), ("faults_sched_waiting", waiting, 4)):
        settled = settled_jobs(plane, dag_id, run_id)
        assert [(j["try_number"], j["state"], j["agent_name"]) for j in settled] == [(1, "SUCCESS", "sched-a")] * count
        tis = task_instances(plane, dag_id, run_id)
        assert [(t["try_number"], t["state"]) for t in tis] == [(1, "success")] * count
    assert not plane.query("SELECT 1 FROM tether_job WHERE queue = 'schedq' AND state NOT IN ('SUCCESS')")
