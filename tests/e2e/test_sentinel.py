"""The sentinel end to end: its Kubernetes side against a stand-in API server, everything after against a real plane.

``tether-agent sentinel`` runs as a process with a kubeconfig pointing at the
stand-in (tests/e2e/kube_standin.py), which serves pods and events lists and
watch streams as the Kubernetes API documents them, through the official
``kubernetes`` client. The plane (a real API server on PostgreSQL) keeps its
reports; the admin REST API and ``airflow tether agents list`` show them next to
the agents' heartbeats.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import create_pg_database, drop_pg_database
from tests.e2e.kube_standin import StandInApi, event, pod
from tether import protocol
from tether.embedded import Plane, start_agent, wait_until

DAGS = Path(__file__).parent / "dags_metrics"
AGENT_LABELS = {"app.kubernetes.io/instance": "tether", "app.kubernetes.io/component": "agent"}
SELECTOR = "app.kubernetes.io/instance=tether,app.kubernetes.io/component=agent"


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory, pg_admin_url: str) -> Iterator[Plane]:
    url = create_pg_database(pg_admin_url)
    plane = Plane(
        home=tmp_path_factory.mktemp("e2e-sentinel") / "plane",
        dags_folder=DAGS,
        sql_alchemy_conn=url,
        extra_env={
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__TETHER__HEARTBEAT_INTERVAL": "1",
            # The interval the plane gives sentinels with each answer.
            "AIRFLOW__TETHER__SENTINEL_INTERVAL": "2",
        },
    )
    try:
        plane.migrate()
        plane.start(("api-server",))
        yield plane
    finally:
        plane.stop()
        drop_pg_database(pg_admin_url, url)


@pytest.fixture
def kube() -> Iterator[StandInApi]:
    api = StandInApi()
    yield api
    api.close()


def _pods(admin: httpx.Client) -> dict[str, dict[str, Any]]:
    reports = admin.get("/sentinels").json()
    return {p["name"]: p for report in reports for p in report["pods"]}


def test_the_plane_keeps_what_the_sentinel_sees_and_shows_it_by_the_agents(
    plane: Plane, kube: StandInApi, tmp_path: Path
) -> None:
    healthy = f"tether-default-{uuid.uuid4().hex[:5]}"
    kube.put("pods", pod(healthy, labels={**AGENT_LABELS, "tether-agent/worker": "default"}))
    kube.put(
        "pods",
        pod(
            "tether-default-oom",
            labels={**AGENT_LABELS, "tether-agent/worker": "default"},
            ready=False,
            restarts=3,
            last_terminated="OOMKilled",
            waiting="CrashLoopBackOff",
        ),
    )
    kube.put("pods", pod("postgres-0", labels={"app": "postgres"}))  # not an agent: not reported
    kube.put("events", event("tether-default-oom", "BackOff"))
    kube.put("events", event(healthy, "Pulled", kind="Normal"))

    worker_token = plane.create_token("workers")
    sentinel_token = plane.create_token("sentinel", scopes=["sentinel"])
    # The agent named after its pod, as the chart names agents.
    agent = start_agent(plane, healthy, worker_token, queues="default", slots="1")
    wait_until(lambda: agent.health("/readyz") == 200, 120, "agent ready")
    sentinel = start_agent(
        plane,
        "tether-sentinel-7f9c",
        sentinel_token,
        command="sentinel",
        env={
            "KUBECONFIG": str(kube.kubeconfig(tmp_path / "kubeconfig")),
            "TETHER_SENTINEL_NAMESPACE": "agents",
            "TETHER_SENTINEL_SELECTOR": SELECTOR,
            # A secrets backend that cannot be loaded: the report says so; the XCom backend answers.
            "AIRFLOW__WORKERS__SECRETS_BACKEND": "tether_no_such_module.VaultBackend",
        },
    )
    admin = plane.rest_client("admin", path="/tether/v1")

    pods = wait_until(lambda: len(p := _pods(admin)) == 2 and p, 120, "the first report")
    assert pods[healthy] | {"reported_at": None} == {
        "namespace": "agents",
        "name": healthy,
        "group": "default",
        "phase": "Running",
        "ready": True,
        "restarts": 0,
        "last_termination": None,
        "waiting": None,
        "warning": None,
        "reported_at": None,
    }
    oom = pods["tether-default-oom"]
    assert (oom["ready"], oom["restarts"], oom["last_termination"], oom["waiting"], oom["warning"]) == (
        False,
        3,
        "OOMKilled",
        "CrashLoopBackOff",
        "BackOff",
    )
    [report] = admin.get("/sentinels").json()
    assert (report["namespace"], report["sentinel"], report["stale"]) == ("agents", "tether-sentinel-7f9c", False)
    backends = {b["name"]: b for b in report["backends"]}
    assert backends["secrets"]["ok"] is False and "tether_no_such_module" in backends["secrets"]["detail"]
    assert backends["xcom"]["ok"] is True

    # The agent's own view carries its pod, next to its heartbeat.
    shown = admin.get(f"/agents/{healthy}").json()
    assert shown["status"] == "HEALTHY" and shown["pod"]["phase"] == "Running" and shown["pod"]["ready"] is True

    # Changes arrive through the watch: the healthy pod is OOMKilled and restarts; the other one goes away.
    watches_before = kube.watches("pods")
    assert watches_before >= 1
    kube.put(
        "pods",
        pod(
            healthy, labels={**AGENT_LABELS, "tether-agent/worker": "default"}, restarts=1, last_terminated="OOMKilled"
        ),
    )
    kube.delete("pods", "agents", "tether-default-oom")
    changed = wait_until(
        lambda: (p := _pods(admin)) and list(p) == [healthy] and p[healthy]["restarts"] == 1 and p, 60, "the change"
    )
    assert changed[healthy]["last_termination"] == "OOMKilled"
    assert kube.watches("pods") == watches_before  # seen on the open watch, not by listing again

    # A watch that ends is started again from the last version seen: here one the server has
    # forgotten meanwhile (410 Expired), so the sentinel lists again, and carries on.
    lists_before = sum(1 for path, _ in kube.requests if "/pods" in path and "watch=true" not in path)
    kube.pause_watches(True)
    kube.end_watches()
    kube.put("pods", pod("tether-default-new", labels={**AGENT_LABELS, "tether-agent/role": "triggerer"}))
    kube.compact()
    kube.pause_watches(False)
    wait_until(lambda: "tether-default-new" in _pods(admin), 60, "the pod added while no watch was open")
    assert kube.expired >= 1
    assert sum(1 for path, _ in kube.requests if "/pods" in path and "watch=true" not in path) > lists_before
    assert {token for _, token in kube.requests} == {"Bearer standin-service-account-token"}

    # The CLI shows the pod by its agent, and the sentinel's report under the agents.
    listing = plane.airflow("tether", "agents", "list").stdout
    row = next(line for line in listing.splitlines() if line.startswith(healthy))
    assert "Running ready 1 restarts OOMKilled" in row and "HEALTHY" in row
    assert "Sentinel tether-sentinel-7f9c in namespace agents" in listing
    assert "secrets FAILS" in listing and "xcom answers" in listing
    assert "pod tether-default-new (no agent registered): Running ready" in listing

    # A sentinel token leases nothing; a worker token reports nothing.
    agent_id = shown["id"]
    leased = httpx.post(
        f"{plane.url}/tether/v1/agents/{agent_id}/lease",
        json={"incarnation": str(uuid.uuid4()), "free_slots": 1, "queues": ["default"], "wait": 0},
        headers={"Authorization": f"Bearer {sentinel_token}", protocol.PROTOCOL_HEADER: "2"},
        timeout=10,
    )
    assert leased.status_code == 403 and leased.json()["reason"] == "scope_missing"
    spoofed = httpx.post(
        f"{plane.url}/tether/v1/sentinel/report",
        json={"name": "x", "namespace": "agents", "pods": [], "backends": []},
        headers={"Authorization": f"Bearer {worker_token}", protocol.PROTOCOL_HEADER: "2"},
        timeout=10,
    )
    assert spoofed.status_code == 403 and "sentinel" in spoofed.json()["detail"]
    assert len(_pods(admin)) == 2  # the refused report changed nothing
    sentinel.process.stop()
