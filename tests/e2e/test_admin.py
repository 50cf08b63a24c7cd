"""Operators acting on live agents, end to end on PostgreSQL: cordon, delete, revoke, expiry, IP ranges.

The admin calls go through the real REST API with a real login to Airflow's
simple auth manager; agents are real processes.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tether.embedded import AgentProcess, Plane, start_agent, wait_until


class Admin:
    """A logged-in Airflow user calling Tether's REST API."""

    def __init__(self, plane: Plane, username: str) -> None:
        self.http = plane.rest_client(username, path="/tether/v1", timeout=10)

    def call(self, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
        response = self.http.request(method, path, json=body)
        assert response.status_code == expect, response.text
        return response.json()


@pytest.fixture(scope="module")
def admin(pg_plane: Plane) -> Admin:
    return Admin(pg_plane, "admin")


@pytest.fixture
def plane(pg_plane: Plane) -> Plane:
    return pg_plane


def _token(admin: Admin, name: str) -> dict[str, Any]:
    return admin.call("POST", "/tokens", {"name": name}, expect=201)


def _agent(admin: Admin, name: str) -> dict[str, Any]:
    return admin.call("GET", f"/agents/{name}")


def _ready(agent: AgentProcess) -> None:
    wait_until(lambda: agent.health("/readyz") == 200, 60, f"agent {agent.name} ready")


def _ti_state(plane: Plane, dag_id: str, run_id: str) -> str | None:
    rows = plane.query("SELECT state FROM task_instance WHERE dag_id = :d AND run_id = :r", d=dag_id, r=run_id)
    return rows[0][0] if rows else None


def _job_state(plane: Plane, dag_id: str, run_id: str) -> str | None:
    rows = plane.query("SELECT state FROM tether_job WHERE dag_id = :d AND run_id = :r", d=dag_id, r=run_id)
    return rows[0][0] if rows else None


def test_viewer_may_read_but_not_change(plane: Plane, admin: Admin) -> None:
    viewer = Admin(plane, "viewer")
    assert isinstance(viewer.call("GET", "/agents"), list)
    refused = viewer.call("POST", "/tokens", {"name": "nope"}, expect=403)
    assert "viewer" in refused["detail"]
    anonymous = httpx.get(f"{plane.url}/tether/v1/tokens", timeout=10)
    assert anonymous.status_code == 401


def test_cordon_lets_running_work_finish_and_holds_new_work_until_uncordon(plane: Plane, admin: Admin) -> None:
    token = _token(admin, "cordon")
    agent = start_agent(plane, "cordon-agent", token["secret"], queues="cordonq", slots="2")
    _ready(agent)
    plane.wait_for_dag("e2e_cordon_long")
    long_run = plane.trigger("e2e_cordon_long")
    wait_until(lambda: _ti_state(plane, "e2e_cordon_long", long_run) == "running", 60, "long task running")
    cordoned = admin.call("POST", "/agents/cordon-agent/action", {"action": "CORDON", "reason": "maintenance"})
    assert cordoned["cordoned"] is True and cordoned["cordoned_by"] == "admin"
    next_run = plane.trigger("e2e_cordon_next")
    assert plane.wait_for_run("e2e_cordon_long", long_run, timeout=60) == "success"
    # The cordoned agent is alive and idle, yet the queued task is not handed to it.
    time.sleep(3)
    assert _ti_state(plane, "e2e_cordon_next", next_run) == "queued"
    assert _job_state(plane, "e2e_cordon_next", next_run) == "QUEUED"
    assert _agent(admin, "cordon-agent")["status"] == "HEALTHY"
    admin.call("POST", "/agents/cordon-agent/action", {"action": "UNCORDON"})
    # Uncordoned, the agent takes it within the same 3 s.
    wait_until(lambda: _job_state(plane, "e2e_cordon_next", next_run) != "QUEUED", 3, "the job taken once uncordoned")
    assert plane.wait_for_run("e2e_cordon_next", next_run, timeout=60) == "success"


def test_a_deleted_live_agent_registers_again(plane: Plane, admin: Admin) -> None:
    token = _token(admin, "delete")
    agent = start_agent(plane, "delete-agent", token["secret"], queues="deleteq", slots="1")
    _ready(agent)
    agent_id = _agent(admin, "delete-agent")["id"]
    deleted = admin.call("DELETE", f"/agents/{agent_id}")
    assert deleted["status"] == "TERMINATED"
    wait_until(lambda: _agent(admin, "delete-agent")["status"] == "HEALTHY", 15, "the deleted agent to come back")
    back = _agent(admin, "delete-agent")
    assert back["deleted_at"] is None and back["id"] == agent_id
    assert agent.process.alive()


def test_revoking_a_token_in_use_refuses_its_agent_and_fails_its_task(plane: Plane, admin: Admin) -> None:
    token = _token(admin, "revoke")
    agent = start_agent(plane, "revoke-agent", token["secret"], queues="revokeq", slots="1")
    _ready(agent)
    plane.wait_for_dag("e2e_revoke")
    run_id = plane.trigger("e2e_revoke")
    wait_until(lambda: _ti_state(plane, "e2e_revoke", run_id) == "running", 60, "the task running")
    admin.call("POST", f"/tokens/{token['id']}/revoke")
    revoked_at = time.monotonic()
    probe = {"incarnation": str(uuid.uuid4()), "free_slots": 1}
    agent_id = _agent(admin, "revoke-agent")["id"]

    def refused() -> bool:
        response = httpx.post(
            f"{plane.url}/tether/v1/agents/{agent_id}/heartbeat",
            json=probe,
            headers={"Authorization": f"Bearer {token['secret']}", "X-Tether-Protocol": "2"},
            timeout=5,
        )
        return response.status_code == 401 and response.json()["reason"] == "token_revoked"

    wait_until(refused, 5, "the revoked token to be refused")
    assert time.monotonic() - revoked_at <= 5
    assert _agent(admin, "revoke-agent")["status"] == "UNHEALTHY"
    assert plane.wait_for_run("e2e_revoke", run_id, timeout=90) == "failed"
    jobs = plane.query("SELECT state, reason FROM tether_job WHERE dag_id = 'e2e_revoke'")
    assert [row[0] for row in jobs] == ["FAILED"] and "revoked" in jobs[0][1]
    wait_until(lambda: "token_revoked" in agent.process.log_path.read_text(), 15, "the agent to log why")


def test_an_expired_token_is_refused_and_its_agent_fenced(plane: Plane, admin: Admin) -> None:
    token = _token(admin, "expire")
    agent = start_agent(plane, "expire-agent", token["secret"], queues="expireq", slots="1")
    _ready(agent)
    plane.wait_for_dag("e2e_expire")
    run_id = plane.trigger("e2e_expire")
    wait_until(lambda: _ti_state(plane, "e2e_expire", run_id) == "running", 60, "the task running")
    # Brought forward to a moment two seconds away: the agent is accepted until then, refused from then on.
    soon = datetime.now(UTC) + timedelta(seconds=2)
    admin.call("PATCH", f"/tokens/{token['id']}", {"expires": soon.isoformat()})
    wait_until(lambda: "token_expired" in agent.process.log_path.read_text(), 20, "the agent refused for expiry")
    assert admin.call("GET", f"/tokens/{token['id']}")["state"] == "expired"
    assert _agent(admin, "expire-agent")["status"] == "UNHEALTHY"
    assert plane.wait_for_run("e2e_expire", run_id, timeout=90) == "failed"


def test_an_agent_outside_the_allowed_ranges_is_refused_until_its_range_is_added(plane: Plane, admin: Admin) -> None:
    token = _token(admin, "ranges")
    admin.call("PUT", "/allowed-ip-ranges", {"ranges": ["203.0.113.0/24"]})
    try:
        agent = start_agent(plane, "range-agent", token["secret"], queues="rangeq", slots="1")
        wait_until(lambda: "127.0.0.1" in agent.process.log_path.read_text(), 30, "the refusal naming the address")
        assert "address_not_allowed" in agent.process.log_path.read_text()
        assert agent.health("/readyz") == 503
        admin.call("POST", "/allowed-ip-ranges", {"ranges": ["127.0.0.1/32"]})
        _ready(agent)
        plane.wait_for_dag("e2e_ranges")
        run_id = plane.trigger("e2e_ranges")
        assert plane.wait_for_run("e2e_ranges", run_id, timeout=60) == "success"
    finally:
        admin.call("PUT", "/allowed-ip-ranges", {"ranges": []})
    actions = [entry["action"] for entry in admin.call("GET", "/audit?target_type=allowed_ip_ranges")]
    assert actions[:3] == ["allowed_ip_ranges.set", "allowed_ip_ranges.add", "allowed_ip_ranges.set"]
