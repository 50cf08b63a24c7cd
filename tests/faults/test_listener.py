"""DESIGN §6: a LISTEN connection that stops delivering without being closed is noticed and replaced.

The API server LISTENs through a relay (``[tether] listen_database_url``) that
the test can turn into a black hole: it keeps every connection open, answers
nothing, forwards nothing - what a NAT or firewall that dropped its state does.
Everything else reaches PostgreSQL directly.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url

from tests.conftest import create_pg_database, drop_pg_database
from tests.faults.conftest import DAGS
from tether.embedded import Plane, start_agent, wait_until

pytestmark = pytest.mark.timeout(420)


class Relay:
    """A TCP relay to ``target`` whose connections can all go silent at once, none of them closed."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        #: Connections made before this generation forward nothing any more.
        self.silenced_before = 0
        self.generation = 0
        self.silent = False
        self.sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def silence(self) -> None:
        """Every connection, present and future, swallows what it gets until ``restore``."""
        with self._lock:
            self.silent = True
            self.generation += 1
            self.silenced_before = self.generation

    def restore(self) -> None:
        """New connections forward again; the silenced ones stay silent, as after a NAT lost them."""
        with self._lock:
            self.silent = False
            self.generation += 1

    def close(self) -> None:
        self.server.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self._lock:
                generation = self.generation if not self.silent else -1
            self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink, generation), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, generation: int) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                return
            if not data:
                return
            if generation < 0 or generation < self.silenced_before:
                continue  # swallowed: the peer waits for an answer that never comes
            with contextlib.suppress(OSError):
                sink.sendall(data)


@pytest.fixture(scope="module")
def relayed(tmp_path_factory: pytest.TempPathFactory, pg_admin_url: str) -> Iterator[tuple[Plane, Relay]]:
    url = create_pg_database(pg_admin_url)
    parsed = make_url(url)
    relay = Relay((parsed.host or "127.0.0.1", parsed.port or 5432))
    listen_url = parsed.set(drivername="postgresql", host="127.0.0.1", port=relay.port)
    plane = Plane(
        home=tmp_path_factory.mktemp("listener") / "plane",
        dags_folder=DAGS,
        sql_alchemy_conn=url,
        extra_env={
            "AIRFLOW__TETHER__LISTEN_DATABASE_URL": listen_url.render_as_string(hide_password=False),
            "AIRFLOW__TETHER__HEARTBEAT_INTERVAL": "2",
            "AIRFLOW__TETHER__LEASE_WAIT": "20",
        },
    )
    try:
        plane.migrate()
        plane.start(("api-server", "scheduler", "dag-processor"))
        yield plane, relay
    finally:
        plane.stop()
        relay.close()
        drop_pg_database(pg_admin_url, url)


def _listener(plane: Plane) -> str | None:
    answer = httpx.get(f"{plane.url}/tether/v1/health", timeout=5).json()
    return answer.get("listener")  # type: ignore[no-any-return]


def _start_delays(plane: Plane, run_id: str) -> list[float]:
    rows = plane.query("SELECT queued_at, leased_at FROM tether_job WHERE run_id = :r", r=run_id)
    return [(leased - queued).total_seconds() for queued, leased in rows]


def _log_has(path: Path, text: str) -> bool:
    return text in path.read_text(errors="replace")


def test_a_listener_that_falls_silent_is_replaced_and_agents_are_woken_meanwhile(
    relayed: tuple[Plane, Relay],
) -> None:
    plane, relay = relayed
    token = plane.create_token("listener")
    agent = start_agent(plane, "listener-agent", token, queues="listenq", slots="4")
    wait_until(lambda: agent.health("/readyz") == 200, 90, "agent ready")
    api_log = plane.processes["api-server"].log_path

    # Listening: a job is leased as it is queued, although the agent's poll may wait 20 s.
    run_id = plane.trigger("faults_listener")
    assert plane.wait_for_run("faults_listener", run_id, timeout=120) == "success"
    assert _listener(plane) == "listening"

    relay.silence()
    silenced = time.monotonic()
    wait_until(lambda: _listener(plane) == "polling", 60, "the silent listener noticed")
    noticed = time.monotonic() - silenced
    assert _log_has(api_log, "its own notification did not come back")

    # Meanwhile lease requests look on a timer: jobs are still leased within a poll interval or so,
    # not at the end of a 20 s wait.
    run_id = plane.trigger("faults_listener")
    assert plane.wait_for_run("faults_listener", run_id, timeout=120) == "success"
    degraded = _start_delays(plane, run_id)
    assert max(degraded) < 10, degraded

    relay.restore()
    restored = time.monotonic()
    wait_until(lambda: _listener(plane) == "listening", 60, "the listener back")
    back = time.monotonic() - restored
    assert _log_has(api_log, "hears notifications again")
    run_id = plane.trigger("faults_listener")
    assert plane.wait_for_run("faults_listener", run_id, timeout=120) == "success"
    print(
        f"\nlistener silent -> noticed (lease requests polling) in {noticed:.1f}s; "
        f"queued->leased while polling: {', '.join(f'{d:.2f}s' for d in degraded)}; "
        f"relay restored -> listening again in {back:.1f}s"
    )
