"""``TetherExecutor``: hands Airflow workloads to remote agents through the metadata DB.

The executor never talks to agents. ``queue_workload`` writes a job row in the
scheduler's own transaction (so a rolled-back scheduling decision leaves no job
behind); agents claim rows through the agent API; ``sync`` turns the rows' state
changes into executor events and sweeps leases and agents that went silent -
silent while the agent API was answering, which it checks with a health probe.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.executors import workloads
from airflow.executors.base_executor import BaseExecutor
from airflow.models.taskinstancekey import TaskInstanceKey
from airflow.utils.state import TaskInstanceState
from sqlalchemy.exc import SQLAlchemyError

from tether.plane import metrics
from tether.plane.config import PlaneSettings
from tether.plane.store import Store
from tether.protocol import AgentRole, AgentStatus, JobState

if TYPE_CHECKING:
    from airflow.models.taskinstance import TaskInstance
    from sqlalchemy.orm import Session

log = logging.getLogger(__name__)

#: Sweeping and purging need not run on every scheduler loop.
_SWEEP_EVERY = timedelta(seconds=1)
_PURGE_EVERY = timedelta(minutes=5)
#: How often triggers no deferred task, asset or callback needs are deleted (what Airflow's triggerer does
#: every loop; triggerer agents have no database to do it).
_TRIGGER_CLEAN_EVERY = timedelta(seconds=5)
_MISSING_GRACE = timedelta(seconds=60)
#: How often the plane's gauges (jobs by queue and state, agents by status and role) are sent.
_GAUGES_EVERY = timedelta(seconds=5)
#: How old the view of finished jobs may be when a full executor is asked for free slots.
_FULL_REFRESH_EVERY = timedelta(milliseconds=100)


def agent_api_health_url() -> str:
    """Where the scheduler finds the agent API: next to the Execution API, which it is mounted beside."""
    from airflow.configuration import conf

    execution = conf.get("core", "execution_api_server_url", fallback="") or ""
    if not execution:
        execution = (conf.get("api", "base_url", fallback="") or "http://localhost:8080").rstrip("/") + "/execution/"
    root = execution.rstrip("/").removesuffix("/execution")
    return f"{root}/tether/v1/health"


def http_probe(url: str, *, timeout: float = 2.0) -> Callable[[], bool]:
    """A probe answering whether ``url`` returns 200 now.

    It keeps one client (and its connection) for its lifetime: the scheduler
    probes every second, and a new client per probe costs a TLS context each time.
    A failure on a kept connection (the server closed it) is retried once on a new one.
    """
    import httpx
    from airflow.configuration import conf

    verify: str | bool = conf.get("api", "ssl_ca_file", fallback="") or True
    client: httpx.Client | None = None

    def probe() -> bool:
        nonlocal client
        if client is None:
            client = httpx.Client(timeout=timeout, verify=verify)
        for _ in range(2):
            try:
                return client.get(url).status_code == 200
            except httpx.HTTPError:
                continue
        return False

    return probe


class AgentApiWatch:
    """Whether the agent API has answered long enough for an agent's silence to mean anything.

    Agents heartbeat through the agent API. While it is away every agent falls
    silent at once, through no fault of theirs; after it is back each one gets
    a full health timeout to be heard again before its silence counts (ADR 4).

    "Away" includes a stall: an API server whose event loop is busy for seconds
    (Airflow builds its Execution API's routes on the first call it gets, for
    about five seconds of CPU) answers nothing meanwhile, then answers the probe
    at once while the heartbeats that waited with it are still on their way to
    the database. So the API counts as there only while looks at it, each
    answered, are at most ``max_gap`` apart: a longer gap between two answers
    starts the grace again.
    """

    def __init__(
        self,
        probe: Callable[[], bool],
        *,
        grace: timedelta,
        max_gap: timedelta,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._probe = probe
        self._grace = grace.total_seconds()
        self._max_gap = max_gap.total_seconds()
        self._clock = clock
        self._up_since: float | None = None
        self._answered_at: float | None = None
        self._was_up = True

    def silence_counts(self) -> bool:
        up = self._probe()
        now = self._clock()
        if up != self._was_up:
            self._was_up = up
            if up:
                log.info("The agent API answers again")
            else:
                log.warning(
                    "The agent API does not answer; agents are not declared unhealthy for missed heartbeats "
                    "until it has been back for %.0fs",
                    self._grace,
                )
        if not up:
            self._up_since = self._answered_at = None
            return False
        if self._answered_at is not None and now - self._answered_at > self._max_gap:
            log.info(
                "The agent API was not seen answering for %.1fs; agents get %.0fs to heartbeat before "
                "missed heartbeats count",
                now - self._answered_at,
                self._grace,
            )
            self._up_since = None
        self._answered_at = now
        if self._up_since is None:
            self._up_since = now
        return now - self._up_since >= self._grace


def _default_store() -> Store:
    from tether.plane.store import airflow_session_factory

    return Store(airflow_session_factory(), settings=PlaneSettings.from_airflow())


class TetherExecutor(BaseExecutor):
    """Runs task instances on Tether agents."""

    supports_ad_hoc_ti_run = True
    supports_callbacks = True
    supports_connection_test = True
    serve_logs = False

    def __init__(
        self,
        *args: Any,
        store: Store | None = None,
        agent_api_watch: AgentApiWatch | None = None,
        clock: Callable[[], float] = time.monotonic,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._clock = clock
        self._store = store
        self._watch = agent_api_watch
        # ti (callback, connection test) id -> (key, try number, last state reported to the scheduler)
        self._tracked: dict[str, tuple[Any, int, JobState]] = {}
        self._missing_since: dict[str, float] = {}
        self._next_sweep = 0.0
        self._next_purge = 0.0
        self._next_trigger_clean = 0.0
        self._next_gauges = 0.0
        #: Queues whose job gauges were last sent non-zero: each gets one zero when its work is gone.
        self._gauged_queues: set[str] = set()
        self._reported_at = float("-inf")

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = _default_store()
        return self._store

    @property
    def watch(self) -> AgentApiWatch:
        if self._watch is None:
            settings = self.store.settings
            self._watch = AgentApiWatch(
                http_probe(agent_api_health_url()),
                grace=settings.health_timeout,
                # The scheduler looks about every second, more slowly when busy.
                max_gap=max(settings.heartbeat_interval, 2 * _SWEEP_EVERY),
            )
        return self._watch

    def start(self) -> None:
        self.log.info("Tether executor started (parallelism %d)", self.parallelism)

    def queue_workload(self, workload: workloads.All, session: Session) -> None:  # type: ignore[override]
        """Write the job agents claim: a task, a callback (deadline alerts') or a connection test (the UI's)."""
        if isinstance(workload, workloads.ExecuteTask):
            key: Any = workload.ti.key
            job_id, try_number = str(workload.ti.id), workload.ti.try_number
        elif isinstance(workload, workloads.ExecuteCallback):
            key, job_id, try_number = workload.key, str(workload.callback.id), 1
        elif isinstance(workload, workloads.TestConnection):
            key, job_id, try_number = workload.key, str(workload.connection_test_id), 1
        else:
            raise TypeError(f"TetherExecutor cannot run {type(workload).__name__} workloads")
        self.store.enqueue(session, workload)
        # Counted as running from now on so [core] parallelism bounds jobs in flight,
        # not just jobs an agent has started.
        self.running.add(key)
        self._tracked[job_id] = (key, try_number, JobState.QUEUED)

    def fail_connection_test(self, key: Any) -> None:
        """Airflow gave up on a connection test (its timeout passed): its job is taken away from agents."""
        super().fail_connection_test(key)
        self.store.revoke(str(key), 1)
        self._tracked.pop(str(key), None)

    def _process_workloads(self, workload_items: Sequence[Any]) -> None:
        """Nothing to do: ``queue_workload`` already wrote each job for agents to claim."""

    @property
    def slots_available(self) -> int:
        """Free slots, counting jobs that finished since the last ``sync`` when none seemed free.

        The scheduler asks for free slots before it calls ``sync`` in its loop, and
        sleeps after a loop that queued nothing. Without this look a slot freed by a
        finished job could only be used two loops later - about two seconds on an
        idle scheduler; with it, on the next loop.
        """
        free: int = super().slots_available
        if free <= 0:
            self._refresh_finished()
            free = super().slots_available
        return free

    def _refresh_finished(self) -> None:
        if self._clock() - self._reported_at < _FULL_REFRESH_EVERY.total_seconds():
            return
        try:
            self._report_changes()
        except SQLAlchemyError as exc:
            # ``sync`` tries again in this same loop and fails loudly there if the database is gone.
            self.log.warning("Could not look for finished Tether jobs: %s", exc)

    def sync(self) -> None:
        now = self._clock()
        if now >= self._next_sweep:
            self._next_sweep = now + _SWEEP_EVERY.total_seconds()
            self._upkeep(self._sweep, "Tether sweep failed")
        if now >= self._next_gauges:
            self._next_gauges = now + _GAUGES_EVERY.total_seconds()
            self._upkeep(self._send_gauges, "Could not count jobs and agents for the plane's metrics")
        if now >= self._next_trigger_clean:
            self._next_trigger_clean = now + _TRIGGER_CLEAN_EVERY.total_seconds()
            self._upkeep(self.store.clean_triggers, "Could not clean unused triggers")
        if now >= self._next_purge:
            self._next_purge = now + _PURGE_EVERY.total_seconds()
            self._upkeep(self.store.purge, "Could not delete finished Tether jobs")
            self._upkeep(self.store.purge_task_logs, "Could not delete the logs of tries Airflow no longer has")
        self._report_changes()

    def _upkeep(self, work: Callable[[], object], failure: str) -> None:
        """One piece of the executor's upkeep; a database error is a warning, and it runs again at its next turn.

        Airflow's scheduler exits on any exception from an executor: a sweep PostgreSQL
        ended as a deadlock's victim, or a purge whose connection dropped, must not end it.
        A database that is gone still fails the job read ``sync`` ends with.
        """
        try:
            work()
        except SQLAlchemyError as exc:
            self.log.warning("%s (tried again at its next turn): %s", failure, exc)

    def _sweep(self) -> None:
        counts = self.store.sweep(judge_silence=self.watch.silence_counts())
        if any(counts.values()):
            self.log.warning("Tether sweep: %s", counts)
            for name, count in counts.items():
                if count:
                    metrics.incr(f"sweeps.{name}", count)

    def _send_gauges(self) -> None:
        counts = self.store.fleet_counts()
        busy = {queue for queue, _ in counts.jobs}
        for queue in busy | self._gauged_queues:
            for state in (JobState.QUEUED, JobState.LEASED, JobState.RUNNING):
                metrics.gauge(f"jobs.{state.value.lower()}", counts.jobs.get((queue, state.value), 0), queue=queue)
        self._gauged_queues = busy
        for status in AgentStatus:
            for role in AgentRole:
                agents = counts.agents.get((status.value, role.value), 0)
                metrics.gauge(f"agents.{status.value.lower()}", agents, role=role.value)

    def _report_changes(self) -> None:
        self._reported_at = self._clock()
        if not self._tracked:
            return
        seen: set[str] = set()
        for view in self.store.job_views(list(self._tracked)):
            tracked = self._tracked.get(view.key.ti_id)
            if tracked is None:
                continue
            key, try_number, last = tracked
            if view.key.try_number != try_number:
                continue
            seen.add(view.key.ti_id)
            if view.state is last:
                continue
            info = view.agent_name
            if view.state is JobState.RUNNING:
                # As Airflow's own executors do (an ExecuteTask's running_state is None): a callback
                # is marked running from its event, a task marks itself. For a task the event would
                # only set its external_executor_id, at the cost of a locked read of the task
                # instance and one more scheduler loop before it sleeps: in a chain, every step.
                if not isinstance(key, TaskInstanceKey):
                    self.running_state(key, info)
                self._tracked[view.key.ti_id] = (key, try_number, view.state)
            elif view.state is JobState.SUCCESS:
                self.success(key, info)
                del self._tracked[view.key.ti_id]
            elif view.state is JobState.FAILED:
                self.log.info("%s failed on %s: %s", key, view.agent_name, view.reason or view.exit_code)
                self.fail(key, info)
                del self._tracked[view.key.ti_id]
            elif view.state is JobState.REVOKED:
                self.running.discard(key)
                del self._tracked[view.key.ti_id]
            else:
                self._tracked[view.key.ti_id] = (key, try_number, view.state)
        # A job row that vanished (purged, or its scheduler's transaction rolled back)
        # must not hold a slot forever; a row not yet committed is given time to appear.
        now = self._clock()
        for ti_id in set(self._missing_since) - set(self._tracked):
            del self._missing_since[ti_id]
        for ti_id in set(self._tracked) - seen:
            first_missed = self._missing_since.setdefault(ti_id, now)
            if now - first_missed > _MISSING_GRACE.total_seconds():
                key, _, _ = self._tracked.pop(ti_id)
                del self._missing_since[ti_id]
                self.running.discard(key)
                self.log.warning("Tether job for %s disappeared; releasing its slot", key)
        for ti_id in seen:
            self._missing_since.pop(ti_id, None)

    def get_task_log(self, ti: TaskInstance, try_number: int) -> tuple[list[str], list[str]]:
        """What Airflow's log view shows of a running try from the executor: never a fetch from the agent's host.

        Where Tether reads remote task logs (``tether.plane.log_config``) the lines come
        from there and this only names the source; otherwise the shipped lines come
        from here, for running tries at least.
        """
        from tether.plane.task_logs import TetherRemoteLogIO, tether_reads_remote_logs

        reader = TetherRemoteLogIO(store=self.store)
        state = reader.state_of(ti)
        if state is None:
            return [], []
        source = f"Tether: live from agent {state.agent_name}"
        if tether_reads_remote_logs():
            return [source], []
        _, blobs = reader.read("", ti)
        return [f"{source}; finished tries need [logging] logging_config_class (README)"], list(blobs or [])

    def revoke_task(self, *, ti: TaskInstance) -> None:
        self.store.revoke(str(ti.id), ti.try_number)
        self._tracked.pop(str(ti.id), None)
        self.running.discard(ti.key)
        self.queued_tasks.pop(ti.key, None)

    def try_adopt_task_instances(self, tis: Sequence[TaskInstance]) -> Sequence[TaskInstance]:
        ids = [str(ti.id) for ti in tis]
        adoptable = self.store.adoptable(ids, {str(ti.id): ti.try_number for ti in tis})
        not_adopted = []
        for ti in tis:
            if str(ti.id) in adoptable:
                state = JobState.RUNNING if ti.state == TaskInstanceState.RUNNING else JobState.QUEUED
                self.running.add(ti.key)
                self._tracked[str(ti.id)] = (ti.key, ti.try_number, state)
            else:
                not_adopted.append(ti)
        if adoptable:
            self.log.info("Adopted %d task instances from Tether jobs", len(adoptable))
        return not_adopted

    def end(self) -> None:
        self._report_changes()

    def terminate(self) -> None:
        """Agents own the running tasks; a scheduler stopping must not kill them."""
