"""DESIGN §6.2: an agent killed with SIGKILL is declared unhealthy, its work fails over, nothing is lost."""

from __future__ import annotations

import time

import pytest

from tests.e2e.test_admin import Admin
from tests.faults.conftest import (
    HEALTH_TIMEOUT,
    LEASE_TIMEOUT,
    SLACK,
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

pytestmark = pytest.mark.timeout(300)


def test_kill_9_fails_over_running_work_and_requeues_unstarted_leases(
    plane: Plane, agents: Agents, admin: Admin, token: str
) -> None:
    doomed = agents.start("kill-a", queues="killq", slots="1")
    long_run = trigger(plane, "faults_kill_long")
    first = wait_running(plane, "faults_kill_long", long_run)
    assert first["agent_name"] == "kill-a"

    # Three more tasks queue behind the busy agent; leasing them as that agent (its real
    # token and incarnation) leaves it holding leases it has not started when it dies.
    short_run = trigger(plane, "faults_kill_short")
    wait_until(
        lambda: [j["state"] for j in jobs(plane, "faults_kill_short", short_run)] == ["QUEUED"] * 3,
        60,
        "three short jobs queued",
    )
    row = agent_row(plane, "kill-a")
    with agent_api(plane, token) as api:
        leased = api.post(
            f"/agents/{row['id']}/lease",
            json={"incarnation": row["incarnation"], "free_slots": 3, "queues": ["killq"], "wait": 0},
        )
    assert leased.status_code == 200, leased.text
    assert len(leased.json()["leases"]) == 3
    assert {j["state"] for j in jobs(plane, "faults_kill_short", short_run)} == {"LEASED"}

    agents.start("kill-b", queues="killq", slots="4")
    agents.kill9(doomed)
    killed_at = time.monotonic()

    wait_until(
        lambda: admin.call("GET", "/agents/kill-a")["status"] == "UNHEALTHY",
        HEALTH_TIMEOUT + SLACK,
        "the killed agent reported UNHEALTHY",
    )
    unhealthy_after = time.monotonic() - killed_at
    wait_until(
        lambda: next(j for j in jobs(plane, "faults_kill_long", long_run) if j["try_number"] == 1)["state"] == "FAILED",
        HEALTH_TIMEOUT + SLACK,
        "the killed agent's running job failed",
    )
    failed_after = time.monotonic() - killed_at
    # Back in the queue (and maybe already taken by kill-b) well before their leases could expire.
    wait_until(
        lambda: all(
            j["state"] != "LEASED" or j["agent_name"] != "kill-a" for j in jobs(plane, "faults_kill_short", short_run)
        ),
        HEALTH_TIMEOUT + SLACK,
        "the killed agent's leases returned",
    )
    returned_after = time.monotonic() - killed_at
    assert max(unhealthy_after, failed_after, returned_after) < LEASE_TIMEOUT

    assert plane.wait_for_run("faults_kill_long", long_run, timeout=120) == "success", logs(plane)
    assert plane.wait_for_run("faults_kill_short", short_run, timeout=120) == "success", logs(plane)

    long_jobs = settled_jobs(plane, "faults_kill_long", long_run)
    assert [(j["try_number"], j["state"], j["agent_name"]) for j in long_jobs] == [
        (1, "FAILED", "kill-a"),
        (2, "SUCCESS", "kill-b"),
    ]
    assert "missed its heartbeats" in long_jobs[0]["reason"]
    assert [(t["try_number"], t["state"]) for t in task_instances(plane, "faults_kill_long", long_run)] == [
        (2, "success")
    ]
    # The unstarted leases used no retry: one job each, try 1, run by the survivor.
    short_jobs = settled_jobs(plane, "faults_kill_short", short_run)
    assert [(j["try_number"], j["state"], j["agent_name"]) for j in short_jobs] == [(1, "SUCCESS", "kill-b")] * 3
    assert {(t["try_number"], t["state"]) for t in task_instances(plane, "faults_kill_short", short_run)} == {
        (1, "success")
    }
