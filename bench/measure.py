"""What one deployment measures: idle costs, then each DAG run with its tasks' latencies and memory."""

from __future__ import annotations

import contextlib
import os
import secrets
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import psutil

from bench.deploy import DAG_IDS, Deployment, Postgres, log


def tree(roots: list[int], *, include_roots: bool = True) -> list[psutil.Process]:
    procs: list[psutil.Process] = []
    for pid in roots:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            if include_roots:
                procs.append(root)
            procs.extend(root.children(recursive=True))
    return procs


def tree_pss(roots: list[int], *, include_roots: bool = True) -> tuple[float, int]:
    """Proportional set size of a process tree in MiB, and how many processes it has."""
    total = 0
    procs = tree(roots, include_roots=include_roots)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_full_info().pss
    return total / 2**20, len(procs)


def tree_rss(roots: list[int]) -> float:
    total = 0
    for proc in tree(roots):
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total / 2**20


def tree_cpu(roots: list[int], *, include_roots: bool = True) -> float:
    """CPU seconds used so far by the live processes of a tree."""
    total = 0.0
    for proc in tree(roots, include_roots=include_roots):
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
    return total


def machine_cpu() -> float | None:
    """CPU seconds the whole machine has spent busy since boot: user, nice, system, irq and softirq.

    Idle, I/O wait and steal (time the hypervisor gave to another machine) are not busy.
    """
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:8]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq = fields
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def postmaster() -> int | None:
    """PostgreSQL's postmaster on this machine: its tree holds every backend, and the reaped ones' CPU."""
    for proc in psutil.process_iter(["name", "ppid"]):
        with contextlib.suppress(psutil.Error):
            if proc.info["name"] in ("postgres", "postmaster") and psutil.Process(proc.info["ppid"]).name() not in (
                "postgres",
                "postmaster",
            ):
                return int(proc.pid)
    return None


def own_cpu(pid: int) -> float:
    """CPU seconds of one process without its children."""
    with contextlib.suppress(psutil.Error):
        times = psutil.Process(pid).cpu_times()
        return float(times.user + times.system)
    return 0.0


#: Where a deployment's CPU goes, by component: each read as a process tree (see ``component_cpu``).
COMPONENTS = ("api-server", "scheduler", "dag-processor", "workers", "postgres")


def component_cpu(deployment: Deployment) -> dict[str, float]:
    """CPU seconds used so far by each component of a deployment.

    The scheduler is counted without its children: the LocalExecutor's workers are
    its children and count as ``workers``, as the Tether agent's and the Edge
    worker's trees do. PostgreSQL is the whole server (only this deployment uses it).
    """
    roots, include = deployment.worker_roots()
    cpu = {
        "api-server": tree_cpu([deployment.pid("api-server")]),
        "scheduler": own_cpu(deployment.pid("scheduler")),
        "dag-processor": tree_cpu([deployment.pid("dag-processor")]),
        "workers": tree_cpu(roots, include_roots=include),
    }
    pg = postmaster()
    if pg is not None:
        cpu["postgres"] = tree_cpu([pg])
    return cpu


class PeakSampler:
    """Samples a tree's PSS on a thread until stopped; keeps the peak. Bounded by ``limit`` seconds."""

    def __init__(self, roots: list[int], *, include_roots: bool, interval: float = 0.5, limit: float = 900) -> None:
        self.roots = roots
        self.include_roots = include_roots
        self.interval = interval
        self.limit = limit
        self.peak = 0.0
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pss-sampler", daemon=True)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set() and time.monotonic() - started < self.limit:
            pss, _ = tree_pss(self.roots, include_roots=self.include_roots)
            self.samples.append((time.monotonic() - started, pss))
            self.peak = max(self.peak, pss)
            self._stop.wait(self.interval)


@dataclass
class IdleCosts:
    window: float
    api_cpu_no_worker: float
    api_cpu: float
    worker_cpu: float | None
    xacts_no_worker: float
    xacts: float
    worker_pss: float
    worker_processes: int

    @property
    def xacts_per_agent(self) -> float:
        return max(self.xacts - self.xacts_no_worker, 0.0)


def _window(deployment: Deployment, pg: Postgres, seconds: float) -> tuple[float, float, float]:
    """API-server CPU seconds, worker CPU seconds and DB transactions/s over an idle window."""
    api = [deployment.pid("api-server")]
    roots, include = deployment.worker_roots()
    api0, worker0, x0 = tree_cpu(api), tree_cpu(roots, include_roots=include), pg.xact_commit(deployment.database)
    time.sleep(seconds)
    api1, worker1, x1 = tree_cpu(api), tree_cpu(roots, include_roots=include), pg.xact_commit(deployment.database)
    # Our own two reads are transactions too.
    return api1 - api0, worker1 - worker0, max(x1 - x0 - 1, 0) / seconds


def idle_costs(deployment: Deployment, pg: Postgres, seconds: float) -> IdleCosts:
    """Two idle windows: the plane alone, then with the worker started and settled."""
    api_alone, _, x_alone = _window(deployment, pg, seconds)
    deployment.start_worker()
    time.sleep(3)
    api, worker, x = _window(deployment, pg, seconds)
    roots, include = deployment.worker_roots()
    pss, count = tree_pss(roots, include_roots=include)
    return IdleCosts(
        window=seconds,
        api_cpu_no_worker=api_alone,
        api_cpu=api,
        worker_cpu=worker if deployment.worker is not None else None,
        xacts_no_worker=x_alone,
        xacts=x,
        worker_pss=pss,
        worker_processes=count,
    )


@dataclass
class DagRun:
    dag_id: str
    run_id: str
    state: str
    wall: float
    latencies: list[float]
    peak_running: int
    peak_pss: float | None
    tasks: int
    pss_samples: list[tuple[float, float]] = field(default_factory=list)
    #: CPU seconds the whole machine spent from the trigger's return to the run's end, and its CPUs.
    machine_cpu: float | None = None
    cpus: int | None = None
    #: The same span's CPU seconds by component (``COMPONENTS``); the rest of the machine's is everything else.
    component_cpu: dict[str, float] = field(default_factory=dict)

    @property
    def tasks_per_second(self) -> float:
        return self.tasks / self.wall if self.wall > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["tasks_per_second"] = self.tasks_per_second
        return data


def peak_overlap(intervals: list[tuple[datetime, datetime]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def run_dag(deployment: Deployment, dag_id: str, timeout: float, *, sample_memory: bool = False) -> DagRun:
    """Trigger one run and wait for it; with ``sample_memory``, the worker tree's PSS is sampled throughout.

    Sampling reads every process's ``smaps_rollup`` twice a second: on two cores
    that takes CPU from what it observes, and not equally for every executor, so
    timed runs are left unobserved and memory has a run of its own.
    """
    plane = deployment.plane
    run_id = f"bench_{secrets.token_hex(4)}"
    roots, include = deployment.worker_roots()
    sampler = PeakSampler(roots, include_roots=include, limit=timeout + 60) if sample_memory else None
    with sampler or contextlib.nullcontext():
        plane.trigger(dag_id, run_id)
        # From here: the trigger command's own interpreter (seconds of CPU) has done its work.
        cpu_before, parts_before = machine_cpu(), component_cpu(deployment)
        state = plane.wait_for_run(dag_id, run_id, timeout=timeout)
        cpu_after, parts_after = machine_cpu(), component_cpu(deployment)
    (queued_at, end_date), *_ = plane.query(
        "SELECT queued_at, end_date FROM dag_run WHERE dag_id = :d AND run_id = :r", d=dag_id, r=run_id
    )
    rows = plane.query(
        "SELECT queued_dttm, start_date, end_date FROM task_instance WHERE dag_id = :d AND run_id = :r",
        d=dag_id,
        r=run_id,
    )
    latencies = [(start - queued).total_seconds() for queued, start, _ in rows if queued and start]
    intervals = [(start, end) for _, start, end in rows if start and end]
    return DagRun(
        dag_id=dag_id,
        run_id=run_id,
        state=state,
        wall=(end_date - queued_at).total_seconds(),
        latencies=sorted(latencies),
        peak_running=peak_overlap(intervals),
        peak_pss=sampler.peak if sampler else None,
        tasks=len(rows),
        pss_samples=sampler.samples if sampler else [],
        machine_cpu=None if cpu_before is None or cpu_after is None else cpu_after - cpu_before,
        cpus=os.cpu_count(),
        component_cpu={k: parts_after[k] - parts_before[k] for k in parts_after if k in parts_before},
    )


@dataclass
class DeploymentResult:
    executor: str
    run: int
    idle: IdleCosts
    #: The memory run: fanout_100 with the worker tree's PSS sampled, not timed.
    memory: DagRun
    #: The timed runs, one per DAG, unobserved.
    dags: dict[str, DagRun]
    #: What the task-running side ran with, read from the deployment.
    settings: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        idle = asdict(self.idle)
        idle["xacts_per_agent"] = self.idle.xacts_per_agent
        return {
            "executor": self.executor,
            "run": self.run,
            "idle": idle,
            "memory": self.memory.as_dict(),
            "dags": {k: v.as_dict() for k, v in self.dags.items()},
            "settings": self.settings,
        }


def _log_and_check(deployment: Deployment, result: DagRun, what: str) -> None:
    p50 = statistics.median(result.latencies) if result.latencies else float("nan")
    log(
        f"  {deployment.variant.name}: {what} {result.state} in {result.wall:.2f}s "
        f"(queued->start p50 {p50:.3f}s, peak running {result.peak_running}"
        + (f", peak PSS {result.peak_pss:.0f} MiB)" if result.peak_pss is not None else ")")
    )
    if result.state != "success":
        raise RuntimeError(f"{deployment.variant.name}: {result.dag_id} ended {result.state}")


def measure(deployment: Deployment, pg: Postgres, *, run: int, idle_window: float, timeout: float) -> DeploymentResult:
    log(f"  {deployment.variant.name}: idle windows ({idle_window:.0f}s each)")
    idle = idle_costs(deployment, pg, idle_window)
    # First, so it is also every executor's warm-up: on a fresh plane the first
    # task took 1.8-2.3 s, for every executor, against about 0.1 s afterwards.
    memory = run_dag(deployment, "fanout_100", timeout, sample_memory=True)
    _log_and_check(deployment, memory, "fanout_100 (memory run, not timed)")
    dags = {}
    for dag_id in DAG_IDS:
        dags[dag_id] = run_dag(deployment, dag_id, timeout)
        _log_and_check(deployment, dags[dag_id], dag_id)
    return DeploymentResult(
        executor=deployment.variant.name,
        run=run,
        idle=idle,
        memory=memory,
        dags=dags,
        settings=dict(deployment.settings),
    )
