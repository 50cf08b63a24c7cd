"""An agent behind an HTTP proxy reaching a plane served over HTTPS with a private CA.

The agent gets only the plane's URL, its token file, the CA bundle and
HTTPS_PROXY; its environment carries no database connection. Everything it
sends to the plane - its own calls and its tasks' Execution API calls - goes
through the proxy, which the test runs and watches.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import dump_logs
from tether.embedded import Plane, start_agent, wait_until, write_loopback_pki

DAGS = Path(__file__).parent / "dags"


class ConnectProxy:
    """A minimal HTTP CONNECT proxy on loopback that counts the tunnels it opens."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.tunnels: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.server.settimeout(0.5)
        while not self._stop.is_set():
            try:
                client, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._tunnel, args=(client,), daemon=True).start()

    def _tunnel(self, client: socket.socket) -> None:
        with client:
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = client.recv(4096)
                if not chunk:
                    return
                request += chunk
            method, target, _ = request.split(b"\r\n", 1)[0].decode().split(" ", 2)
            if method != "CONNECT":
                client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                return
            host, port = target.rsplit(":", 1)
            self.tunnels.append(target)
            with socket.create_connection((host, int(port)), timeout=10) as upstream:
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                client.settimeout(None)
                upstream.settimeout(None)
                pump = threading.Thread(target=self._pump, args=(upstream, client), daemon=True)
                pump.start()
                self._pump(client, upstream)
                pump.join(timeout=5)

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            try:
                target.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        self.server.close()


@pytest.fixture(scope="module")
def tls_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    home = tmp_path_factory.mktemp("e2e-tls")
    plane = Plane(
        home=home / "plane",
        dags_folder=DAGS,
        sql_alchemy_conn=f"sqlite:///{home / 'plane' / 'airflow.db'}",
        tls=write_loopback_pki(home / "pki"),
    )
    try:
        plane.migrate()
        plane.start()
        yield plane
    finally:
        plane.stop()


def test_an_agent_behind_a_proxy_runs_tasks_on_a_tls_plane(tls_plane: Plane) -> None:
    assert tls_plane.tls is not None
    ca = tls_plane.tls[2]
    proxy = ConnectProxy()
    try:
        token = tls_plane.create_token("tls")
        agent = start_agent(
            tls_plane,
            "behind-proxy",
            token,
            env={"HTTPS_PROXY": f"http://127.0.0.1:{proxy.port}", "NO_PROXY": "", "no_proxy": ""},
            queues="default",
            slots="2",
            ca_bundle=str(ca),
        )
        wait_until(lambda: agent.health("/readyz") == 200, 90, "the agent ready through the proxy")
        environ = Path(f"/proc/{agent.process.pid}/environ").read_bytes().split(b"\0")
        keys = {item.split(b"=", 1)[0].decode() for item in environ if item}
        assert not {k for k in keys if "SQL_ALCHEMY" in k or k.startswith("AIRFLOW__DATABASE")}
        tls_plane.wait_for_dag("e2e_xcom")
        run_id = tls_plane.trigger("e2e_xcom")
        assert tls_plane.wait_for_run("e2e_xcom", run_id, timeout=180) == "success", dump_logs(tls_plane)
        assert f"127.0.0.1:{tls_plane.port}" in proxy.tunnels
        wait_until(
            lambda: 'tether_agent_jobs_total{outcome="success"} 2.0' in _metrics(agent.health_port),
            30,
            "both jobs counted in the agent's metrics",
        )
        assert agent.health("/healthz") == 200
    finally:
        proxy.close()
    # Without the CA bundle the plane's certificate is not trusted.
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{tls_plane.url}/tether/v1/health", timeout=5)


def _metrics(port: int) -> str:
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
