"""DESIGN §6.5: on SIGTERM an agent stops leasing, drains within its timeout, then terminates and reports."""

from __future__ import annotations

import signal
import time

import pytest

from tests.faults.conftest import LEASE_WAIT, Agents, jobs, logs, settled_jobs, task_instances, trigger, wait_running
from tether.embedded import Plane, wait_until

pytestmark = pytest.mark.timeout(300)


def test_sigterm_drains_the_running_task_and_leases_nothing_new(
    plane: Plane, agents: Agents, tmp_path_factory: pytest.TempPathFactory
) -> None:
    release = tmp_path_factory.mktemp("drain") / "release"
    held = {"FAULTS_RELEASE": str(release)}
    agent = agents.start("drain-a", queues="drainq", slots="2", env=held)
    run_id = trigger(plane, "faults_drain")
    wait_running(plane, "faults_drain", run_id)
    agent.process.signal(signal.SIGTERM)
    wait_until(lambda: agent.health("/readyz") == 503, 10, "the draining agent not ready")
    # Work queued while it drains stays in the queue, though the agent has a free slot. The task it
    # drains is held meanwhile: the agent has the job in sight for as long as a poll for work lasts.
    later = trigger(plane, "faults_drain")
    wait_until(lambda: [j["state"] for j in jobs(plane, "faults_drain", later)] == ["QUEUED"], 60, "new job queued")
    time.sleep(LEASE_WAIT)
    assert agent.process.alive(), "the agent must still be draining"
    assert [j["state"] for j in jobs(plane, "faults_drain", later)] == ["QUEUED"]
    release.touch()

    assert agent.process.popen.wait(60) == 0, agent.process.tail()
    assert plane.wait_for_run("faults_drain", run_id, timeout=30) == "success", logs(plane)
    assert [(j["state"], j["agent_name"]) for j in settled_jobs(plane, "faults_drain", run_id)] == [
        ("SUCCESS", "drain-a")
    ]
    assert [j["state"] for j in jobs(plane, "faults_drain", later)] == ["QUEUED"]
    assert "Drained: every task finished" in agent.process.log_path.read_text()

    # The job it left alone runs on the next agent, first try. Not draining, that agent takes it
    # within the same wait.
    agents.start("drain-b", queues="drainq", slots="2", env=held)
    wait_until(
        lambda: [j["state"] for j in jobs(plane, "faults_drain", later)] != ["QUEUED"],
        LEASE_WAIT,
        "the job taken by an agent that is not draining",
    )
    assert plane.wait_for_run("faults_drain", later, timeout=90) == "success", logs(plane)
    assert [(j["try_number"], j["agent_name"]) for j in settled_jobs(plane, "faults_drain", later)] == [(1, "drain-b")]


def test_a_task_outliving_the_drain_timeout_is_terminated_reported_and_retried(plane: Plane, agents: Agents) -> None:
    agent = agents.start("drain-c", queues="drainq2", slots="1", drain_timeout="3")
    run_id = trigger(plane, "faults_drain_cut")
    wait_running(plane, "faults_drain_cut", run_id)
    agents.start("drain-d", queues="drainq2", slots="1")
    agent.process.signal(signal.SIGTERM)
    stopped_at = time.monotonic()
    assert agent.process.popen.wait(60) == 0, agent.process.tail()
    # Drain timeout, then SIGTERM to the task, SIGKILL after the kill grace at worst.
    assert time.monotonic() - stopped_at < 3 + 10 + 10
    assert plane.wait_for_run("faults_drain_cut", run_id, timeout=120) == "success", logs(plane)
    cut = settled_jobs(plane, "faults_drain_cut", run_id)
    assert [(j["try_number"], j["state"], j["agent_name"]) for j in cut] == [
        (1, "FAILED", "drain-c"),
        (2, "SUCCESS", "drain-d"),
    ]
    assert "the agent stopped before the task finished" in cut[0]["reason"]
    assert [(t["try_number"], t["state"]) for t in task_instances(plane, "faults_drain_cut", run_id)] == [
        (2, "success")
    ]
