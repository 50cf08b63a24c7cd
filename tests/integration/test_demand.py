"""The demand endpoint against a real database: figures per queue in slots, who may read, one shared reading."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event

from tests.integration.conftest import enqueue
from tests.integration.test_agent_api import AgentCalls
from tether.plane.store import Store


@pytest.fixture
def token(store: Store) -> str:
    return store.create_token(name="scaler")[0].text


def _demand(client: TestClient, token: str, **params: Any) -> Any:
    response = client.get("/v1/demand", params=params, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    return response.json()


def _fresh(client: TestClient) -> None:
    """Forget the shared reading, as its time running out would."""
    client.app.state.tether.demand.clear()  # type: ignore[attr-defined]


@pytest.fixture
def grouped_reads(engine: Any) -> Iterator[list[str]]:
    """The grouped statements (the demand reading) run on the database, as they run."""
    seen: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "GROUP BY" in statement and "tether_job" in statement:
            seen.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    yield seen
    event.remove(engine, "before_cursor_execute", record)


def test_demand_counts_queued_and_held_work_per_queue_in_slots(
    client: TestClient, store: Store, token: str, make_workload: Callable[..., Any]
) -> None:
    enqueue(
        store,
        *[make_workload(task_id=f"a{i}", queue="A") for i in range(5)],
        make_workload(task_id="big", queue="A", pool_slots=3),
        *[make_workload(task_id=f"b{i}", queue="B") for i in range(2)],
    )
    agent = AgentCalls(client, token, name="worker-a", queues=["A"])
    assert agent.register().status_code == 200
    leases = agent.lease(free_slots=2, queues=["A"]).json()["leases"]
    assert len(leases) == 2
    started = agent.post("/jobs/start", {"job_ids": [leases[0]["job_id"]]}).json()["started"]
    assert started == [leases[0]["job_id"]]

    everything = _demand(client, token, slots_per_replica=4)
    assert everything["queues"] == {
        # 3 small jobs and the 3-slot one wait; one leased and one running are held.
        "A": {"queued": 4, "running": 2, "queued_slots": 6, "running_slots": 2, "slots": 8, "replicas": 2},
        "B": {"queued": 2, "running": 0, "queued_slots": 2, "running_slots": 0, "slots": 2, "replicas": 1},
    }
    assert (everything["slots"], everything["replicas"], everything["slots_per_replica"]) == (10, 3, 4)

    # A worker group serving A and an idle queue C: zeros for C, and the group's replicas together.
    group = _demand(client, token, slots_per_replica=3, queues="A,C")
    assert list(group["queues"]) == ["A", "C"]
    assert group["queues"]["C"]["slots"] == 0 and group["queues"]["C"]["replicas"] == 0
    assert (group["queued_slots"], group["running_slots"], group["replicas"]) == (6, 2, 3)

    # Finished work no longer counts.
    agent.post(f"/jobs/{leases[0]['job_id']}/report", {"state": "success", "exit_code": 0})
    _fresh(client)
    assert _demand(client, token, slots_per_replica=4, queues="A")["running_slots"] == 1


def test_no_work_needs_no_replicas(client: TestClient, token: str) -> None:
    empty = _demand(client, token, slots_per_replica=8, queues="default")
    assert empty["queues"] == {
        "default": {"queued": 0, "running": 0, "queued_slots": 0, "running_slots": 0, "slots": 0, "replicas": 0}
    }
    assert empty["replicas"] == 0
    assert _demand(client, token)["queues"] == {}


def test_any_agent_token_may_read_without_a_protocol_header_and_nobody_else(client: TestClient, store: Store) -> None:
    for scope in ("worker", "dag-processor", "triggerer", "sentinel"):
        text = store.create_token(name=f"scoped-{scope}", scopes=[scope])[0].text
        assert _demand(client, text)["replicas"] == 0
    assert client.get("/v1/demand").status_code == 401
    assert client.get("/v1/demand", headers={"Authorization": "Bearer tether_nope"}).status_code == 401


def test_bad_parameters_are_refused_with_a_sentence(client: TestClient, token: str) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    zero = client.get("/v1/demand", params={"slots_per_replica": 0}, headers=headers)
    assert zero.status_code == 422 and "slots_per_replica" in zero.json()["detail"]
    many = client.get("/v1/demand", params={"queues": ",".join(f"q{i}" for i in range(65))}, headers=headers)
    assert many.status_code == 400 and "at most 64 queues" in many.json()["detail"]


def test_callers_share_one_reading_of_the_database(
    client: TestClient, store: Store, token: str, make_workload: Callable[..., Any], grouped_reads: list[str]
) -> None:
    enqueue(store, make_workload(queue="A"))
    first = _demand(client, token, queues="A")
    answers = [_demand(client, token, slots_per_replica=n, queues="A,B") for n in (1, 2, 3, 4, 5)]
    assert len(grouped_reads) == 1
    assert {answer["as_of"] for answer in answers} == {first["as_of"]}
    # Positive control: a job queued meanwhile is seen once the reading is renewed, by one more statement.
    enqueue(store, make_workload(queue="A"))
    assert _demand(client, token, queues="A")["queued"] == 1
    _fresh(client)
    assert _demand(client, token, queues="A")["queued"] == 2
    assert len(grouped_reads) == 2


def test_the_charts_scaler_reads_the_replicas_a_group_needs(
    client: TestClient, store: Store, token: str, make_workload: Callable[..., Any]
) -> None:
    """The URL and value location the chart gives KEDA, asked of the real endpoint."""
    from urllib.parse import urlsplit

    from tests.chart.rendering import by_kind, render, values

    group = {"name": "etl", "queues": ["etl", "etl-heavy"], "slots": 4, "autoscaling": {"enabled": True}}
    [scaled] = by_kind(render(values(workers=[group])), "ScaledObject")
    meta = scaled["spec"]["triggers"][0]["metadata"]
    url = urlsplit(meta["url"])
    enqueue(
        store,
        *[make_workload(task_id=f"e{i}", queue="etl") for i in range(6)],
        make_workload(task_id="heavy", queue="etl-heavy", pool_slots=3),
        make_workload(task_id="other", queue="default"),
    )
    answer = client.get(
        f"{url.path.removeprefix('/tether')}?{url.query}", headers={"Authorization": f"Bearer {token}"}
    ).json()
    # GJSON path "replicas": the top-level field. 9 slots of the group's queues, 4 slots an agent.
    assert answer[meta["valueLocation"]] == 3
    assert float(meta["targetValue"]) == 1
