"""DESIGN §6.1 under contention: two agents long-polling one queue, 200 jobs, each started exactly once."""

from __future__ import annotations

import pytest

from tests.faults.conftest import Agents, logs, settled_jobs, task_instances, trigger
from tether.embedded import Plane

pytestmark = pytest.mark.timeout(420)


def test_two_agents_on_one_queue_start_each_of_200_jobs_exactly_once(plane: Plane, agents: Agents) -> None:
    agents.start("many-a", queues="manyq", slots="8")
    agents.start("many-b", queues="manyq", slots="8")
    run_id = trigger(plane, "faults_many")
    assert plane.wait_for_run("faults_many", run_id, timeout=360) == "success", logs(plane)

    settled = settled_jobs(plane, "faults_many", run_id, timeout=60)
    assert len(settled) == 200
    assert sorted(j["map_index"] for j in settled) == list(range(200))
    assert {(j["try_number"], j["state"]) for j in settled} == {(1, "SUCCESS")}
    assert all(j["started_at"] is not None for j in settled)
    by_agent = {name: sum(j["agent_name"] == name for j in settled) for name in ("many-a", "many-b")}
    assert sum(by_agent.values()) == 200 and all(by_agent.values()), by_agent
    tis = task_instances(plane, "faults_many", run_id)
    assert len(tis) == 200 and {(t["try_number"], t["state"]) for t in tis} == {(1, "success")}
    # Airflow saw each try start once: no second attempt of any task instance was recorded.
    assert not plane.query("SELECT 1 FROM task_instance_history WHERE dag_id = 'faults_many' AND run_id = :r", r=run_id)
