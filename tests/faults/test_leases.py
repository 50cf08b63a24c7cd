"""DESIGN §6.1: a lease never confirmed at the start gate expires; the job runs elsewhere on the same try."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from tests.faults.conftest import LEASE_TIMEOUT, SLACK, Agents, agent_api, jobs, logs, settled_jobs, trigger
from tether.embedded import Plane, wait_until

pytestmark = pytest.mark.timeout(240)


def test_an_unconfirmed_lease_expires_and_the_job_runs_elsewhere_on_the_same_try(
    plane: Plane, agents: Agents, token: str
) -> None:
    run_id = trigger(plane, "faults_unconfirmed")
    wait_until(lambda: [j["state"] for j in jobs(plane, "faults_unconfirmed", run_id)] == ["QUEUED"], 60, "job queued")

    # An agent that leases and then never passes the start gate, yet stays healthy.
    incarnation = str(uuid.uuid4())
    stop = threading.Event()
    with agent_api(plane, token) as api:
        registered = api.post(
            "/agents/register",
            json={
                "name": "lease-ghost",
                "incarnation": incarnation,
                "tether_version": "0",
                "airflow_version": "3",
                "python_version": "3",
                "hostname": "ghost",
                "queues": ["leaseq"],
                "slots": 1,
            },
        )
        assert registered.status_code == 200, registered.text
        ghost = registered.json()["agent_id"]

        def keep_alive() -> None:
            with agent_api(plane, token) as beat:
                while not stop.wait(1):
                    beat.post(f"/agents/{ghost}/heartbeat", json={"incarnation": incarnation, "free_slots": 0})

        pulse = threading.Thread(target=keep_alive, daemon=True)
        pulse.start()
        try:
            leased = api.post(
                f"/agents/{ghost}/lease",
                json={"incarnation": incarnation, "free_slots": 1, "queues": ["leaseq"], "wait": 0},
            )
            leased_at = time.monotonic()
            assert leased.status_code == 200 and len(leased.json()["leases"]) == 1, leased.text
            job_id = leased.json()["leases"][0]["job_id"]
            # A real agent on the same queue waits: the job is the ghost's until the lease runs out.
            real = agents.start("lease-real", queues="leaseq", slots="1")
            ready_after = time.monotonic() - leased_at
            assert [(j["state"], j["agent_name"]) for j in jobs(plane, "faults_unconfirmed", run_id)] == [
                ("LEASED", "lease-ghost")
            ]
            wait_until(
                lambda: [j["agent_name"] for j in jobs(plane, "faults_unconfirmed", run_id)] == ["lease-real"],
                LEASE_TIMEOUT + SLACK,
                "the expired lease taken by the real agent",
            )
            taken_after = time.monotonic() - leased_at
            # Asking for work for at least SLACK seconds of the lease, the real agent did not get the
            # job; once the lease ran out, it did within the same SLACK seconds.
            assert ready_after <= LEASE_TIMEOUT - SLACK, "the real agent must be up while the lease holds"
            assert LEASE_TIMEOUT - 1 <= taken_after <= LEASE_TIMEOUT + SLACK
            late = api.post(f"/agents/{ghost}/jobs/{job_id}/start", json={"incarnation": incarnation})
            assert late.status_code == 409, late.text
            assert late.json()["reason"] in ("lease_expired", "not_holder")
        finally:
            stop.set()
            pulse.join(timeout=5)

    assert plane.wait_for_run("faults_unconfirmed", run_id, timeout=60) == "success", logs(plane)
    assert [
        (j["try_number"], j["state"], j["agent_name"]) for j in settled_jobs(plane, "faults_unconfirmed", run_id)
    ] == [(1, "SUCCESS", "lease-real")]
    ti = plane.query(
        "SELECT try_number, state FROM task_instance WHERE dag_id = 'faults_unconfirmed' AND run_id = :r", r=run_id
    )
    assert [tuple(row) for row in ti] == [(1, "success")]
    assert real.process.alive()
