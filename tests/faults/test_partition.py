"""DESIGN §6.3: an agent cut off from the plane keeps its task, starts nothing, and delivers late; never two successes.

The agent reaches the plane through a ``Link`` the test cuts: open connections
are closed and new ones refused.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from tests.faults.conftest import (
    HEALTH_TIMEOUT,
    SLACK,
    Agents,
    Link,
    agent_row,
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


def test_an_outcome_reached_during_a_partition_is_delivered_once_the_link_is_back(
    plane: Plane, agents: Agents, tmp_path_factory: pytest.TempPathFactory
) -> None:
    release = tmp_path_factory.mktemp("partition") / "release"
    link = Link(plane.port)
    try:
        # The link carries the agent's own calls; its task reaches the Execution API directly,
        # so the task can finish while the agent cannot tell the plane.
        agent = agents.start(
            "part-a",
            queues="partq",
            slots="1",
            plane_url=link.url,
            execution_api_url=f"{plane.url}/execution/",
            env={"FAULTS_RELEASE": str(release)},
        )
        run_id = trigger(plane, "faults_partition_short")
        wait_running(plane, "faults_partition_short", run_id)
        # Cut just after a heartbeat, so the cut stays shorter than the health timeout.
        seen = agent_row(plane, "part-a")["last_heartbeat"]
        wait_until(lambda: agent_row(plane, "part-a")["last_heartbeat"] != seen, 10, "a heartbeat")
        link.cut()
        cut_at = time.monotonic()
        release.touch()
        later = trigger(plane, "faults_partition_short")
        wait_until(
            lambda: "Could not report job" in agent.process.log_path.read_text(), 8, "the report failing in the cut"
        )
        wait_until(lambda: jobs(plane, "faults_partition_short", later), 5, "a second job queued")
        assert time.monotonic() - cut_at < HEALTH_TIMEOUT - 2, "the cut must stay shorter than the health timeout"
        assert [j["state"] for j in jobs(plane, "faults_partition_short", later)] == ["QUEUED"]
        assert [j["state"] for j in jobs(plane, "faults_partition_short", run_id)] == ["RUNNING"]
        restored = datetime.now(UTC)
        link.restore()

        delivered = settled_jobs(plane, "faults_partition_short", run_id, timeout=HEALTH_TIMEOUT + SLACK)
        assert [(j["try_number"], j["state"], j["agent_name"]) for j in delivered] == [(1, "SUCCESS", "part-a")]
        assert delivered[0]["finished_at"] >= restored
        assert plane.wait_for_run("faults_partition_short", run_id, timeout=30) == "success", logs(plane)
        assert plane.wait_for_run("faults_partition_short", later, timeout=60) == "success", logs(plane)
        assert [(j["try_number"], j["agent_name"]) for j in settled_jobs(plane, "faults_partition_short", later)] == [
            (1, "part-a")
        ]
        assert "missed its heartbeats" not in agent.process.log_path.read_text()
    finally:
        link.close()


def test_a_task_failed_by_the_plane_during_a_partition_is_fenced_never_succeeding_twice(
    plane: Plane, agents: Agents
) -> None:
    link = Link(plane.port)
    try:
        cut_off = agents.start("part-b", queues="partq2", slots="1", plane_url=link.url)
        run_id = trigger(plane, "faults_partition_long")
        wait_running(plane, "faults_partition_long", run_id)
        agents.start("part-c", queues="partq2", slots="1")
        link.cut()
        wait_until(
            lambda: jobs(plane, "faults_partition_long", run_id)[0]["state"] == "FAILED",
            HEALTH_TIMEOUT + SLACK,
            "the plane failing the unreachable agent's job",
        )
        stale = jobs(plane, "faults_partition_long", run_id)[0]["id"]
        assert plane.wait_for_run("faults_partition_long", run_id, timeout=90) == "success", logs(plane)
        link.restore()
        wait_until(
            lambda: "finished with exit code" in cut_off.process.log_path.read_text(),
            60,
            "the stale task stopped once the link was back",
        )
        # Room for the stale report to arrive, were it to be accepted: it does arrive within it,
        # as the API server's access log (Airflow's, a line for every call answered) shows.
        wait_until(
            lambda: f"/jobs/{stale}/report query=" in log_text(plane.processes["api-server"]),
            3,
            "the stale report answered",
        )
    finally:
        link.close()
    settled = settled_jobs(plane, "faults_partition_long", run_id)
    assert [(j["try_number"], j["state"], j["agent_name"]) for j in settled] == [
        (1, "FAILED", "part-b"),
        (2, "SUCCESS", "part-c"),
    ]
    assert history(plane, "faults_partition_long", run_id) in (
        [("nap", 1, "failed")],
        [("nap", 1, "up_for_retry")],
    )
    assert [(t["try_number"], t["state"]) for t in task_instances(plane, "faults_partition_long", run_id)] == [
        (2, "success")
    ]
