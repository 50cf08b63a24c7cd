"""The core path, end to end: a real Airflow 3.3 plane runs its tasks on real Tether agents."""

from __future__ import annotations

import uuid
from datetime import datetime

import httpx
import psutil

from tests.e2e.conftest import Deployment, dump_logs
from tether import protocol
from tether.embedded import wait_until


def test_chain_and_fanout_succeed_on_one_agent(deployment: Deployment) -> None:
    run_id, state = deployment.run_dag("e2e_chain_fanout")
    assert state == "success", dump_logs(deployment.plane)
    tasks = deployment.plane.task_states("e2e_chain_fanout", run_id)
    assert len(tasks) == 30 and set(tasks.values()) == {"success"}
    jobs = deployment.jobs("e2e_chain_fanout", run_id)
    assert {job["agent_name"] for job in jobs} == {"alpha"}
    assert {job["state"] for job in jobs} == {"SUCCESS"}


def test_every_task_runs_on_an_agent_serving_its_queue(deployment: Deployment) -> None:
    run_id, state = deployment.run_dag("e2e_queues")
    assert state == "success", dump_logs(deployment.plane)
    jobs = deployment.jobs("e2e_queues", run_id)
    assert len(jobs) == 8
    for job in jobs:
        assert job["agent_name"] == job["queue"], job
    hostnames = deployment.plane.query(
        "SELECT hostname FROM task_instance WHERE dag_id = 'e2e_queues' AND run_id = :r", r=run_id
    )
    assert all(row[0] for row in hostnames), "every task instance records the host it ran on"


def test_an_agent_without_warm_start_keeps_no_spares_and_runs_its_tasks(deployment: Deployment) -> None:
    run_id, state = deployment.run_dag("e2e_queues")
    assert state == "success", dump_logs(deployment.plane)
    assert {job["state"] for job in deployment.jobs("e2e_queues", run_id) if job["agent_name"] == "beta"} == {"SUCCESS"}

    def children(name: str) -> list[psutil.Process]:
        return psutil.Process(deployment.agents[name].process.pid).children(recursive=True)

    # Alpha (warm start on) keeps its launcher and spares between tasks; beta forks only for a task.
    wait_until(lambda: len(children("alpha")) >= 2, 30, "alpha's launcher and a spare")
    wait_until(lambda: not children("beta"), 30, "beta's finished tasks to be reaped")


def test_xcom_passes_a_value_between_tasks(deployment: Deployment) -> None:
    run_id, state = deployment.run_dag("e2e_xcom")
    assert state == "success", dump_logs(deployment.plane)
    assert deployment.plane.task_states("e2e_xcom", run_id) == {"produce": "success", "consume": "success"}


def test_a_task_that_fails_once_succeeds_on_retry(deployment: Deployment) -> None:
    run_id, state = deployment.run_dag("e2e_retry")
    assert state == "success", dump_logs(deployment.plane)
    # Each try is a job of its own; the failed try ran to completion and reported itself,
    # so its process outcome is a clean exit, as with Airflow's own executors.
    assert sorted(job["try_number"] for job in deployment.jobs("e2e_retry", run_id)) == [1, 2]
    first_try = deployment.plane.query(
        "SELECT state FROM task_instance_history WHERE dag_id = 'e2e_retry' AND run_id = :r AND try_number = 1",
        r=run_id,
    )
    assert [row[0] for row in first_try] in (["failed"], ["up_for_retry"])
    final = deployment.plane.query(
        "SELECT try_number, state FROM task_instance WHERE dag_id = 'e2e_retry' AND run_id = :r", r=run_id
    )
    assert [tuple(row) for row in final] == [(2, "success")]


def test_pool_slots_never_exceed_an_agents_slots(deployment: Deployment) -> None:
    run_id, state = deployment.run_dag("e2e_pool_slots")
    assert state == "success", dump_logs(deployment.plane)
    jobs = deployment.jobs("e2e_pool_slots", run_id)
    assert len(jobs) == 6 and {job["agent_name"] for job in jobs} == {"alpha"}
    events: list[tuple[datetime, int]] = []
    for job in jobs:
        events.append((_aware(job["started_at"]), job["pool_slots"]))
        events.append((_aware(job["finished_at"]), -job["pool_slots"]))
    in_use = peak = 0
    # Ends sort before starts at the same instant: a slot freed can be taken at once.
    for _, delta in sorted(events, key=lambda e: (e[0], e[1])):
        in_use += delta
        peak = max(peak, in_use)
    assert peak <= 4
    assert peak == 4, "two 2-slot tasks should have shared the 4-slot agent"


def _aware(value: object) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value.replace(tzinfo=None)


def test_bad_tokens_and_bodies_are_refused_by_the_real_api_server(deployment: Deployment) -> None:
    url = f"{deployment.plane.url}/tether/v1/agents/register"
    before = deployment.plane.query("SELECT id, incarnation, last_heartbeat FROM tether_agent ORDER BY id")
    body = {
        "name": "intruder",
        "incarnation": str(uuid.uuid4()),
        "tether_version": "0",
        "airflow_version": "3",
        "python_version": "3",
        "hostname": "h",
        "queues": ["default"],
        "slots": 1,
    }
    speaks = {protocol.PROTOCOL_HEADER: str(protocol.PROTOCOL_VERSION)}
    no_token = httpx.post(url, json=body, headers=speaks, timeout=10)
    assert no_token.status_code == 401 and no_token.json()["reason"] == "no_token"
    bad_token = httpx.post(
        url, json=body, headers={"Authorization": "Bearer tether_0000000000_" + "x" * 43, **speaks}, timeout=10
    )
    assert bad_token.status_code == 401 and bad_token.json()["reason"] == "token_unknown"
    auth = {"Authorization": f"Bearer {deployment.token}", **speaks}
    malformed = httpx.post(url, json={**body, "slots": -3}, headers=auth, timeout=10)
    assert malformed.status_code == 422 and "slots" in malformed.json()["detail"]
    unknown = httpx.post(url, json={**body, "extra": True}, headers=auth, timeout=10)
    assert unknown.status_code == 422 and "extra" in unknown.json()["detail"]
    stranger = httpx.post(
        f"{deployment.plane.url}/tether/v1/agents/{uuid.uuid4()}/heartbeat",
        json={"incarnation": str(uuid.uuid4()), "free_slots": 1},
        headers=auth,
        timeout=10,
    )
    assert stranger.status_code == 404
    after_agents = deployment.plane.query("SELECT id, incarnation FROM tether_agent ORDER BY id")
    assert [tuple(r)[:2] for r in before] == [tuple(r) for r in after_agents]
    assert not deployment.plane.query("SELECT 1 FROM tether_agent WHERE name = 'intruder'")
