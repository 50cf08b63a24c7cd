"""A whole Tether deployment on one machine: plane processes plus agents.

It runs the real things - ``airflow api-server``, ``airflow scheduler``,
``airflow dag-processor`` and ``tether-agent run`` - as child processes, each in
its own process group with its log in the deployment's folder. The quick start
uses it, and so do the end-to-end tests.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

BIN = Path(sys.executable).parent
EXECUTOR = "tether.plane.executor.TetherExecutor"
#: Airflow's logging configuration that reads the task logs agents ship.
LOG_CONFIG = "tether.plane.log_config.LOGGING_CONFIG"


@functools.cache
def _has_module(bin_dir: Path, module: str) -> bool:
    """Whether the Python of ``bin_dir`` can import ``module`` (an older release may not have it)."""
    if bin_dir == BIN:
        return importlib.util.find_spec(module) is not None
    # find_spec of a submodule raises when its package is missing: that is an answer too, not an error to show.
    probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    result = subprocess.run(
        [str(bin_dir / "python"), "-c", probe],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    return result.returncode == 0


#: Answers 200 once the API server serves Tether's agent API.
AGENT_API_HEALTH = "/tether/v1/health"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ManagedProcess:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.alive():
            os.kill(self.popen.pid, sig)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL to the whole process group after ``timeout``."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        return self.popen.returncode

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def spawn(name: str, argv: Sequence[str], env: Mapping[str, str], log_dir: Path) -> ManagedProcess:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with log_path.open("ab") as log_file:
        popen = subprocess.Popen(
            list(argv),
            env=dict(env),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return ManagedProcess(name=name, popen=popen, log_path=log_path)


@dataclass
class Plane:
    """An Airflow 3 plane with Tether installed, rooted in ``home``."""

    home: Path
    dags_folder: Path
    sql_alchemy_conn: str
    port: int = field(default_factory=free_port)
    extra_env: dict[str, str] = field(default_factory=dict)
    processes: dict[str, ManagedProcess] = field(default_factory=dict)
    jwt_secret: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    #: (certificate, key, CA bundle) to serve the API over HTTPS.
    tls: tuple[Path, Path, Path] | None = None
    #: Where the ``airflow`` executable is: another virtualenv runs another installation.
    bin_dir: Path = BIN

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "TETHER_"))}
        env.update(
            {
                "AIRFLOW_HOME": str(self.home),
                "AIRFLOW__CORE__EXECUTOR": EXECUTOR,
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.sql_alchemy_conn,
                "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
                "AIRFLOW__API_AUTH__JWT_SECRET": self.jwt_secret,
                "AIRFLOW__API__PORT": str(self.port),
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API__BASE_URL": self.url,
                "AIRFLOW__API__WORKERS": "1",
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
                "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
                "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
                "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(self.home / "task-logs"),
                "AIRFLOW__TETHER__HEARTBEAT_INTERVAL": "2",
                "AIRFLOW__TETHER__LEASE_WAIT": "10",
                "PYTHONUNBUFFERED": "1",
            }
        )
        if _has_module(self.bin_dir, LOG_CONFIG.rpartition(".")[0]):
            # Task logs agents ship are read through Tether (see tether.plane.log_config).
            env["AIRFLOW__LOGGING__LOGGING_CONFIG_CLASS"] = LOG_CONFIG
        if self.tls is not None:
            cert, key, ca = self.tls
            env["AIRFLOW__API__SSL_CERT"] = str(cert)
            env["AIRFLOW__API__SSL_KEY"] = str(key)
            env["AIRFLOW__API__SSL_CA_FILE"] = str(ca)
        env.update(self.extra_env)
        return env

    def airflow(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(self.bin_dir / "airflow"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"airflow {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
        return result

    def migrate(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        self.airflow("db", "migrate")

    def create_token(self, name: str, scopes: Sequence[str] = ()) -> str:
        """A new agent token for ``scopes`` (none given: the plane's default, a worker token)."""
        flags = [arg for scope in scopes for arg in ("--scope", scope)]
        return self.airflow("tether", "tokens", "create", "--name", name, *flags).stdout.strip().splitlines()[-1]

    def start(
        self,
        components: Sequence[str] = ("api-server", "scheduler", "dag-processor"),
        *,
        ready_path: str = AGENT_API_HEALTH,
    ) -> None:
        for component in components:
            self.start_component(component)
        self.wait_for_api(path=ready_path)

    def start_component(self, component: str) -> ManagedProcess:
        proc = spawn(component, [str(self.bin_dir / "airflow"), component], self.env, self.home / "logs")
        self.processes[component] = proc
        return proc

    def wait_for_api(self, timeout: float = 180, *, path: str = AGENT_API_HEALTH) -> None:
        """Wait until the API server answers ``path`` with 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            api = self.processes.get("api-server")
            if api is not None and not api.alive():
                raise RuntimeError(f"the API server exited:\n{api.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                verify: str | bool = str(self.tls[2]) if self.tls else True
                if httpx.get(f"{self.url}{path}", timeout=2, verify=verify).status_code == 200:
                    return
            time.sleep(0.5)
        raise TimeoutError(f"the API server did not answer {path} within {timeout:.0f}s")

    def rest_client(
        self, username: str = "admin", *, path: str = "/api/v2", timeout: float = 30, base: str | None = None
    ) -> httpx.Client:
        """A client of the API server under ``path``, logged in as ``username`` of Airflow's simple auth manager.

        ``base``: another API server of this plane (a replica on the same database) to call instead.
        """
        passwords = json.loads((self.home / "simple_auth_manager_passwords.json.generated").read_text())
        verify: str | bool = str(self.tls[2]) if self.tls else True
        login = httpx.post(
            f"{self.url}/auth/token",
            json={"username": username, "password": passwords[username]},
            timeout=10,
            verify=verify,
        )
        login.raise_for_status()
        return httpx.Client(
            base_url=f"{base or self.url}{path}",
            headers={"Authorization": f"Bearer {login.json()['access_token']}"},
            timeout=timeout,
            verify=verify,
        )

    def stop(self) -> None:
        for proc in reversed(list(self.processes.values())):
            proc.stop()

    @contextlib.contextmanager
    def db(self) -> Iterator[Engine]:
        engine = create_engine(self.sql_alchemy_conn)
        try:
            yield engine
        finally:
            engine.dispose()

    def query(self, sql: str, **params: Any) -> list[Any]:
        with self.db() as engine, engine.connect() as conn:
            return list(conn.execute(text(sql), params))

    def wait_for_dag(self, dag_id: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if self.query("SELECT 1 FROM serialized_dag WHERE dag_id = :d", d=dag_id):
                    return
            time.sleep(1)
        raise TimeoutError(f"DAG {dag_id} was not parsed within {timeout:.0f}s{self.exited()}")

    def trigger(self, dag_id: str, run_id: str | None = None) -> str:
        run_id = run_id or f"tether_{secrets.token_hex(4)}"
        self.airflow("dags", "trigger", dag_id, "--run-id", run_id)
        return run_id

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        state = "unknown"
        while time.monotonic() < deadline:
            rows = self.query("SELECT state FROM dag_run WHERE dag_id = :d AND run_id = :r", d=dag_id, r=run_id)
            state = rows[0][0] if rows else "missing"
            if state in ("success", "failed"):
                return str(state)
            time.sleep(0.5)
        raise TimeoutError(f"DAG run {dag_id}/{run_id} still {state} after {timeout:.0f}s{self.exited()}")

    def exited(self) -> str:
        """The plane's processes that are no longer running, each with the end of its log; empty if none."""
        ended = [proc for proc in self.processes.values() if not proc.alive()]
        return "".join(
            f"\n{proc.name} exited ({proc.popen.returncode}); its log ends:\n{proc.tail(30)}" for proc in ended
        )

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str]:
        rows = self.query(
            "SELECT task_id, map_index, state FROM task_instance WHERE dag_id = :d AND run_id = :r",
            d=dag_id,
            r=run_id,
        )
        return {(t if m < 0 else f"{t}[{m}]"): s for t, m, s in rows}


@dataclass
class AgentProcess:
    name: str
    process: ManagedProcess
    health_port: int
    #: The environment it runs with: another ``tether-agent`` command given it acts as this agent.
    env: dict[str, str] = field(default_factory=dict)

    def health(self, path: str) -> int:
        try:
            return httpx.get(f"http://127.0.0.1:{self.health_port}{path}", timeout=2).status_code
        except httpx.HTTPError:
            return 0

    def metrics(self) -> str:
        """What the agent's ``/metrics`` shows now (Prometheus text)."""
        return httpx.get(f"http://127.0.0.1:{self.health_port}/metrics", timeout=5).text


def agent_env(plane: Plane, home: Path, **settings: str) -> dict[str, str]:
    """The agent's environment: the plane's URL and its token, never its database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "TETHER_"))}
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(plane.dags_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "task-logs"),
            # Clones and checkouts of DAG bundles: each agent's own.
            "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_STORAGE_PATH": str(home / "dag-bundles"),
            "TETHER_PLANE_URL": plane.url,
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update({f"TETHER_{k.upper()}": v for k, v in settings.items()})
    return env


def start_agent(
    plane: Plane,
    name: str,
    token: str,
    *,
    env: Mapping[str, str] | None = None,
    bin_dir: Path = BIN,
    command: str = "run",
    **settings: str,
) -> AgentProcess:
    """Start ``tether-agent <command>`` (``run``: a worker) from ``bin_dir``.

    ``settings`` become TETHER_* variables, ``env`` is added as is.
    """
    home = plane.home / "agents" / name
    home.mkdir(parents=True, exist_ok=True)
    token_file = home / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    port = int(settings.pop("health_port", 0) or free_port())
    environment = agent_env(plane, home, name=name, token_file=str(token_file), health_port=str(port), **settings)
    environment.update(env or {})
    proc = spawn(f"agent-{name}", [str(bin_dir / "tether-agent"), command], environment, plane.home / "logs")
    plane.processes[f"agent-{name}"] = proc
    return AgentProcess(name=name, process=proc, health_port=port, env=environment)


def write_loopback_pki(folder: Path, *, issuer: str = "Tether loopback CA") -> tuple[Path, Path, Path]:
    """A CA made for one plane and a certificate for 127.0.0.1 it signed: (certificate, key, CA), as ``Plane.tls``."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(ca_key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "server.pem", folder / "server.key", folder / "ca.pem"
    paths[0].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    paths[2].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return paths


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what}: not within {timeout:.0f}s")


def copy_example_dags(target: Path) -> Path:
    source = Path(__file__).parent / "example_dags"
    target.mkdir(parents=True, exist_ok=True)
    for path in source.glob("*.py"):
        if path.name != "__init__.py":
            shutil.copy(path, target / path.name)
    return target
