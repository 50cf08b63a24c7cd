"""Sentinel reports over HTTP against a real database: who may send them, what is kept, what operators see."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.integration.conftest import SPEAKS
from tests.integration.test_agent_api import AgentCalls
from tether.plane.store import Store


def _report(namespace: str = "agents", **pod: Any) -> dict[str, Any]:
    return {
        "name": "tether-sentinel-1",
        "namespace": namespace,
        "pods": [{"name": "a1", "phase": "Running", "ready": True, "restarts": 0, **pod}],
        "backends": [{"name": "secrets", "ok": True, "detail": "VaultBackend answered"}, {"name": "xcom", "ok": True}],
    }


@pytest.fixture
def sentinel_headers(store: Store) -> dict[str, str]:
    text = store.create_token(name="sentinel", scopes=["sentinel"])[0].text
    return {"Authorization": f"Bearer {text}", **SPEAKS}


def test_the_latest_report_of_each_namespace_is_kept_and_shown_by_its_agent(
    client: TestClient, store: Store, sentinel_headers: dict[str, str]
) -> None:
    worker = store.create_token(name="workers")[0].text
    assert AgentCalls(client, worker, name="a1").register().status_code == 200
    first = client.post("/v1/sentinel/report", json=_report(restarts=1), headers=sentinel_headers)
    assert first.status_code == 200, first.text
    assert first.json() == {"interval": store.settings.sentinel_interval.total_seconds()}
    again = _report(ready=False, restarts=2, last_termination="OOMKilled", waiting="CrashLoopBackOff")
    assert client.post("/v1/sentinel/report", json=again, headers=sentinel_headers).status_code == 200
    other = client.post("/v1/sentinel/report", json=_report("other", name="b1"), headers=sentinel_headers)
    assert other.status_code == 200

    admin = {"X-Test-User": "viewer"}
    reports = client.get("/v1/sentinels", headers=admin).json()
    assert [r["namespace"] for r in reports] == ["agents", "other"]
    [pod] = reports[0]["pods"]
    assert (pod["restarts"], pod["last_termination"], pod["waiting"], pod["ready"]) == (
        2,
        "OOMKilled",
        "CrashLoopBackOff",
        False,
    )
    assert reports[0]["stale"] is False
    assert {b["name"]: b["ok"] for b in reports[0]["backends"]} == {"secrets": True, "xcom": True}
    agent = client.get("/v1/agents/a1", headers=admin).json()
    assert agent["pod"]["namespace"] == "agents" and agent["pod"]["restarts"] == 2
    assert client.get("/v1/sentinels").status_code == 401


def test_a_report_is_stale_after_two_missed_intervals(
    client: TestClient, store: Store, sentinel_headers: dict[str, str]
) -> None:
    assert client.post("/v1/sentinel/report", json=_report(), headers=sentinel_headers).status_code == 200
    later = store.sentinel_views()[0].received_at + 2 * store.settings.sentinel_interval + timedelta(seconds=6)
    assert store.sentinel_views(now=later)[0].stale is True
    assert store.sentinel_views()[0].stale is False


def test_only_a_sentinel_token_may_report_and_a_sentinel_token_leases_nothing(
    client: TestClient, store: Store, sentinel_headers: dict[str, str]
) -> None:
    worker = store.create_token(name="workers")[0].text
    refused = client.post(
        "/v1/sentinel/report", json=_report(), headers={"Authorization": f"Bearer {worker}", **SPEAKS}
    )
    assert refused.status_code == 403 and refused.json()["reason"] == "scope_missing"
    assert store.sentinel_views() == []
    calls = AgentCalls(client, worker)
    assert calls.register().status_code == 200
    calls.headers = sentinel_headers
    leased = calls.lease()
    assert leased.status_code == 403 and leased.json()["reason"] == "scope_missing"


def test_reports_that_carry_more_than_states_are_refused(client: TestClient, sentinel_headers: dict[str, str]) -> None:
    with_log = _report()
    with_log["pods"][0]["log"] = "Traceback (most recent call last): ..."
    assert client.post("/v1/sentinel/report", json=with_log, headers=sentinel_headers).status_code == 422
    unknown_backend = _report()
    unknown_backend["backends"] = [{"name": "database", "ok": True}]
    assert client.post("/v1/sentinel/report", json=unknown_backend, headers=sentinel_headers).status_code == 422
