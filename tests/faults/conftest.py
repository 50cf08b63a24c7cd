"""Fault scenarios on one PostgreSQL plane shared by the whole folder.

The plane runs with short intervals so a dead agent is noticed in seconds: a
heartbeat every ``HEARTBEAT`` seconds, unhealthy after ``MISSED`` missed ones,
leases confirmed within ``LEASE_TIMEOUT``. Each scenario serves a queue of its
own and starts its own agents through ``agents``, which stops them by PID when
the test ends, passed or not.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import running_plane
from tests.e2e.test_admin import Admin
from tether.embedded import AgentProcess, ManagedProcess, Plane, start_agent, wait_until

DAGS = Path(__file__).parent / "dags"

HEARTBEAT = 4.0
MISSED = 3
HEALTH_TIMEOUT = HEARTBEAT * MISSED
LEASE_TIMEOUT = 25.0
#: The longest the plane holds an agent's poll for work open.
LEASE_WAIT = 5.0
#: What a scheduler loop, a sweep and the poll of the test may add to a deadline of the design.
SLACK = 5.0

#: The Task SDK inside an agent rides out a plane that is away for a while (Airflow's own options).
PATIENT_TASKS = {
    "AIRFLOW__WORKERS__EXECUTION_API_RETRIES": "15",
    "AIRFLOW__WORKERS__EXECUTION_API_RETRY_WAIT_MIN": "0.5",
    "AIRFLOW__WORKERS__EXECUTION_API_RETRY_WAIT_MAX": "3",
    "AIRFLOW__WORKERS__MAX_FAILED_HEARTBEATS": "10",
}


@pytest.fixture(scope="session")
def plane(tmp_path_factory: pytest.TempPathFactory, pg_admin_url: str) -> Iterator[Plane]:
    env = {
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__PARALLELISM": "256",
        "AIRFLOW__TETHER__HEARTBEAT_INTERVAL": str(HEARTBEAT),
        "AIRFLOW__TETHER__MISSED_HEARTBEATS": str(MISSED),
        "AIRFLOW__TETHER__LEASE_TIMEOUT": str(LEASE_TIMEOUT),
        "AIRFLOW__TETHER__LEASE_WAIT": str(LEASE_WAIT),
    }
    with running_plane(pg_admin_url, tmp_path_factory.mktemp("faults") / "plane", DAGS, env) as plane:
        yield plane


@pytest.fixture(scope="session")
def admin(plane: Plane) -> Admin:
    return Admin(plane, "admin")


@pytest.fixture(scope="session")
def token(plane: Plane) -> str:
    return plane.create_token("faults")


@dataclass
class Agents:
    """Starts agents for one test and stops every one of them, by PID, when it ends."""

    plane: Plane
    token: str
    started: list[AgentProcess] = field(default_factory=list)
    #: Task processes of agents that died without their tasks: killed at the end if still alive.
    strays: list[psutil.Process] = field(default_factory=list)

    def start(
        self, name: str, *, ready: bool = True, env: dict[str, str] | None = None, **settings: str
    ) -> AgentProcess:
        settings.setdefault("max_backoff", "2")
        agent = start_agent(self.plane, name, self.token, env={**PATIENT_TASKS, **(env or {})}, **settings)
        self.started.append(agent)
        if ready:
            wait_until(lambda: agent.health("/readyz") == 200, 90, f"agent {name} ready")
        return agent

    def kill9(self, agent: AgentProcess) -> None:
        """``kill -9`` the agent alone: its task processes, in groups of their own, live on as orphans."""
        with contextlib.suppress(psutil.Error):
            self.strays.extend(psutil.Process(agent.process.pid).children(recursive=True))
        agent.process.signal(signal.SIGKILL)
        agent.process.popen.wait(10)

    def stop_all(self) -> None:
        for agent in self.started:
            with contextlib.suppress(psutil.Error):
                self.strays.extend(psutil.Process(agent.process.pid).children(recursive=True))
            # A frozen agent cannot act on SIGTERM; wake it so the stop is orderly.
            agent.process.signal(signal.SIGCONT)
            agent.process.stop(timeout=10)
            self.plane.processes.pop(f"agent-{agent.name}", None)
        for process in self.strays:
            with contextlib.suppress(psutil.Error):
                process.kill()


@pytest.fixture
def agents(plane: Plane, token: str) -> Iterator[Agents]:
    pool = Agents(plane=plane, token=token)
    try:
        yield pool
    finally:
        pool.stop_all()


# -- reading the plane's tables ------------------------------------------------------


def jobs(plane: Plane, dag_id: str, run_id: str | None = None) -> list[dict[str, Any]]:
    sql = (
        "SELECT id, task_id, map_index, try_number, state, agent_name, reason, started_at, finished_at "
        "FROM tether_job WHERE dag_id = :d"
    )
    params: dict[str, Any] = {"d": dag_id}
    if run_id is not None:
        sql += " AND run_id = :r"
        params["r"] = run_id
    return [dict(row._mapping) for row in plane.query(sql + " ORDER BY task_id, map_index, try_number", **params)]


def settled_jobs(plane: Plane, dag_id: str, run_id: str, timeout: float = 30) -> list[dict[str, Any]]:
    """The run's jobs once none is in flight: an agent reports after Airflow has recorded the task."""
    return wait_until(
        lambda: (
            (rows := jobs(plane, dag_id, run_id))
            and all(row["state"] in ("SUCCESS", "FAILED", "REVOKED") for row in rows)
            and rows
        ),
        timeout,
        f"the jobs of {dag_id}/{run_id} settled",
    )


def task_instances(plane: Plane, dag_id: str, run_id: str) -> list[dict[str, Any]]:
    rows = plane.query(
        "SELECT task_id, map_index, try_number, state, hostname FROM task_instance "
        "WHERE dag_id = :d AND run_id = :r ORDER BY task_id, map_index",
        d=dag_id,
        r=run_id,
    )
    return [dict(row._mapping) for row in rows]


def ti_state(plane: Plane, dag_id: str, run_id: str, task_id: str = "nap") -> str | None:
    rows = plane.query(
        "SELECT state FROM task_instance WHERE dag_id = :d AND run_id = :r AND task_id = :t",
        d=dag_id,
        r=run_id,
        t=task_id,
    )
    return rows[0][0] if rows else None


def history(plane: Plane, dag_id: str, run_id: str) -> list[tuple[str, int, str]]:
    """Every earlier try of the run's tasks: (task id, try number, state)."""
    rows = plane.query(
        "SELECT task_id, try_number, state FROM task_instance_history WHERE dag_id = :d AND run_id = :r "
        "ORDER BY task_id, try_number",
        d=dag_id,
        r=run_id,
    )
    return [tuple(row) for row in rows]


def agent_row(plane: Plane, name: str) -> dict[str, Any]:
    rows = plane.query("SELECT id, incarnation, last_heartbeat FROM tether_agent WHERE name = :n", n=name)
    assert rows, f"agent {name} is not registered"
    return dict(rows[0]._mapping)


def trigger(plane: Plane, dag_id: str) -> str:
    plane.wait_for_dag(dag_id)
    return plane.trigger(dag_id)


def wait_running(plane: Plane, dag_id: str, run_id: str, timeout: float = 90) -> dict[str, Any]:
    """Wait until the run's first job is RUNNING on an agent and its task's own code runs.

    A task instance is ``running`` from its supervisor's start call, before the task
    process has stored its rendered fields - the last call it makes to the plane
    before the task's code. A fault injected before that call fails the task in
    Airflow's own preparation, not in the code the scenario means to outlast it.
    """
    return wait_until(
        lambda: next(
            (
                job
                for job in jobs(plane, dag_id, run_id)
                if job["state"] == "RUNNING"
                and ti_state(plane, dag_id, run_id, job["task_id"]) == "running"
                and plane.query(
                    "SELECT 1 FROM rendered_task_instance_fields WHERE dag_id = :d AND run_id = :r AND task_id = :t",
                    d=dag_id,
                    r=run_id,
                    t=job["task_id"],
                )
            ),
            None,
        ),
        timeout,
        f"a job of {dag_id}/{run_id} running",
    )


def log_text(process: ManagedProcess) -> str:
    try:
        return process.log_path.read_text(errors="replace")
    except OSError:
        return ""


def logs(plane: Plane, lines: int = 40) -> str:
    return "\n".join(f"--- {p.name} ---\n{p.tail(lines)}" for p in plane.processes.values())


# -- a link between an agent and the plane that the test can cut ------------------------


class Link:
    """A TCP relay on loopback: agent -> ``port`` -> plane.

    ``cut()`` closes every open connection and refuses new ones (the listening
    socket is closed, so connects get RST at once); ``restore()`` listens again
    on the same port.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        probe = socket.create_server(("127.0.0.1", 0))
        self.port = int(probe.getsockname()[1])
        probe.close()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._server: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.restore()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        server = socket.create_server(("127.0.0.1", self.port), reuse_port=False)
        server.settimeout(0.2)
        self._server = server
        self._thread = threading.Thread(target=self._accept, args=(server,), daemon=True)
        self._thread.start()

    def cut(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()
            self._sockets.clear()

    close = cut

    def _accept(self, server: socket.socket) -> None:
        while self._server is server:
            try:
                client, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            for sock in (client, upstream):
                sock.settimeout(None)
            with self._lock:
                self._sockets.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                target.shutdown(socket.SHUT_WR)


def agent_api(plane: Plane, token: str) -> httpx.Client:
    """The agent protocol spoken by the test itself, with a real agent token."""
    return httpx.Client(
        base_url=f"{plane.url}/tether/v1",
        headers={"Authorization": f"Bearer {token}", "X-Tether-Protocol": "1"},
        timeout=30,
    )


def elapsed_since(start: float) -> float:
    return time.monotonic() - start
