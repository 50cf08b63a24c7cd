"""The admin REST API on a real database: tokens, agents and IP ranges, with their audit trail."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.integration.conftest import SETTINGS, SPEAKS
from tether.plane.models import AgentToken
from tether.plane.store import Store, utcnow

ADMIN = {"X-Test-User": "admin"}
VIEWER = {"X-Test-User": "viewer"}


def _register(client: TestClient, token: str, name: str = "a1", incarnation: str | None = None) -> Any:
    body = {
        "name": name,
        "incarnation": incarnation or str(uuid.uuid4()),
        "tether_version": "0.1.0",
        "airflow_version": "1.3.2",
        "python_version": "3.11",
        "hostname": "host-1",
        "queues": ["default", "etl"],
        "slots": 4,
        "labels": {"zone": "eu"},
    }
    return client.post("/v1/agents/register", json=body, headers={"Authorization": f"Bearer {token}", **SPEAKS})


def test_token_lifecycle_shows_the_secret_once(client: TestClient) -> None:
    created = client.post(
        "/v1/tokens", json={"name": "prod", "description": "EU agents", "expires_in_days": 30}, headers=ADMIN
    )
    assert created.status_code == 201, created.text
    body = created.json()
    secret = body["secret"]
    assert secret.startswith(f"tether_{body['id']}_") and body["state"] == "active"
    assert body["created_by"] == "admin"
    listed = client.get("/v1/tokens", headers=VIEWER).json()
    assert [t["name"] for t in listed] == ["prod"]
    assert secret not in str(listed) and "secret" not in listed[0]
    shown = client.get(f"/v1/tokens/{body['id']}", headers=VIEWER).json()
    assert shown["token"].startswith(f"tether_{body['id']}") and shown["description"] == "EU agents"
    assert _register(client, secret).status_code == 200
    assert client.get(f"/v1/tokens/{body['id']}", headers=VIEWER).json()["last_used_at"] is not None
    revoked = client.post(f"/v1/tokens/{body['id']}/revoke", headers=ADMIN).json()
    assert revoked["state"] == "revoked" and revoked["revoked_by"] == "admin"
    refused = _register(client, secret, name="a2")
    assert refused.status_code == 401 and refused.json()["reason"] == "token_revoked"


def test_token_names_are_unique_among_live_tokens(client: TestClient) -> None:
    first = client.post("/v1/tokens", json={"name": "dup"}, headers=ADMIN).json()
    again = client.post("/v1/tokens", json={"name": "dup"}, headers=ADMIN)
    assert again.status_code == 409 and "already exists" in again.json()["detail"]
    client.post(f"/v1/tokens/{first['id']}/revoke", headers=ADMIN)
    assert client.post("/v1/tokens", json={"name": "dup"}, headers=ADMIN).status_code == 201


def test_the_token_limit_names_itself_and_the_fix(client: TestClient) -> None:
    for i in range(SETTINGS.max_agent_tokens):
        assert client.post("/v1/tokens", json={"name": f"t{i}"}, headers=ADMIN).status_code == 201
    refused = client.post("/v1/tokens", json={"name": "one-too-many"}, headers=ADMIN)
    assert refused.status_code == 422
    detail = refused.json()["detail"]
    assert f"at most {SETTINGS.max_agent_tokens}" in detail and "[tether] max_agent_tokens" in detail


def test_expired_tokens_do_not_count_and_are_refused(client: TestClient, store: Store) -> None:
    created = client.post("/v1/tokens", json={"name": "short", "expires_in_days": 1}, headers=ADMIN).json()
    with store.transaction() as session:
        session.get(AgentToken, created["id"]).expires_at = utcnow() - timedelta(seconds=1)
    assert client.get(f"/v1/tokens/{created['id']}", headers=VIEWER).json()["state"] == "expired"
    refused = _register(client, created["secret"])
    assert refused.status_code == 401 and refused.json()["reason"] == "token_expired"
    assert client.post("/v1/tokens", json={"name": "short"}, headers=ADMIN).status_code == 201


@pytest.mark.parametrize(
    "body", [{"name": ""}, {"name": "x" * 200}, {"name": "ok", "expires_in_days": 0}, {"name": "ok", "extra": 1}]
)
def test_bad_token_requests_are_refused(client: TestClient, body: dict[str, Any]) -> None:
    assert client.post("/v1/tokens", json=body, headers=ADMIN).status_code == 422


def test_admin_endpoints_need_a_user_and_changes_need_an_admin(client: TestClient) -> None:
    assert client.get("/v1/tokens").status_code == 401
    assert client.get("/v1/agents").status_code == 401
    refused = client.post("/v1/tokens", json={"name": "x"}, headers=VIEWER)
    assert refused.status_code == 403 and "viewer" in refused.json()["detail"]
    assert client.put("/v1/allowed-ip-ranges", json={"ranges": []}, headers=VIEWER).status_code == 403
    assert client.get("/v1/tokens", headers=ADMIN).json() == []


def test_agents_are_listed_with_health_and_managed(client: TestClient, store: Store) -> None:
    issued, _ = store.create_token(name="agents")
    registered = _register(client, issued.text).json()
    agent_id = registered["agent_id"]
    listed = client.get("/v1/agents", headers=VIEWER).json()
    assert len(listed) == 1
    agent = listed[0]
    assert agent["status"] == "HEALTHY" and agent["cordoned"] is False
    assert (agent["queues"], agent["slots"], agent["free_slots"], agent["running_jobs"]) == (
        ["default", "etl"],
        4,
        4,
        0,
    )
    assert (agent["token_name"], agent["tether_version"], agent["airflow_version"]) == ("agents", "0.1.0", "1.3.2")
    cordoned = client.post(
        f"/v1/agents/{agent_id}/action", json={"action": "CORDON", "reason": "kernel upgrade"}, headers=ADMIN
    ).json()
    assert (cordoned["cordoned"], cordoned["cordon_reason"], cordoned["cordoned_by"]) == (
        True,
        "kernel upgrade",
        "admin",
    )
    # Cordon survives the agent restarting (a new incarnation taking the name once the old is gone).
    with store.transaction() as session:
        from tether.plane.models import Agent

        session.get(Agent, agent_id).last_heartbeat = utcnow() - timedelta(minutes=5)
    assert _register(client, issued.text).json()["cordoned"] is True
    by_name = client.post("/v1/agents/a1/action", json={"action": "UNCORDON"}, headers=ADMIN).json()
    assert by_name["cordoned"] is False and by_name["cordon_reason"] is None
    deleted = client.delete(f"/v1/agents/{agent_id}", headers=ADMIN).json()
    assert deleted["status"] == "TERMINATED" and deleted["deleted_by"] == "admin"
    assert client.get("/v1/agents/nope", headers=VIEWER).status_code == 404
    bad = client.post(f"/v1/agents/{agent_id}/action", json={"action": "DRAIN"}, headers=ADMIN)
    assert bad.status_code == 422


def test_a_live_agent_re_registers_after_delete_unless_its_token_is_revoked(client: TestClient, store: Store) -> None:
    issued, row = store.create_token(name="k8s")
    incarnation = str(uuid.uuid4())
    agent_id = _register(client, issued.text, incarnation=incarnation).json()["agent_id"]
    client.delete(f"/v1/agents/{agent_id}", headers=ADMIN)
    heartbeat = client.post(
        f"/v1/agents/{agent_id}/heartbeat",
        json={"incarnation": incarnation, "free_slots": 4},
        headers={"Authorization": f"Bearer {issued.text}", **SPEAKS},
    )
    assert heartbeat.status_code == 404 and heartbeat.json()["reason"] == "agent_deleted"
    again = _register(client, issued.text, incarnation=incarnation)
    assert again.status_code == 200
    assert client.get(f"/v1/agents/{agent_id}", headers=VIEWER).json()["status"] == "HEALTHY"
    store.revoke_token(row.id, revoked_by="admin")
    client.delete(f"/v1/agents/{agent_id}", headers=ADMIN)
    assert _register(client, issued.text, incarnation=incarnation).status_code == 401


def test_revoking_a_token_makes_its_agents_unhealthy(client: TestClient, store: Store) -> None:
    issued, row = store.create_token(name="fenced")
    agent_id = _register(client, issued.text).json()["agent_id"]
    store.revoke_token(row.id, revoked_by="admin")
    assert client.get(f"/v1/agents/{agent_id}", headers=VIEWER).json()["status"] == "UNHEALTHY"


def test_allowed_ip_ranges_are_managed_and_enforced(client: TestClient, store: Store) -> None:
    issued, _ = store.create_token(name="ranges")
    assert client.get("/v1/allowed-ip-ranges", headers=VIEWER).json() == {"ranges": [], "enforced": False}
    invalid = client.put("/v1/allowed-ip-ranges", json={"ranges": ["10.0.0.0/8", "10.0.0/99"]}, headers=ADMIN)
    assert invalid.status_code == 422 and "10.0.0/99" in invalid.json()["detail"]
    assert client.get("/v1/allowed-ip-ranges", headers=VIEWER).json()["enforced"] is False
    client.put("/v1/allowed-ip-ranges", json={"ranges": ["203.0.113.0/24", "2001:db8::/32"]}, headers=ADMIN)
    refused = _register(client, issued.text)
    # The test client's peer address is "testclient", which no range can hold.
    assert refused.status_code == 403 and "testclient" in refused.json()["detail"]
    # Admin endpoints are not behind the ranges.
    assert client.get("/v1/tokens", headers=ADMIN).status_code == 200
    removed = client.delete("/v1/allowed-ip-ranges/2001:db8::/32", headers=ADMIN).json()
    assert [r["cidr"] for r in removed["ranges"]] == ["203.0.113.0/24"]
    missing = client.delete("/v1/allowed-ip-ranges/198.51.100.0/24", headers=ADMIN)
    assert missing.status_code == 404
    cleared = client.put("/v1/allowed-ip-ranges", json={"ranges": []}, headers=ADMIN).json()
    assert cleared["enforced"] is False
    assert _register(client, issued.text).status_code == 200


def test_every_change_is_audited_with_actor_and_before_after(client: TestClient, store: Store) -> None:
    token = client.post("/v1/tokens", json={"name": "audited"}, headers=ADMIN).json()
    agent_id = _register(client, token["secret"]).json()["agent_id"]
    client.post(f"/v1/agents/{agent_id}/action", json={"action": "CORDON"}, headers=ADMIN)
    client.post(f"/v1/agents/{agent_id}/action", json={"action": "UNCORDON"}, headers=ADMIN)
    client.delete(f"/v1/agents/{agent_id}", headers=ADMIN)
    client.post("/v1/allowed-ip-ranges", json={"ranges": ["10.0.0.0/8"]}, headers=ADMIN)
    client.post(f"/v1/tokens/{token['id']}/revoke", headers=ADMIN)
    entries = client.get("/v1/audit", headers=VIEWER).json()
    assert [e["action"] for e in entries] == [
        "token.revoke",
        "allowed_ip_ranges.add",
        "agent.delete",
        "agent.uncordon",
        "agent.cordon",
        "token.create",
    ]
    assert {e["actor"] for e in entries} == {"admin"}
    cordon = entries[4]
    assert cordon["before"]["cordoned"] is False and cordon["after"]["cordoned"] is True
    assert entries[1]["after"] == {"ranges": ["10.0.0.0/8"]}
    only_agent = client.get(f"/v1/audit?target_id={agent_id}", headers=VIEWER).json()
    assert len(only_agent) == 3


def test_token_expiry_is_a_duration_or_a_time_and_can_be_changed_audited(client: TestClient, store: Store) -> None:
    before = utcnow()
    created = client.post("/v1/tokens", json={"name": "rotating", "expires": "12h"}, headers=ADMIN).json()
    expires = datetime.fromisoformat(created["expires_at"])
    assert before + timedelta(hours=12) <= expires <= utcnow() + timedelta(hours=12)
    shortened = client.patch(f"/v1/tokens/{created['id']}", json={"expires": "30m"}, headers=ADMIN)
    assert shortened.status_code == 200, shortened.text
    assert datetime.fromisoformat(shortened.json()["expires_at"]) <= utcnow() + timedelta(minutes=30)
    fixed = client.patch(f"/v1/tokens/{created['id']}", json={"expires": "2030-01-01T00:00Z"}, headers=ADMIN).json()
    assert fixed["expires_at"].startswith("2030-01-01T00:00:00")
    forever = client.patch(f"/v1/tokens/{created['id']}", json={"expires": "never"}, headers=ADMIN).json()
    assert forever["expires_at"] is None and forever["state"] == "active"
    audit = client.get("/v1/audit", params={"target_id": created["id"]}, headers=ADMIN).json()
    updates = [entry for entry in audit if entry["action"] == "token.update"]
    assert len(updates) == 3 and {entry["actor"] for entry in updates} == {"admin"}
    assert updates[0]["after"]["expires_at"] is None  # newest first: the last change


def test_an_expired_token_given_time_again_works_again(client: TestClient, store: Store) -> None:
    created = client.post("/v1/tokens", json={"name": "lapsed", "expires": "1h"}, headers=ADMIN).json()
    with store.transaction() as session:
        session.get(AgentToken, created["id"]).expires_at = utcnow() - timedelta(seconds=1)
    assert _register(client, created["secret"]).json()["reason"] == "token_expired"
    client.patch(f"/v1/tokens/{created['id']}", json={"expires": "1d"}, headers=ADMIN)
    assert _register(client, created["secret"]).status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        ({"expires": "yesterday"}, 422, "invalid_expiry"),
        ({"expires": "2020-01-01"}, 422, "invalid_expiry"),
        ({}, 422, "invalid_request"),
        ({"expires": "1h", "colour": "red"}, 422, "invalid_request"),
    ],
)
def test_bad_token_changes_are_refused_with_a_reason(
    client: TestClient, body: dict[str, Any], status: int, reason: str
) -> None:
    created = client.post("/v1/tokens", json={"name": "target"}, headers=ADMIN).json()
    refused = client.patch(f"/v1/tokens/{created['id']}", json=body, headers=ADMIN)
    assert refused.status_code == status and refused.json()["reason"] == reason, refused.text
    assert client.get(f"/v1/tokens/{created['id']}", headers=ADMIN).json()["expires_at"] is None


def test_a_revoked_token_cannot_be_changed_and_viewers_cannot_change_tokens(client: TestClient) -> None:
    created = client.post("/v1/tokens", json={"name": "gone"}, headers=ADMIN).json()
    assert client.patch(f"/v1/tokens/{created['id']}", json={"expires": "1h"}, headers=VIEWER).status_code == 403
    client.post(f"/v1/tokens/{created['id']}/revoke", headers=ADMIN)
    refused = client.patch(f"/v1/tokens/{created['id']}", json={"expires": "1h"}, headers=ADMIN)
    assert refused.status_code == 409 and refused.json()["reason"] == "token_revoked"
    both = client.post("/v1/tokens", json={"name": "both", "expires": "1h", "expires_in_days": 1}, headers=ADMIN)
    assert both.status_code == 422


def test_a_token_serves_only_the_roles_it_was_created_for(client: TestClient, store: Store) -> None:
    created = client.post("/v1/tokens", json={"name": "triggers", "scopes": ["triggerer"]}, headers=ADMIN)
    assert created.status_code == 201 and created.json()["scopes"] == ["triggerer"]
    secret = created.json()["secret"]
    as_worker = _register(client, secret, name="wants-to-work")
    assert as_worker.status_code == 403 and as_worker.json()["reason"] == "scope_missing"
    assert "may serve triggerer, not worker: use a token created with --scope worker" in as_worker.json()["detail"]
    incarnation = str(uuid.uuid4())
    body = {
        "name": "trig",
        "incarnation": incarnation,
        "tether_version": "0.2.0",
        "airflow_version": "1.3.2",
        "python_version": "3.11",
        "hostname": "h",
        "roles": ["triggerer"],
        "queues": ["default"],
        "slots": 1,
    }
    auth = {"Authorization": f"Bearer {secret}", **SPEAKS}
    registered = client.post("/v1/agents/register", json=body, headers=auth)
    assert registered.status_code == 200, registered.text
    agent_id = registered.json()["agent_id"]
    lease = client.post(
        f"/v1/agents/{agent_id}/lease",
        json={"incarnation": incarnation, "free_slots": 1, "queues": ["default"], "wait": 0},
        headers=auth,
    )
    assert lease.status_code == 403 and lease.json()["reason"] == "scope_missing"
    beat = client.post(
        f"/v1/agents/{agent_id}/heartbeat", json={"incarnation": incarnation, "free_slots": 0}, headers=auth
    )
    assert beat.status_code == 200, beat.text


def test_tokens_are_worker_tokens_unless_told_and_bundles_need_the_dag_processor_scope(client: TestClient) -> None:
    plain = client.post("/v1/tokens", json={"name": "plain"}, headers=ADMIN).json()
    assert plain["scopes"] == ["worker"] and plain["bundles"] is None
    parsers = client.post(
        "/v1/tokens", json={"name": "parsers", "scopes": ["dag-processor"], "bundles": ["finance"]}, headers=ADMIN
    ).json()
    assert (parsers["scopes"], parsers["bundles"]) == (["dag-processor"], ["finance"])
    refused = client.post("/v1/tokens", json={"name": "odd", "bundles": ["finance"]}, headers=ADMIN)
    assert refused.status_code == 422 and refused.json()["reason"] == "bundles_without_dag_processor"
    assert client.post("/v1/tokens", json={"name": "none", "scopes": []}, headers=ADMIN).status_code == 422
    assert client.post("/v1/tokens", json={"name": "bad", "scopes": ["admin"]}, headers=ADMIN).status_code == 422


def test_an_audit_filter_with_a_nul_character_is_refused_not_a_server_error(client: TestClient) -> None:
    admin = {"X-Test-User": "admin"}
    for name in ("target_type", "target_id"):
        refused = client.get("/v1/audit", params={name: "token\x00x"}, headers=admin)
        assert refused.status_code == 422 and refused.json()["reason"] == "invalid_request", refused.text
    assert client.get("/v1/audit", params={"target_id": "tokenx"}, headers=admin).status_code == 200
