"""Releases side by side: the previous release installed from its tag into a virtualenv of its own.

``release_0_1`` builds that virtualenv once per session from the commit tagged
``v0.1.0`` (the commit is named here too, so a clone without tags works the same).
Its own lock file pins what it installs; the packages come from the same cache as
the project's own ``.venv``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import create_pg_database, drop_pg_database
from tether.embedded import Plane, free_port

REPO = Path(__file__).resolve().parents[2]
DAGS = Path(__file__).parent / "dags"
#: The commit the ``v0.1.0`` tag names: Tether 0.1.0, protocol revision 1.
RELEASE_0_1 = "08e2f0bf872e09e5eb925bc695af38b94a3af73a"
#: Short intervals, so that registering, leasing and noticing take seconds.
FAST_PLANE = {
    "AIRFLOW__TETHER__HEARTBEAT_INTERVAL": "2",
    "AIRFLOW__TETHER__LEASE_WAIT": "5",
    "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
}


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="session")
def release_0_1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``bin`` folder of a virtualenv with Tether 0.1.0 installed from its tag."""
    tagged = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", "v0.1.0^{commit}"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    assert tagged in ("", RELEASE_0_1), f"v0.1.0 names {tagged}, not the release's commit {RELEASE_0_1}"
    root = tmp_path_factory.mktemp("tether-0.1.0")
    source = root / "src"
    source.mkdir()
    archive = subprocess.run(["git", "archive", RELEASE_0_1], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    uv = Path(sys.executable).parent / "uv"
    python = str(venv / "bin" / "python")
    install = [str(uv), "pip", "install", "--quiet", "--python", python, "--compile-bytecode"]
    subprocess.run([*install, "-r", str(source / "requirements" / "lock.txt")], check=True, timeout=600)
    subprocess.run([*install, "--no-deps", str(source)], check=True, timeout=600)
    bin_dir = venv / "bin"
    version = subprocess.run([str(bin_dir / "tether-agent"), "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == "tether-agent 0.1.0"
    return bin_dir


@pytest.fixture
def pg_url(pg_admin_url: str) -> Iterator[str]:
    url = create_pg_database(pg_admin_url)
    try:
        yield url
    finally:
        drop_pg_database(pg_admin_url, url)


def make_plane(home: Path, url: str, *, bin_dir: Path | None = None) -> Plane:
    plane = Plane(home=home, dags_folder=DAGS, sql_alchemy_conn=url, extra_env=dict(FAST_PLANE))
    if bin_dir is not None:
        plane.bin_dir = bin_dir
    return plane


def agents_list(plane: Plane) -> list[dict[str, Any]]:
    """``airflow tether agents list`` as JSON, by the plane's own CLI."""
    listed: list[dict[str, Any]] = json.loads(plane.airflow("tether", "agents", "list", "-o", "json").stdout)
    return listed


class AddingRelay:
    """An HTTP relay to the plane that adds fields to every answer of the agent API, as a newer plane would.

    Top-level answers and the objects in their lists get a field no release knows;
    heartbeat answers also get a command of a kind no release knows. ``added``
    counts the answers it changed.
    """

    def __init__(self, target: str) -> None:
        self.target = target
        self.added = 0
        self._lock = threading.Lock()
        relay = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: the test reads what the agent and the plane logged."""

            def do_GET(self) -> None:
                relay._forward(self)

            def do_POST(self) -> None:
                relay._forward(self)

        self.port = free_port()
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self._client = httpx.Client(timeout=60)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._client.close()

    def _forward(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else None
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in ("host", "content-length")}
        upstream = self._client.request(handler.command, self.target + handler.path, content=body, headers=headers)
        content = upstream.content
        if handler.path.startswith("/tether/v1/") and upstream.status_code == 200:
            content = json.dumps(self._add_fields(handler.path, upstream.json())).encode()
            with self._lock:
                self.added += 1
        handler.send_response(upstream.status_code)
        for name, value in upstream.headers.items():
            if name.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(content)))
        handler.end_headers()
        handler.wfile.write(content)

    @staticmethod
    def _add_fields(path: str, answer: Any) -> Any:
        if not isinstance(answer, dict):
            return answer
        for value in answer.values():
            if isinstance(value, list):
                for item in value:
                    if isinstance(item, dict):
                        item["added_by_a_newer_plane"] = True
        if path.endswith("/heartbeat"):
            answer.setdefault("commands", []).append({"kind": "rotate-token", "within": 60})
        answer["added_by_a_newer_plane"] = {"nested": [1, 2, 3]}
        return answer


def process_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "TETHER_"))}
