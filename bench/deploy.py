"""Deployments under test: one Airflow plane on a fresh PostgreSQL database plus its workers.

Every executor gets the same plane (``tether.embedded.Plane``: API server,
scheduler, DAG processor on loopback) and the same DAGs; only the executor and
the process that runs tasks differ. Migrating a metadata database takes longer
than a whole benchmark run of some DAGs, so each executor's schema is migrated
once into a template database and every deployment starts from a copy of it.
"""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import create_engine, text

from tether.embedded import AGENT_API_HEALTH, ManagedProcess, Plane, spawn, start_agent, wait_until

BENCH = Path(__file__).parent
DAGS = BENCH / "dags"
DAG_IDS = ("chain_10", "fanout_100", "xcom_pass")
EDGE_VENV = BENCH / ".venv-edge"
TETHER_BIN = Path(sys.executable).parent
REPO = BENCH.parent

PARALLELISM = 16
SLOTS = 16

EDGE_PACKAGES = (
    "apache-airflow-core==3.3.2",
    "apache-airflow-task-sdk==1.3.2",
    "apache-airflow-providers-edge3==5.1.0",
    "psycopg2-binary",
    "asyncpg",
)


@dataclass(frozen=True)
class Variant:
    """One row of the report: an executor and the settings it runs with, beyond the plane's common ones."""

    name: str
    executor: str
    label: str
    #: Airflow settings of the plane (and of the Edge worker, which reads the plane's environment).
    plane: dict[str, str] = field(default_factory=dict)
    #: ``tether-agent`` settings (``TETHER_<NAME>``).
    agent: dict[str, str] = field(default_factory=dict)


VARIANTS = {
    v.name: v
    for v in (
        Variant("local", "local", "LocalExecutor"),
        Variant("tether", "tether", "Tether"),
        Variant("tether-nice0", "tether", "Tether, task nice 0", agent={"task_nice": "0"}),
        Variant("tether-cold", "tether", "Tether, warm start off", agent={"warm_start": "false"}),
        Variant("edge", "edge", "Edge Executor"),
        Variant("edge-poll1", "edge", "Edge, 1 s job poll", plane={"AIRFLOW__EDGE__JOB_POLL_INTERVAL": "1"}),
    )
}
#: The report's rows, in its order.
EXECUTORS = tuple(VARIANTS)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


class Postgres:
    """Creates and drops the benchmark's databases; every name it made is dropped by ``cleanup``."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.created: list[str] = []

    def url(self, name: str) -> str:
        return self.admin_url.rsplit("/", 1)[0] + f"/{name}"

    def _admin(self, sql: str) -> None:
        engine = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text(sql))
        finally:
            engine.dispose()

    def create(self, prefix: str, *, template: str | None = None) -> str:
        name = f"{prefix}_{secrets.token_hex(4)}"
        self.created.append(name)
        self._admin(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        return name

    def drop(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        with contextlib.suppress(ValueError):
            self.created.remove(name)

    def cleanup(self) -> None:
        for name in list(self.created):
            with contextlib.suppress(Exception):
                self.drop(name)

    def scalar(self, name: str, sql: str) -> int:
        """One number from the admin database, about database ``name``."""
        engine = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                return int(conn.execute(text(sql), {"d": name}).scalar() or 0)
        finally:
            engine.dispose()

    def xact_commit(self, name: str) -> int:
        return self.scalar(name, "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = :d")

    def connections(self, name: str) -> int:
        return self.scalar(name, "SELECT count(*) FROM pg_stat_activity WHERE datname = :d")


def plane_env(executor: str) -> dict[str, str]:
    """What differs between the executors' planes; everything else is ``Plane``'s defaults."""
    env = {
        "AIRFLOW__CORE__PARALLELISM": str(PARALLELISM),
        # The product's defaults, not the end-to-end tests' short intervals.
        "AIRFLOW__TETHER__HEARTBEAT_INTERVAL": "10",
        "AIRFLOW__TETHER__LEASE_WAIT": "20",
    }
    if executor == "local":
        env["AIRFLOW__CORE__EXECUTOR"] = "LocalExecutor"
    elif executor == "edge":
        env["AIRFLOW__CORE__EXECUTOR"] = "airflow.providers.edge3.executors.EdgeExecutor"
        env["AIRFLOW__EDGE__API_ENABLED"] = "True"
        # Airflow's own logging configuration: Tether is not installed in the Edge Executor's venv.
        env["AIRFLOW__LOGGING__LOGGING_CONFIG_CLASS"] = ""
    return env


def ensure_edge_venv() -> None:
    """Airflow's Edge provider in a venv of its own, with the lock's versions where they overlap."""
    python = EDGE_VENV / "bin" / "python"
    marker = EDGE_VENV / ".bench-installed"
    if marker.exists() and marker.read_text() == " ".join(EDGE_PACKAGES):
        return
    if not python.exists():
        log("creating bench/.venv-edge (python3.11 -m venv)")
        subprocess.run(["python3.11", "-m", "venv", str(EDGE_VENV)], check=True)
    log("installing " + " ".join(EDGE_PACKAGES) + " into bench/.venv-edge")
    subprocess.run(
        [
            str(TETHER_BIN / "uv"),
            "pip",
            "install",
            "--quiet",
            "--python",
            str(python),
            # Bytecode compiled at install, as for Tether's and the LocalExecutor's venv.
            "--compile-bytecode",
            "-c",
            str(REPO / "requirements" / "lock.txt"),
            *EDGE_PACKAGES,
        ],
        check=True,
    )
    marker.write_text(" ".join(EDGE_PACKAGES))


def bin_dir(executor: str) -> Path:
    return EDGE_VENV / "bin" if executor == "edge" else TETHER_BIN


@dataclass
class Deployment:
    """A running plane and, for Tether and Edge, one worker process with 16 slots."""

    variant: Variant
    plane: Plane
    database: str
    worker: ManagedProcess | None = None
    token: str | None = None
    health_port: int | None = None
    extra: dict[str, str] = field(default_factory=dict)
    #: What the task-running side ran with, as the deployment read it (see ``read_settings``).
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def executor(self) -> str:
        return self.variant.executor

    def pid(self, component: str) -> int:
        return self.plane.processes[component].pid

    def worker_roots(self) -> tuple[list[int], bool]:
        """PIDs whose trees hold the task-running processes, and whether the roots themselves count.

        The LocalExecutor's workers are children of the scheduler: their tree is
        counted without the scheduler itself, which every executor has.
        """
        if self.worker is not None:
            return [self.worker.pid], True
        return [self.pid("scheduler")], False

    def start_worker(self) -> None:
        if self.executor == "tether":
            assert self.token is not None
            env = {f"TETHER_{name.upper()}": value for name, value in self.variant.agent.items()}
            agent = start_agent(self.plane, "bench", self.token, env=env, queues="default", slots=str(SLOTS))
            self.settings = agent_settings(agent.env)
            self.worker = agent.process
            self.health_port = agent.health_port
            wait_until(lambda: agent.health("/readyz") == 200, 120, "the Tether agent to be ready")
        elif self.executor == "edge":
            self.worker = spawn(
                "edge-worker",
                [str(self.plane.bin_dir / "airflow"), "edge", "worker", "--concurrency", str(SLOTS)],
                self.plane.env,
                self.plane.home / "logs",
            )
            self.plane.processes["edge-worker"] = self.worker
            self.settings = edge_settings(self.plane)
            wait_until(self._edge_worker_idle, 120, "the Edge worker to register")

    def _edge_worker_idle(self) -> bool:
        assert self.worker is not None
        if not self.worker.alive():
            raise RuntimeError(f"the Edge worker exited:\n{self.worker.tail()}")
        with contextlib.suppress(Exception):
            return bool(self.plane.query("SELECT 1 FROM edge_worker WHERE state = 'idle'"))
        return False

    def stop(self) -> None:
        self.plane.stop()


def agent_settings(env: dict[str, str]) -> dict[str, str]:
    """The agent's settings that tell the rows apart, parsed from its environment as the agent parses it."""
    from tether.agent import settings

    parsed = settings.load(None, env)
    return {"slots": str(parsed.slots), "task_nice": str(parsed.task_nice), "warm_start": str(parsed.warm_start)}


def edge_settings(plane: Plane) -> dict[str, str]:
    """The Edge worker's poll and heartbeat intervals, as its own ``airflow config`` reads them."""
    found = {}
    for option in ("job_poll_interval", "heartbeat_interval"):
        result = subprocess.run(
            [str(plane.bin_dir / "airflow"), "config", "get-value", "edge", option],
            env=plane.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        found[option] = result.stdout.strip()
    return found


def make_plane(
    executor: str, home: Path, database_url: str, *, dags_folder: Path = DAGS, extra: dict[str, str] | None = None
) -> Plane:
    """The plane of ``executor`` on ``database_url``, with the benchmark's DAGs and the product's settings."""
    plane = Plane(
        home=home,
        dags_folder=dags_folder,
        sql_alchemy_conn=database_url,
        extra_env={**plane_env(executor), **(extra or {})},
        bin_dir=bin_dir(executor),
    )
    if executor == "edge":
        plane.extra_env["AIRFLOW__EDGE__API_URL"] = f"{plane.url}/edge_worker/v1/rpcapi"
    return plane


def prepare_template(executor: str, pg: Postgres, work: Path) -> str:
    """A migrated, empty metadata database for ``executor`` to copy deployments from."""
    name = pg.create(f"bench_tmpl_{executor}")
    make_plane(executor, work / f"template-{executor}", pg.url(name)).migrate()
    return name


def deploy(variant: Variant, pg: Postgres, template: str, work: Path, run: int) -> Deployment:
    """Copy the template, start the plane, wait until every benchmark DAG is parsed."""
    executor = variant.executor
    name = pg.create(f"bench_{variant.name.replace('-', '_')}_r{run}", template=template)
    plane = make_plane(executor, work / f"{variant.name}-run{run}", pg.url(name), extra=variant.plane)
    deployment = Deployment(variant=variant, plane=plane, database=name)
    try:
        plane.home.mkdir(parents=True, exist_ok=True)
        if executor == "tether":
            deployment.token = plane.create_token("bench")
        plane.start(ready_path=AGENT_API_HEALTH if executor == "tether" else "/api/v2/monitor/health")
        for dag_id in DAG_IDS:
            plane.wait_for_dag(dag_id)
    except BaseException:
        deployment.stop()
        raise
    return deployment


@contextlib.contextmanager
def deployed(variant: Variant, pg: Postgres, template: str, work: Path, run: int) -> Iterator[Deployment]:
    deployment = deploy(variant, pg, template, work, run)
    try:
        yield deployment
    finally:
        deployment.stop()
        pg.drop(deployment.database)
