"""What the Remote Agents pages stand on, on a real database: the pages' own reads, who sees what,
and the refusal of a change that only a browser's session cookie carries from another origin."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.integration.conftest import StoreAgent, enqueue, fake_authorizer
from tether import protocol
from tether.plane.api.app import create_app
from tether.plane.api.deps import PlaneContext
from tether.plane.store import Store
from tether.plane.ui import PAGES, TASK_INSTANCE, external_views
from tether.plane.values import agent_values

ADMIN = {"X-Test-User": "admin"}
VIEWER = {"X-Test-User": "viewer"}
PLANE_URL = "https://airflow.example.com"
#: A browser's call carrying Airflow's session cookie: what the pages send.
BROWSER = {**ADMIN, "Cookie": "_token=session-jwt"}


@pytest.fixture
def pages(store: Store) -> Iterator[TestClient]:
    ctx = PlaneContext.for_store(store)
    app = create_app(lambda: ctx, authorizer=fake_authorizer, plane_url=lambda: PLANE_URL)
    with TestClient(app, base_url="http://airflow.test") as client:
        yield client
    ctx.wakeup.stop()


def _token_names(client: TestClient) -> list[str]:
    return [t["name"] for t in client.get("/v1/tokens", headers=ADMIN).json()]


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Origin": "https://evil.example", "Content-Type": "application/json"}, 403),
        ({"Sec-Fetch-Site": "cross-site", "Content-Type": "application/json"}, 403),
        ({"Sec-Fetch-Site": "same-site", "Content-Type": "application/json"}, 403),
        ({"Origin": "null", "Content-Type": "application/json"}, 403),
        ({"Origin": "http://airflow.test", "Content-Type": "text/plain"}, 422),
        ({"Content-Type": "application/x-www-form-urlencoded"}, 422),
    ],
    ids=["other-origin", "cross-site", "same-site", "opaque-origin", "text-plain", "form"],
)
def test_a_cookie_only_change_from_elsewhere_is_refused_and_changes_nothing(
    pages: TestClient, headers: dict[str, str], status: int
) -> None:
    refused = pages.post("/v1/tokens", content=b'{"name": "csrf"}', headers={**BROWSER, **headers})
    assert refused.status_code == status, refused.text
    assert refused.json()["reason"] == "cross_origin"
    assert "csrf" not in _token_names(pages)
    # The same call from the page itself goes through.
    same = {"Origin": "http://airflow.test", "Sec-Fetch-Site": "same-origin", "Content-Type": "application/json"}
    done = pages.post("/v1/tokens", content=b'{"name": "csrf"}', headers={**BROWSER, **same})
    assert done.status_code == 201, done.text


@pytest.mark.parametrize(
    "headers",
    [
        {"Sec-Fetch-Site": "same-origin", "Origin": "https://airflow.behind-a-proxy.example"},
        {"Origin": PLANE_URL},
        {"Origin": "https://public.example", "X-Forwarded-Host": "public.example"},
        {},
    ],
    ids=["fetch-metadata", "base-url", "forwarded-host", "no-browser-headers"],
)
def test_a_page_of_this_server_may_change_behind_a_proxy_too(pages: TestClient, headers: dict[str, str]) -> None:
    sent = {**BROWSER, "Content-Type": "application/json", **headers}
    assert pages.post("/v1/tokens", content=b'{"name": "mine"}', headers=sent).status_code == 201


def test_a_cross_origin_delete_and_revoke_are_refused_too(pages: TestClient) -> None:
    created = pages.post("/v1/tokens", json={"name": "keep"}, headers=ADMIN).json()
    evil = {**BROWSER, "Origin": "https://evil.example", "Content-Type": "application/json"}
    assert pages.post(f"/v1/tokens/{created['id']}/revoke", headers=evil).status_code == 403
    assert pages.delete("/v1/allowed-ip-ranges/10.0.0.0/8", headers=evil).status_code == 403
    assert pages.get(f"/v1/tokens/{created['id']}", headers=ADMIN).json()["state"] == "active"


def test_a_bearer_token_is_a_credential_of_its_own_and_reads_need_no_origin(pages: TestClient) -> None:
    # Scripts and the CLI send their own credential: no browser could have added it.
    scripted = {**BROWSER, "Authorization": "Bearer jwt", "Origin": "https://ci.example"}
    assert pages.post("/v1/tokens", json={"name": "ci"}, headers=scripted).status_code == 201
    assert pages.get("/v1/tokens", headers={**BROWSER, "Sec-Fetch-Site": "cross-site"}).status_code == 200


def test_me_says_who_may_change(pages: TestClient) -> None:
    assert pages.get("/v1/me", headers=ADMIN).json() == {"name": "admin", "may_change": True}
    assert pages.get("/v1/me", headers=VIEWER).json() == {"name": "viewer", "may_change": False}
    assert pages.get("/v1/me").status_code == 401


def test_tries_show_the_agent_its_lease_start_and_report(pages: TestClient, store: Store, make_workload: Any) -> None:
    enqueue(store, make_workload(task_id="extract"), make_workload(task_id="load"))
    agent = StoreAgent(store, "edge-1")
    jobs = {t["job_id"]: t for t in pages.get("/v1/tries-in-flight", headers=VIEWER).json()}
    assert jobs == {}
    taken = agent.take()
    jobs = {t["job_id"]: t for t in pages.get("/v1/tries-in-flight", headers=VIEWER).json()}
    assert set(jobs) == set(taken) and len(taken) == 2
    assert {t["state"] for t in jobs.values()} == {"LEASED"}
    assert all(t["agent_name"] == "edge-1" and t["lease_expires_at"] for t in jobs.values())
    done_id, other = taken
    agent.start(done_id)
    agent.report(done_id, protocol.ReportState.SUCCESS)
    assert [t["job_id"] for t in pages.get("/v1/tries-in-flight", headers=VIEWER).json()] == [other]
    finished = pages.get("/v1/task-tries", params=_ti(jobs[done_id]), headers=VIEWER).json()
    assert [t["job_id"] for t in finished] == [done_id]
    [row] = finished
    assert row["state"] == "SUCCESS" and row["agent_name"] == "edge-1" and row["exit_code"] == 0
    assert row["leased_at"] <= row["started_at"] <= row["finished_at"]
    assert pages.get("/v1/task-tries", params={**_ti(jobs[done_id]), "task_id": "nope"}, headers=VIEWER).json() == []
    assert pages.get("/v1/task-tries", params={"dag_id": "d"}, headers=VIEWER).status_code == 422
    assert pages.get("/v1/task-tries", params=_ti(jobs[done_id])).status_code == 401


def _ti(job: dict[str, Any]) -> dict[str, Any]:
    return {k: job[k] for k in ("dag_id", "run_id", "task_id", "map_index")}


def test_the_values_file_is_the_one_the_cli_prints(pages: TestClient) -> None:
    params = {"namespace": "data-eu", "queues": "etl, gpu", "slots": "8", "resource_name_prefix": "eu"}
    answer = pages.get("/v1/agent-values", params=params, headers=VIEWER)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    expected = agent_values(
        plane_url=PLANE_URL, namespace="data-eu", queues=["etl", " gpu"], slots=8, resource_name_prefix="eu"
    )
    assert body["text"] == expected.text
    assert [m["name"] for m in body["missing"]] == ["secretBackend", "xcomBackend"]
    assert body["helm_install"] == "helm install tether-agent <chart> -n data-eu -f values.yaml"
    bad = pages.get("/v1/agent-values", params={"namespace": "Data_EU"}, headers=VIEWER)
    assert bad.status_code == 422 and "is not a Kubernetes namespace name" in bad.json()["detail"]


def test_pages_are_shown_to_readers_and_writable_only_for_those_who_may_change(pages: TestClient) -> None:
    for page in (*PAGES, TASK_INSTANCE):
        admin = pages.get(f"/ui/{page.slug}", headers=ADMIN)
        assert admin.status_code == 200, page.slug
        assert 'data-may-change="true"' in admin.text and "read-only" not in admin.text
        assert "frame-ancestors 'self'" in admin.headers["content-security-policy"]
        viewer = pages.get(f"/ui/{page.slug}", headers=VIEWER)
        assert 'data-may-change="false"' in viewer.text and 'data-testid="read-only"' in viewer.text
    assert 'id="new-token"' in pages.get("/ui/tokens", headers=ADMIN).text
    assert 'id="new-token"' not in pages.get("/ui/tokens", headers=VIEWER).text
    anonymous = pages.get("/ui/agents")
    assert anonymous.status_code == 401 and "Log in to Airflow" in anonymous.text
    assert pages.get("/ui/nothing", headers=ADMIN).status_code == 404


def test_the_plugin_adds_a_remote_agents_menu_and_a_task_instance_tab_this_app_serves(pages: TestClient) -> None:
    views = external_views()
    nav = [v for v in views if v["destination"] == "nav"]
    assert [v["name"] for v in nav] == ["Agents", "Agent Tokens", "Allowed IP Ranges", "Register a Remote Agent"]
    assert {v["category"] for v in nav} == {"Remote Agents"}
    [tab] = [v for v in views if v["destination"] == "task_instance"]
    assert tab["name"] == "Agent" and "{DAG_ID}" in tab["href"] and "{MAP_INDEX}" in tab["href"]
    assert len({v["url_route"] for v in views}) == len(views)
    for view in views:
        assert not view["href"].startswith("/"), "relative to Airflow's base URL"
        path = view["href"].removeprefix("tether")
        assert pages.get(path, headers=VIEWER).status_code == 200, path
        for icon in (view["icon"], view["icon_dark_mode"]):
            assert pages.get(icon.removeprefix("tether")).headers["content-type"].startswith("image/svg")
    for asset in ("theme.js", "tether.js", "tether.css"):
        assert pages.get(f"/ui/static/{asset}").status_code == 200
