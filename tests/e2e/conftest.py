"""End-to-end fixtures: a real Airflow 3 plane (API server, scheduler, DAG processor) and real agents."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import create_pg_database, drop_pg_database, running_plane
from tether.embedded import AgentProcess, Plane, start_agent, wait_until

DAGS = Path(__file__).parent / "dags"


@dataclass
class Deployment:
    plane: Plane
    token: str
    agents: dict[str, AgentProcess]

    def run_dag(self, dag_id: str, timeout: float = 240) -> tuple[str, str]:
        self.plane.wait_for_dag(dag_id)
        run_id = self.plane.trigger(dag_id)
        return run_id, self.plane.wait_for_run(dag_id, run_id, timeout=timeout)

    def jobs(self, dag_id: str, run_id: str, timeout: float = 30) -> list[dict[str, object]]:
        """The run's jobs once every one is settled: an agent reports after Airflow records the task."""
        return wait_until(
            lambda: (
                (jobs := self._jobs(dag_id, run_id))
                and all(job["state"] in ("SUCCESS", "FAILED", "REVOKED") for job in jobs)
                and jobs
            ),
            timeout,
            f"the jobs of {dag_id}/{run_id} to settle",
        )

    def _jobs(self, dag_id: str, run_id: str) -> list[dict[str, object]]:
        rows = self.plane.query(
            "SELECT task_id, try_number, state, agent_name, queue, pool_slots, started_at, finished_at "
            "FROM tether_job WHERE dag_id = :d AND run_id = :r",
            d=dag_id,
            r=run_id,
        )
        return [dict(row._mapping) for row in rows]


def make_plane(tmp: Path, backend: str, admin_url: str | None) -> tuple[Plane, str | None]:
    pg_url = None
    if backend == "postgres":
        assert admin_url is not None
        pg_url = create_pg_database(admin_url)
        conn = pg_url
    else:
        conn = f"sqlite:///{tmp / 'plane' / 'airflow.db'}"
    return Plane(home=tmp / "plane", dags_folder=DAGS, sql_alchemy_conn=conn), pg_url


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def deployment(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """A plane with two agents: 'alpha' serves default and alpha (4 slots), 'beta' serves beta (4 slots).

    Beta runs with its warm start off, so each of its tasks is a fork of the agent.
    """
    backend = request.param
    admin = request.getfixturevalue("pg_admin_url") if backend == "postgres" else None
    plane, pg_url = make_plane(tmp_path_factory.mktemp(f"e2e-{backend}"), backend, admin)
    try:
        plane.migrate()
        token = plane.create_token("e2e")
        plane.start()
        agents = {
            "alpha": start_agent(plane, "alpha", token, queues="default,alpha", slots="4"),
            "beta": start_agent(plane, "beta", token, queues="beta", slots="4", warm_start="false"),
        }
        for agent in agents.values():
            wait_until(lambda a=agent: a.health("/readyz") == 200, 120, f"agent {agent.name} ready")
        yield Deployment(plane=plane, token=token, agents=agents)
    finally:
        plane.stop()
        if pg_url is not None and admin is not None:
            drop_pg_database(admin, pg_url)


@pytest.fixture(scope="session")
def pg_plane(tmp_path_factory: pytest.TempPathFactory, pg_admin_url: str) -> Iterator[Plane]:
    home = tmp_path_factory.mktemp("e2e-pg-plane") / "plane"
    with running_plane(
        pg_admin_url,
        home,
        DAGS,
        {
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer",
            "AIRFLOW__TETHER__HEARTBEAT_INTERVAL": "1",
        },
    ) as plane:
        yield plane


def dump_logs(plane: Plane) -> str:
    return "\n".join(f"--- {p.name} ---\n{p.tail(30)}" for p in plane.processes.values())
