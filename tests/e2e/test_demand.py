"""Demand for autoscalers, end to end on PostgreSQL: a real scheduler queues the work, real agents drain it.

50 tasks go to queue demand_a and 5 to demand_b, each held at a gate until the
test opens it; the demand endpoint's figures are compared with the jobs table
while the work waits, while it is held, and as agents drain it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import running_plane
from tether.embedded import Plane, start_agent, wait_until

DAGS = Path(__file__).parent / "dags_demand"


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory, pg_admin_url: str) -> Iterator[Plane]:
    with running_plane(
        pg_admin_url,
        tmp_path_factory.mktemp("e2e-demand") / "plane",
        DAGS,
        {"AIRFLOW__CORE__PARALLELISM": "128", "AIRFLOW__TETHER__HEARTBEAT_INTERVAL": "1"},
    ) as plane:
        yield plane


def demand(plane: Plane, token: str, **params: Any) -> dict[str, Any]:
    response = httpx.get(
        f"{plane.url}/tether/v1/demand", params=params, headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def table(plane: Plane, run_id: str) -> dict[tuple[str, str], int]:
    """(queue, QUEUED or HELD) -> jobs of the run, from the jobs table."""
    rows = plane.query(
        "SELECT queue, CASE WHEN state = 'QUEUED' THEN 'QUEUED' ELSE 'HELD' END, count(*) FROM tether_job "
        "WHERE run_id = :r AND state IN ('QUEUED', 'LEASED', 'RUNNING') GROUP BY 1, 2",
        r=run_id,
    )
    return {(queue, state): int(n) for queue, state, n in rows}


def figures(answer: dict[str, Any], queue: str) -> tuple[int, int]:
    entry = answer["queues"][queue]
    return entry["queued"], entry["running"]


def test_demand_follows_the_work_queued_held_and_drained(plane: Plane, tmp_path: Path) -> None:
    token = plane.create_token("demand")
    scaler = plane.create_token("scaler", scopes=["sentinel"])
    gates = tmp_path / "gates"
    gates.mkdir()
    plane.wait_for_dag("e2e_demand")
    run_id = plane.trigger("e2e_demand")

    # Nothing serves the queues: everything waits, and the figures are the table's.
    both = {"queues": "demand_a,demand_b", "slots_per_replica": 10}
    waiting = wait_until(lambda: (d := demand(plane, scaler, **both))["queued"] == 55 and d, 180, "55 jobs queued")
    assert figures(waiting, "demand_a") == (50, 0) and figures(waiting, "demand_b") == (5, 0)
    assert table(plane, run_id) == {("demand_a", "QUEUED"): 50, ("demand_b", "QUEUED"): 5}
    assert (waiting["queues"]["demand_a"]["replicas"], waiting["queues"]["demand_b"]["replicas"]) == (5, 1)
    assert waiting["replicas"] == 6

    # One agent of 10 slots on demand_a takes 10 and holds them at the gate.
    agent_env = {"TETHER_E2E_GATES": str(gates)}
    start_agent(plane, "demand-a1", token, queues="demand_a", slots="10", env=agent_env)
    held = wait_until(
        lambda: figures(d := demand(plane, scaler, **both), "demand_a") == (40, 10) and d, 180, "10 jobs held"
    )
    assert table(plane, run_id) == {("demand_a", "QUEUED"): 40, ("demand_a", "HELD"): 10, ("demand_b", "QUEUED"): 5}
    assert held["queues"]["demand_a"]["slots"] == 50 and held["queues"]["demand_a"]["running_slots"] == 10
    assert figures(held, "demand_b") == (5, 0)

    # Open the gate: demand_a drains through the agent, and its figures only fall.
    (gates / run_id).touch()
    series = [demand(plane, scaler, **both)]
    wait_until(
        lambda: series.append(demand(plane, scaler, **both)) or series[-1]["queues"]["demand_a"]["slots"] == 0,
        300,
        "demand_a drained",
        interval=0.5,
    )
    slots_a = [answer["queues"]["demand_a"]["slots"] for answer in series]
    assert slots_a == sorted(slots_a, reverse=True), slots_a
    assert len(set(slots_a)) >= 3, slots_a  # seen on the way down, not only at both ends
    assert all(figures(answer, "demand_b") == (5, 0) for answer in series)
    assert table(plane, run_id) == {("demand_b", "QUEUED"): 5}

    # An agent on demand_b drains the rest; nothing is left for any scaler.
    start_agent(plane, "demand-b1", token, queues="demand_b", slots="2", env=agent_env)
    drained = wait_until(lambda: (d := demand(plane, scaler, **both))["slots"] == 0 and d, 180, "demand_b drained")
    assert drained["replicas"] == 0 and drained["queues"]["demand_b"]["replicas"] == 0
    assert plane.wait_for_run("e2e_demand", run_id, timeout=120) == "success"
    assert table(plane, run_id) == {}
