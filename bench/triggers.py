"""Triggers: Tether's ``tether-agent triggerer`` against Airflow's own ``airflow triggerer``.

Both sides get the same plane (API server, scheduler, DAG processor, Tether's
executor) on a fresh database copied from the migrated template, and the same
worker: one ``tether-agent run`` with 16 slots. Only the triggerer differs:
on Tether's side the plane runs none and a ``tether-agent triggerer`` runs the
triggers; on Airflow's, the plane runs ``airflow triggerer``. Both at their
defaults (``[triggerer] capacity`` 1000).

Two figures:

- latency: tasks of ``bench/dags_triggers/deferred_wait.py`` defer on Airflow's
  ``DateTimeTrigger``, each until a known moment spaced out from the last;
  latency is from that moment to the resumed try's start (the time the task's
  resume method took when it began), split at the moment the event was in the
  database (the task instance's ``scheduled_dttm``, which Airflow's
  ``Trigger.submit_event`` writes on both sides);
- memory: RSS and PSS of the triggerer's process tree (agent, or ``airflow
  triggerer``, and the trigger runner it forks) with no triggers and with
  many that wait an hour. The waiting triggers are the same on both sides: one
  deployment, whose tasks defer once; Tether's agent holds them first, then
  stops (which hands them back at once) and Airflow's triggerer takes them.
"""

from __future__ import annotations

import contextlib
import json
import math
import secrets
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any, Literal

import psutil

from bench.deploy import BENCH, SLOTS, Postgres, log, make_plane
from bench.measure import tree
from bench.stats import percentile
from tether.embedded import AGENT_API_HEALTH, AgentProcess, ManagedProcess, Plane, free_port, start_agent, wait_until

Side = Literal["tether", "airflow"]
SIDES: tuple[Side, ...] = ("tether", "airflow")
NAMES: dict[str, str] = {"tether": "Tether: `tether-agent triggerer`", "airflow": "Airflow: `airflow triggerer`"}
DAGS = BENCH / "dags_triggers"
DAG_ID = "deferred_wait"
#: A try whose first part deferred less than this before its trigger's moment is left out of the latencies:
#: its trigger may not have been running by then (triggerers load new triggers once a second).
LOAD_MARGIN = 3.0


@dataclass(frozen=True)
class TriggerWorkload:
    """How many tasks and triggers, and how they are spaced."""

    #: Deferred tasks whose trigger-to-start latency is measured.
    tasks: int = 100
    #: Seconds between two tasks' trigger moments.
    spacing: float = 1.5
    #: Triggers that wait (an hour) while the triggerer's memory is measured.
    waiting: int = 1000
    #: Seconds from the triggerer holding every waiting trigger to the first memory sample.
    settle: float = 20.0
    #: Memory samples, one a second.
    samples: int = 10

    @property
    def lead(self) -> float:
        """Seconds from the run's start to its first trigger's moment: time for every task to defer first."""
        return 45.0 + 1.5 * self.tasks

    @property
    def defer_timeout(self) -> float:
        return 300.0 + 2.0 * self.waiting


@dataclass
class TreeMemory:
    """A process tree's memory in MiB, the median of a few samples."""

    rss: float
    pss: float
    processes: int
    #: Airflow's triggerer only: its log server (a child listening on ``[logging] trigger_log_server_port``).
    log_server_rss: float | None = None
    log_server_pss: float | None = None


@dataclass
class LatencyRun:
    side: str
    run: int
    tasks: int
    #: Trigger moment -> resumed try's start, seconds, one per task measured.
    latencies: list[float]
    #: Trigger moment -> event in the database (``scheduled_dttm``).
    to_event: list[float]
    #: Event in the database -> resumed try's start.
    event_to_start: list[float]
    #: Tasks left out: they deferred too close to (or after) their trigger's moment.
    excluded: int
    #: Seconds between the last task deferring and the first trigger's moment (negative: after it).
    defer_margin: float | None
    state: str
    idle: TreeMemory
    settings: dict[str, str] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class WaitingMemory:
    side: str
    triggers: int
    memory: TreeMemory

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _plain_settings(workload: TriggerWorkload) -> dict[str, str]:
    return {
        "worker": f"one `tether-agent run`, {SLOTS} slots, Tether's executor on the plane",
        "capacity": "1000 (Airflow's `[triggerer] capacity` default, and the agent's `trigger_capacity` default)",
        "trigger": "airflow.providers.standard.triggers.temporal.DateTimeTrigger",
        "spacing": f"{workload.spacing:g}",
    }


def _versions() -> dict[str, str]:
    return {
        dist: version(dist) for dist in ("apache-airflow-core", "apache-airflow-providers-standard", "airflow-tether")
    }


# -- memory ----------------------------------------------------------------------------


def _listens_on(proc: psutil.Process, port: int) -> bool:
    with contextlib.suppress(psutil.Error):
        return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in proc.net_connections("inet"))
    return False


def tree_memory_once(root: int, log_port: int | None = None) -> TreeMemory:
    """RSS and PSS of ``root`` and its descendants now; the log server's share where ``log_port`` is given."""
    rss = pss = 0
    server_rss = server_pss = 0
    server = False
    procs = tree([root])
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            info = proc.memory_full_info()
            rss += info.rss
            pss += info.pss
            if log_port is not None and _listens_on(proc, log_port):
                server = True
                server_rss += info.rss
                server_pss += info.pss
    mib = 2**20
    return TreeMemory(
        rss=rss / mib,
        pss=pss / mib,
        processes=len(procs),
        log_server_rss=server_rss / mib if server else None,
        log_server_pss=server_pss / mib if server else None,
    )


def tree_memory(root: int, samples: int, log_port: int | None = None) -> TreeMemory:
    """The median of ``samples`` readings a second apart."""
    taken = []
    for n in range(samples):
        if n:
            time.sleep(1.0)
        taken.append(tree_memory_once(root, log_port))

    def mid(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return statistics.median(known) if known else None

    return TreeMemory(
        rss=statistics.median(t.rss for t in taken),
        pss=statistics.median(t.pss for t in taken),
        processes=max(t.processes for t in taken),
        log_server_rss=mid([t.log_server_rss for t in taken]),
        log_server_pss=mid([t.log_server_pss for t in taken]),
    )


# -- a deployment --------------------------------------------------------------------------


@dataclass
class TriggerDeployment:
    plane: Plane
    token: str
    log_port: int
    worker: AgentProcess | None = None
    triggerer: AgentProcess | None = None

    def start_worker(self) -> None:
        self.worker = start_agent(self.plane, "worker", self.token, queues="default", slots=str(SLOTS))
        wait_until(lambda: self.worker is not None and self.worker.health("/readyz") == 200, 120, "the worker ready")

    def start_triggerer(self, side: Side) -> ManagedProcess:
        """Start ``side``'s triggerer and wait until it has a triggerer job and a trigger runner."""
        if side == "tether":
            agent = start_agent(self.plane, "triggerer", self.token, command="triggerer")
            self.triggerer = agent
            wait_until(lambda: agent.health("/readyz") == 200, 120, "the triggerer agent ready")
            proc = agent.process
        else:
            proc = self.plane.start_component("triggerer")
        started = time.monotonic()

        def ready() -> bool:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
            jobs = self.plane.query("SELECT count(*) FROM job WHERE job_type = 'TriggererJob' AND state = 'running'")
            return bool(jobs[0][0]) and bool(tree([proc.pid], include_roots=False))

        wait_until(ready, 120, f"{proc.name}: a triggerer job and a trigger runner")
        log(f"  {NAMES[side]} ready after {time.monotonic() - started:.1f}s")
        return proc

    def job_id(self) -> int:
        rows = self.plane.query(
            "SELECT id FROM job WHERE job_type = 'TriggererJob' AND state = 'running' ORDER BY id DESC LIMIT 1"
        )
        return int(rows[0][0])

    def start_run(self, conf: dict[str, Any]) -> str:
        run_id = f"bench_{secrets.token_hex(4)}"
        with self.plane.rest_client() as api:
            api.post(
                f"/dags/{DAG_ID}/dagRuns", json={"dag_run_id": run_id, "logical_date": None, "conf": conf}
            ).raise_for_status()
        return run_id

    def deferred(self, run_id: str) -> int:
        rows = self.plane.query(
            "SELECT count(*) FROM task_instance WHERE dag_id = :d AND run_id = :r AND task_id = 'wait' "
            "AND state = 'deferred'",
            d=DAG_ID,
            r=run_id,
        )
        return int(rows[0][0])


@contextlib.contextmanager
def deployed(pg: Postgres, template: str, work: Path, label: str) -> Iterator[TriggerDeployment]:
    """A plane without a triggerer, its worker agent started, the DAG parsed."""
    name = pg.create(f"bench_trig_{label}", template=template)
    plane = make_plane("tether", work / f"triggers-{label}", pg.url(name), dags_folder=DAGS)
    log_port = free_port()
    # Airflow's triggerer serves its trigger logs there; another deployment on this machine may hold the default.
    plane.extra_env["AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT"] = str(log_port)
    try:
        plane.home.mkdir(parents=True, exist_ok=True)
        token = plane.create_token("bench-triggers", scopes=("worker", "triggerer"))
        plane.start(ready_path=AGENT_API_HEALTH)
        plane.wait_for_dag(DAG_ID)
        deployment = TriggerDeployment(plane=plane, token=token, log_port=log_port)
        deployment.start_worker()
        yield deployment
    finally:
        plane.stop()
        pg.drop(name)


# -- latency -------------------------------------------------------------------------------


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str | bytes) else value


def _when(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Resumed:
    """One task's times, from its resumed try's XCom and its task instance."""

    moment: datetime
    deferred: datetime
    resumed: datetime
    event: datetime | None


def split_latencies(
    rows: list[Resumed], margin: float = LOAD_MARGIN
) -> tuple[list[float], list[float], list[float], int]:
    """Latencies (moment -> resumed start), its two parts (-> event, event ->), and how many tasks were left out."""
    latencies, to_event, event_to_start = [], [], []
    excluded = 0
    for row in rows:
        if (row.moment - row.deferred).total_seconds() < margin:
            excluded += 1
            continue
        latencies.append((row.resumed - row.moment).total_seconds())
        if row.event is not None:
            to_event.append((row.event - row.moment).total_seconds())
            event_to_start.append((row.resumed - row.event).total_seconds())
    return sorted(latencies), sorted(to_event), sorted(event_to_start), excluded


def _resumed(plane: Plane, run_id: str) -> list[Resumed]:
    rows = plane.query(
        "SELECT ti.scheduled_dttm, x.value FROM task_instance ti JOIN xcom x ON x.dag_id = ti.dag_id "
        "AND x.run_id = ti.run_id AND x.task_id = ti.task_id AND x.map_index = ti.map_index "
        "AND x.key = 'return_value' WHERE ti.dag_id = :d AND ti.run_id = :r AND ti.task_id = 'wait'",
        d=DAG_ID,
        r=run_id,
    )
    out = []
    for event, value in rows:
        times = _json(value)
        out.append(
            Resumed(
                moment=_when(times["moment"]),
                deferred=_when(times["deferred"]),
                resumed=_when(times["resumed"]),
                event=event,
            )
        )
    return out


def measure_latency(
    side: Side, pg: Postgres, template: str, work: Path, run: int, workload: TriggerWorkload
) -> LatencyRun:
    """A fresh deployment with ``side``'s triggerer: its idle tree, then ``workload.tasks`` deferred tasks."""
    with deployed(pg, template, work, f"{side}_r{run}") as deployment:
        proc = deployment.start_triggerer(side)
        time.sleep(5)
        idle = tree_memory(proc.pid, 3, deployment.log_port if side == "airflow" else None)
        log(f"  {NAMES[side]}: idle tree RSS {idle.rss:.0f} MiB, PSS {idle.pss:.0f} MiB, {idle.processes} processes")
        fire_at = datetime.now(UTC) + timedelta(seconds=workload.lead)
        conf = {"count": workload.tasks, "fire_at": fire_at.isoformat(), "spacing": workload.spacing}
        run_id = deployment.start_run(conf)
        plane = deployment.plane
        margin = None
        deadline = fire_at + timedelta(seconds=workload.tasks * workload.spacing)
        while datetime.now(UTC) < deadline:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
            if deployment.deferred(run_id) >= workload.tasks:
                margin = (fire_at - datetime.now(UTC)).total_seconds()
                log(f"  {NAMES[side]}: all {workload.tasks} tasks deferred, {margin:.0f}s before the first moment")
                break
            time.sleep(1)
        else:
            log(f"  {NAMES[side]}: not every task deferred before its trigger's moment (late ones are left out)")
        timeout = workload.lead + workload.tasks * workload.spacing + 600
        state = plane.wait_for_run(DAG_ID, run_id, timeout=timeout)
        latencies, to_event, event_to_start, excluded = split_latencies(_resumed(plane, run_id))
        result = LatencyRun(
            side=side,
            run=run,
            tasks=workload.tasks,
            latencies=latencies,
            to_event=to_event,
            event_to_start=event_to_start,
            excluded=excluded,
            defer_margin=margin,
            state=state,
            idle=idle,
            settings=_plain_settings(workload),
            versions=_versions(),
        )
        log(f"  {latency_summary(result)}")
        if state != "success":
            raise RuntimeError(f"{NAMES[side]}: {DAG_ID} ended {state}")
        return result


def latency_summary(result: LatencyRun) -> str:
    p50, p90 = percentile(result.latencies, 0.5), percentile(result.latencies, 0.9)
    return (
        f"{NAMES[result.side]}: {len(result.latencies)} of {result.tasks} tasks, moment -> resumed start "
        f"p50 {_num(p50)}s p90 {_num(p90)}s"
        + (f" ({result.excluded} left out: deferred too late)" if result.excluded else "")
    )


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# -- memory with waiting triggers ------------------------------------------------------------


def _assigned(deployment: TriggerDeployment, job_id: int) -> int:
    rows = deployment.plane.query("SELECT count(*) FROM trigger WHERE triggerer_id = :j", j=job_id)
    return int(rows[0][0])


def _agent_running(agent: AgentProcess) -> float:
    for line in agent.metrics().splitlines():
        if line.startswith("tether_agent_triggers_running "):
            return float(line.rsplit(" ", 1)[1])
    return math.nan


def _hold(deployment: TriggerDeployment, side: Side, proc: ManagedProcess, workload: TriggerWorkload) -> None:
    """Wait until ``side``'s triggerer job holds every waiting trigger (and Tether's agent says it runs them)."""
    job_id = deployment.job_id()

    def holds() -> bool:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
        if _assigned(deployment, job_id) < workload.waiting:
            return False
        agent = deployment.triggerer
        return side == "airflow" or (agent is not None and _agent_running(agent) >= workload.waiting)

    wait_until(holds, 300, f"{NAMES[side]}: {workload.waiting} triggers held", interval=1.0)


def measure_waiting(
    pg: Postgres, template: str, work: Path, run: int, workload: TriggerWorkload
) -> list[WaitingMemory]:
    """One deployment, ``workload.waiting`` tasks deferred for an hour: Tether's agent holds them, then Airflow's."""
    results = []
    with deployed(pg, template, work, f"waiting_r{run}") as deployment:
        started = time.monotonic()
        proc = deployment.start_triggerer("tether")
        run_id = deployment.start_run({"count": workload.waiting, "delay": 3600})
        wait_until(
            lambda: deployment.deferred(run_id) >= workload.waiting,
            workload.defer_timeout,
            f"{workload.waiting} tasks deferred",
            interval=2.0,
        )
        log(f"  {workload.waiting} tasks deferred after {time.monotonic() - started:.0f}s")
        for side in SIDES:
            if side == "airflow":
                assert deployment.triggerer is not None
                # SIGTERM: the agent stops its runner and releases its job, which hands its triggers back at once.
                deployment.triggerer.process.stop(timeout=60)
                proc = deployment.start_triggerer("airflow")
            _hold(deployment, side, proc, workload)
            time.sleep(workload.settle)
            memory = tree_memory(proc.pid, workload.samples, deployment.log_port if side == "airflow" else None)
            results.append(WaitingMemory(side=side, triggers=workload.waiting, memory=memory))
            log(
                f"  {NAMES[side]} holding {workload.waiting} triggers: tree RSS {memory.rss:.0f} MiB, "
                f"PSS {memory.pss:.0f} MiB, {memory.processes} processes"
            )
    return results
