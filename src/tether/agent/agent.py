"""The agent daemon: register, heartbeat, lease, run, report.

``run()`` is start-up, main loop and shutdown; ``stop()`` only sets a flag and is
safe to call twice and before ``run()``. Side loops (heartbeat, lease, one task
per job) are named asyncio tasks. The lease loop waits on whichever comes first:
a free slot, a stop request, or the plane handing out work.
"""

from __future__ import annotations

import asyncio
import json
import logging
import platform
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import tether
from tether import protocol
from tether.agent.client import NO_REASON, PlaneClient, backoff_for
from tether.agent.health import AgentMetrics, HealthServer
from tether.agent.logs import LogFollower, LogShipper
from tether.agent.runner import Runner, TaskProcess
from tether.agent.settings import AgentSettings
from tether.errors import PlaneRefused, PlaneUnavailable, TetherError

log = logging.getLogger("tether.agent")

#: Time a terminated task gets between SIGTERM and SIGKILL.
KILL_GRACE = timedelta(seconds=10)
#: Time a task of a fenced agent (its token refused) gets between SIGTERM and SIGKILL: its work is no longer its own.
FENCE_GRACE = timedelta(seconds=3)
#: Refusals of a start that concern the agent, not the job: no other job of the call may start either.
_AGENT_REFUSALS = frozenset({"agent_not_found", "agent_deleted", "token_mismatch", "superseded"})
#: Refusals that name the plane's and the agent's versions (ADR 5): only an upgrade ends them, so the
#: agent keeps asking at its slowest pace instead of exiting into a crash loop. ``protocol_mismatch``
#: is what a Tether 0.1 plane answers an agent newer than itself.
VERSION_REFUSALS = frozenset({"protocol_mismatch", "protocol_missing", "agent_too_old", "agent_too_new"})
#: How often a refusal that does not change is logged again.
REFUSAL_REMINDER = timedelta(minutes=5)


class AgentStopped(TetherError):
    """The plane told this agent to stop for good (superseded, or its token refused at start-up)."""


class RefusalNotice:
    """Logs the plane's refusals of this agent: a line when the refusal changes, then a reminder now and then.

    An agent refused for a reason that lasts (a revoked token, an unsupported version)
    asks again on every heartbeat and lease; a line per call would bury everything else.
    """

    def __init__(self, *, remind_every: timedelta = REFUSAL_REMINDER, clock: Callable[[], float] = time.monotonic):
        self._remind_every = remind_every.total_seconds()
        self._clock = clock
        self._current: tuple[int, str] | None = None
        self._logged_at = 0.0

    def refused(self, call: str, exc: PlaneRefused, retry_in: float) -> None:
        key = (exc.status, exc.reason)
        now = self._clock()
        if key == self._current and now - self._logged_at < self._remind_every:
            return
        again = " (still)" if key == self._current else ""
        self._current, self._logged_at = key, now
        log.error("The plane refuses this agent's %s%s: %s; asking again in %.0fs", call, again, exc, retry_in)

    def accepted(self) -> None:
        if self._current is not None:
            log.info("The plane accepts this agent's calls again")
            self._current = None


def describe(workload: dict[str, Any]) -> str:
    """A workload, for the agent's log: the task try, the callback or the connection test."""
    kind = workload.get("type", "ExecuteTask")
    if kind == "ExecuteCallback":
        callback = workload.get("callback") or {}
        return f"callback {callback.get('id')} {(callback.get('data') or {}).get('path', '')}".rstrip()
    if kind == "TestConnection":
        return f"connection test of {workload.get('connection_id')}"
    ti = workload.get("ti") or {}
    return f"{ti.get('dag_id')}.{ti.get('task_id')} run={ti.get('run_id')} try={ti.get('try_number')}"


@dataclass
class HeldJob:
    lease: protocol.Lease
    process: TaskProcess | None = None
    task: asyncio.Task[None] | None = None
    kill_reason: str | None = None
    #: The plane refused this agent's token while the job ran: it was stopped here, and is not reported.
    fenced: bool = False

    @property
    def job_id(self) -> uuid.UUID:
        return self.lease.job_id


@dataclass
class _Registration:
    agent_id: uuid.UUID
    heartbeat_interval: float
    lease_wait: float
    #: Seconds a lease poll stands in for the heartbeat of an agent holding no job (ADR 8); None: never.
    poll_heartbeat_window: float | None = None


@dataclass
class AgentState:
    registration: _Registration | None = None
    cordoned: bool = False
    last_contact: float = 0.0
    jobs: dict[uuid.UUID, HeldJob] = field(default_factory=dict)
    #: When the lease poll that counts as this agent's heartbeat was sent (monotonic): the latest one
    #: sent while polls were being answered. None while none counts.
    heartbeat_poll_sent: float | None = None
    #: The last heartbeat the plane took was an idle agent's (no job, not draining): what a poll
    #: that stands in for it would have said.
    idle_beat_taken: bool = False


class Agent:
    def __init__(
        self,
        *,
        settings: AgentSettings,
        client: PlaneClient,
        runner: Runner | None,
        metrics: AgentMetrics | None = None,
        kill_grace: timedelta = KILL_GRACE,
        roles: Sequence[protocol.AgentRole] = (protocol.AgentRole.WORKER,),
        task_log_folder: Path | None = None,
    ) -> None:
        """An agent in ``roles``; a worker leases and runs jobs with ``runner``, other roles need none.

        ``task_log_folder``: where the Task SDK writes task logs; a worker ships them from there
        (``--task-logs ship``) or says where they stay (``local``).
        """
        self.settings = settings
        self.kill_grace = kill_grace
        self.client = client
        self.runner = runner
        self.roles = tuple(roles)
        self.worker = protocol.AgentRole.WORKER in self.roles
        if self.worker and runner is None:
            raise ValueError("a worker needs a runner")
        self.metrics = metrics or AgentMetrics()
        self.incarnation = uuid.uuid4()
        self.state = AgentState()
        #: Set once the plane has registered this agent; other threads may wait on it.
        self.registered = threading.Event()
        #: Where the Task SDK writes task logs here ([logging] base_log_folder); None: not known.
        self.task_log_folder = task_log_folder
        self.logs = (
            LogShipper(
                client=client,
                agent_id=self._agent_id,
                incarnation=self.incarnation,
                folder=task_log_folder,
                metrics=self.metrics,
                settings=settings,
            )
            if task_log_folder is not None and settings.task_logs is protocol.TaskLogs.SHIP and self.worker
            else None
        )
        self._stop_requested: asyncio.Event | None = None
        self._force = False
        self._draining = False
        self._slot_freed: asyncio.Event | None = None
        self._health: HealthServer | None = None
        self._pending_stop = False
        self._start_one_by_one = False
        self._refusals = RefusalNotice()
        self._background: set[asyncio.Task[None]] = set()

    def _agent_id(self) -> uuid.UUID:
        registration = self.state.registration
        assert registration is not None
        return registration.agent_id

    # -- lifecycle --------------------------------------------------------------

    def stop(self, *, force: bool = False) -> None:
        """Ask the agent to drain and exit; ``force`` ends running tasks now."""
        self._force = self._force or force
        self._pending_stop = True
        if self._stop_requested is not None:
            self._stop_requested.set()

    async def run(self) -> int:
        self._stop_requested = asyncio.Event()
        self._slot_freed = asyncio.Event()
        if self._pending_stop:
            self._stop_requested.set()
        self.metrics.slots.set(self.settings.slots)
        if self.settings.health_port:
            self._health = HealthServer(
                host=self.settings.health_host,
                port=self.settings.health_port,
                ready=self.ready,
                metrics=self.metrics,
            )
            await self._health.start()
        try:
            if not await self._register_until_done():
                return 0
            if self.runner is not None:
                self.runner.start()
            heartbeat = asyncio.create_task(self._heartbeat_loop(), name="heartbeat")
            leasing = asyncio.create_task(
                self._lease_loop() if self.worker else self._stop_requested.wait(), name="lease"
            )
            stop_wait = asyncio.create_task(self._stop_requested.wait(), name="stop-wait")
            done, _ = await asyncio.wait({heartbeat, leasing, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            exit_code = 0
            for task in done:
                if task is not stop_wait and task.exception() is not None:
                    exc = task.exception()
                    log.error("%s", exc)
                    exit_code = 3 if isinstance(exc, AgentStopped) else 1
            leasing.cancel()
            await asyncio.gather(leasing, return_exceptions=True)
            await self._drain()
            heartbeat.cancel()
            stop_wait.cancel()
            await asyncio.gather(heartbeat, stop_wait, return_exceptions=True)
            await self._final_heartbeat()
            return exit_code
        except AgentStopped as exc:
            log.error("%s", exc)
            return 3
        finally:
            if self.runner is not None:
                self.runner.close()
            if self._health is not None:
                await self._health.stop()
            await self.client.aclose()

    def ready(self) -> tuple[bool, str]:
        reg = self.state.registration
        if reg is None:
            return False, "not registered with the plane"
        if self._draining:
            return False, "draining"
        silent = time.monotonic() - self.state.last_contact
        if silent > 3 * reg.heartbeat_interval:
            return False, f"no answer from the plane for {silent:.0f}s"
        return True, "ready"

    @property
    def free_slots(self) -> int:
        return self.settings.slots - sum(job.lease.pool_slots for job in self.state.jobs.values())

    def _stopping(self) -> bool:
        return self._stop_requested is not None and self._stop_requested.is_set()

    async def _sleep_or_stop(self, seconds: float) -> None:
        assert self._stop_requested is not None
        try:
            await asyncio.wait_for(self._stop_requested.wait(), seconds)
        except TimeoutError:
            pass

    # -- registration -----------------------------------------------------------

    async def _register_until_done(self) -> bool:
        backoff = backoff_for(self.settings)
        while not self._stopping():
            try:
                await self._register()
                return True
            except PlaneUnavailable as exc:
                self.metrics.plane_errors.labels("unavailable").inc()
                delay = backoff.next_delay()
                log.warning("Cannot register yet (%s); retrying in %.1fs", exc, delay)
            except PlaneRefused as exc:
                if exc.status == 422 and exc.reason not in VERSION_REFUSALS:
                    # The request itself is wrong: retrying cannot help.
                    raise AgentStopped(f"the plane refused this agent: {exc.detail}") from exc
                # A refused token or address is fixed on the plane, a version refused by an
                # upgrade of the plane or of the agent: either without restarting this process.
                self.metrics.plane_errors.labels("refused").inc()
                delay = backoff.next_delay()
                self._refusals.refused("registration", exc, delay)
            await self._sleep_or_stop(delay)
        return False

    async def _register(self) -> None:
        answer = await self.client.agents.register(
            protocol.RegisterRequest(
                name=self.settings.name,
                incarnation=self.incarnation,
                tether_version=tether.__version__,
                airflow_version=_airflow_version(),
                python_version=platform.python_version(),
                hostname=socket.gethostname()[:256],
                roles=list(self.roles),
                # Workers lease from their queues; triggerers run their queues' triggers ([triggerer] queues_enabled).
                queues=list(self.settings.queues) if self.worker or protocol.AgentRole.TRIGGERER in self.roles else [],
                slots=self.settings.slots,
                labels=dict(self.settings.labels),
                task_logs=self.settings.task_logs if self.worker else None,
                task_log_folder=str(self.task_log_folder) if self.task_log_folder is not None else None,
            )
        )
        self.state.registration = _Registration(
            agent_id=answer.agent_id,
            heartbeat_interval=answer.heartbeat_interval,
            lease_wait=answer.lease_wait,
            poll_heartbeat_window=answer.poll_heartbeat_window,
        )
        self.state.heartbeat_poll_sent = None
        self.state.idle_beat_taken = False
        self.state.cordoned = answer.cordoned
        self.state.last_contact = time.monotonic()
        self.metrics.connected.set(1)
        self._refusals.accepted()
        self.registered.set()
        serves = "no queues"
        if self.worker:
            serves = f"queues {','.join(self.settings.queues)}, {self.settings.slots} slots"
        elif protocol.AgentRole.TRIGGERER in self.roles:
            serves = f"queues {','.join(self.settings.queues)}, {self.settings.trigger_capacity} triggers"
        log.info(
            "Registered as %s (agent id %s, %s, %s%s)",
            self.settings.name,
            answer.agent_id,
            "+".join(self.roles),
            serves,
            ", cordoned" if answer.cordoned else "",
        )

    async def _on_refused(self, call: str, exc: PlaneRefused, retry_in: float) -> None:
        """Act on a 4xx the plane gave to a heartbeat or lease."""
        if exc.reason == "superseded":
            raise AgentStopped(f"another process took over this agent's name: {exc.detail}")
        if exc.status == 401:
            self._fence(exc)
        if exc.status == 404:
            log.warning("The plane no longer knows this agent (%s); registering again", exc.detail)
            await self._register()
            return
        self._refusals.refused(call, exc, retry_in)

    def _fence(self, exc: PlaneRefused) -> None:
        """The plane refuses this agent's token: its running tasks stop now, and are not reported.

        The plane failed their jobs when the token was revoked or expired, and Airflow may
        already run them elsewhere: what they do from here on is no longer theirs to do.
        """
        running = [held for held in self.state.jobs.values() if held.process is not None and not held.fenced]
        if not running:
            return
        log.error(
            "Fenced: the plane refused this agent's token (%s); stopping its %d running task(s) now (SIGTERM, SIGKILL "
            "after %.0fs); they are not reported",
            exc.reason,
            len(running),
            FENCE_GRACE.total_seconds(),
        )
        for held in running:
            held.fenced = True
            held.kill_reason = f"stopped: the plane refused the agent's token ({exc.reason})"
            assert held.process is not None
            held.process.terminate()
            asyncio.get_running_loop().call_later(FENCE_GRACE.total_seconds(), held.process.kill)
        self.metrics.fenced_jobs.inc(len(running))

    # -- heartbeat --------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        backoff = backoff_for(self.settings)
        while True:
            reg = self.state.registration
            assert reg is not None
            interval = reg.heartbeat_interval
            covered = self._poll_covers_heartbeat()
            if covered > 0:
                # The lease poll in flight is this idle agent's heartbeat (ADR 8); look again
                # within an interval, in case a job arrives or polls stop.
                await asyncio.sleep(min(covered, interval))
                continue
            try:
                await self._heartbeat()
                backoff.reset()
            except PlaneUnavailable as exc:
                self.metrics.plane_errors.labels("unavailable").inc()
                self.metrics.connected.set(0)
                log.warning("Heartbeat failed: %s", exc)
                interval = min(interval, backoff.next_delay())
            except PlaneRefused as exc:
                self.metrics.plane_errors.labels("refused").inc()
                interval = min(interval, backoff.next_delay())
                try:
                    await self._on_refused("heartbeat", exc, interval)
                except (PlaneUnavailable, PlaneRefused) as again:
                    log.warning("Registering again failed: %s", again)
            await asyncio.sleep(interval)

    def _poll_covers_heartbeat(self) -> float:
        """Seconds for which the latest lease poll still counts as this agent's heartbeat; 0: it does not.

        Only while the agent holds no job, is neither draining nor cordoned, its polls are
        being answered, and the plane has taken a heartbeat saying so: anything else a
        heartbeat says (the jobs it runs, draining) or answers (kill commands, a cordon
        lifted) needs the heartbeat itself.
        """
        reg = self.state.registration
        sent = self.state.heartbeat_poll_sent
        if reg is None or reg.poll_heartbeat_window is None or sent is None:
            return 0.0
        if self.state.jobs or self._draining or self.state.cordoned or not self.state.idle_beat_taken:
            return 0.0
        return max(sent + reg.poll_heartbeat_window - time.monotonic(), 0.0)

    async def _heartbeat(self) -> None:
        reg = self.state.registration
        assert reg is not None
        started = time.monotonic()
        idle = not self.state.jobs and not self._draining
        answer = await self.client.agents.heartbeat(
            reg.agent_id,
            protocol.HeartbeatRequest(
                incarnation=self.incarnation,
                running_jobs=[j.job_id for j in self.state.jobs.values() if j.process is not None],
                free_slots=max(self.free_slots, 0),
                draining=self._draining,
                metrics={"running": float(len(self.state.jobs))},
            ),
        )
        self.state.idle_beat_taken = idle
        self.metrics.heartbeat_seconds.observe(time.monotonic() - started)
        self.state.last_contact = time.monotonic()
        self.metrics.connected.set(1)
        self._refusals.accepted()
        if answer.cordoned != self.state.cordoned:
            log.info("Agent %s by the plane", "cordoned" if answer.cordoned else "uncordoned")
            self.state.cordoned = answer.cordoned
            if not answer.cordoned:
                self._wake_lease_loop()
        reg.heartbeat_interval = answer.heartbeat_interval
        for command in answer.commands:
            held = self.state.jobs.get(command.job_id)
            if held is not None and held.process is not None:
                log.warning("Killing job %s at the plane's request: %s", command.job_id, command.reason)
                held.kill_reason = command.reason
                held.process.kill()

    async def _final_heartbeat(self) -> None:
        if self.state.registration is None:
            return
        try:
            await asyncio.wait_for(self._heartbeat(), 5)
        except (TetherError, TimeoutError) as exc:
            log.info("Could not send the last heartbeat: %s", exc)

    # -- leasing ----------------------------------------------------------------

    def _wake_lease_loop(self) -> None:
        if self._slot_freed is not None:
            self._slot_freed.set()

    async def _wait_for_capacity(self, timeout: float) -> None:
        assert self._slot_freed is not None
        self._slot_freed.clear()
        try:
            await asyncio.wait_for(self._slot_freed.wait(), timeout)
        except TimeoutError:
            pass

    async def _lease_loop(self) -> None:
        backoff = backoff_for(self.settings)
        while not self._stopping():
            reg = self.state.registration
            assert reg is not None
            free = self.free_slots
            if free < 1 or self.state.cordoned:
                await self._wait_for_capacity(reg.heartbeat_interval)
                continue
            asked_at = time.monotonic()
            window = reg.poll_heartbeat_window
            # A poll that is the heartbeat is answered before its stand-in lapses.
            wait = reg.lease_wait if window is None else min(reg.lease_wait, window)
            if window is not None and self.state.heartbeat_poll_sent is not None:
                # Polls are being answered: this one, sent now, is the heartbeat from now on.
                self.state.heartbeat_poll_sent = asked_at
            try:
                answer = await self.client.agents.lease(
                    reg.agent_id,
                    protocol.LeaseRequest(
                        incarnation=self.incarnation,
                        free_slots=free,
                        queues=list(self.settings.queues),
                        wait=wait,
                        heartbeat=window is not None,
                    ),
                )
                backoff.reset()
                self.state.last_contact = time.monotonic()
                if window is not None and reg is self.state.registration:
                    self.state.heartbeat_poll_sent = asked_at
            except PlaneUnavailable as exc:
                self.state.heartbeat_poll_sent = None
                self.metrics.plane_errors.labels("unavailable").inc()
                delay = backoff.next_delay()
                log.warning("Lease failed (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                continue
            except PlaneRefused as exc:
                self.state.heartbeat_poll_sent = None
                self.metrics.plane_errors.labels("refused").inc()
                delay = backoff.next_delay()
                try:
                    await self._on_refused("lease", exc, delay)
                except (PlaneUnavailable, PlaneRefused) as again:
                    log.warning("Registering again failed: %s", again)
                await asyncio.sleep(delay)
                continue
            if answer.cordoned:
                # Learnt from a poll that is the heartbeat: heartbeats take over until uncordoned.
                log.info("Agent cordoned by the plane")
                self.state.cordoned = True
                continue
            if not answer.leases and time.monotonic() - asked_at < wait / 2:
                # The plane answered "nothing" without holding the poll open (cordoned, or
                # configured without long-polls): pace the next ask instead of spinning.
                await self._sleep_or_stop(max(wait, 0.05))
            if answer.leases:
                held_jobs = [HeldJob(lease=lease) for lease in answer.leases]
                # One start gate for the whole answer: the jobs came together, they start together.
                gate = asyncio.create_task(self._pass_start_gate(reg.agent_id, held_jobs), name="start-gate")
                for held in held_jobs:
                    self.state.jobs[held.job_id] = held
                    held.task = asyncio.create_task(self._run_job(held, gate), name=f"job-{held.job_id}")
            self._update_slot_metrics()

    def _update_slot_metrics(self) -> None:
        self.metrics.free_slots.set(max(self.free_slots, 0))
        self.metrics.running.set(sum(1 for j in self.state.jobs.values() if j.process is not None))

    # -- one job ----------------------------------------------------------------

    async def _run_job(self, held: HeldJob, gate: asyncio.Task[set[uuid.UUID]]) -> None:
        reg = self.state.registration
        assert reg is not None
        job_id = held.job_id
        follower: LogFollower | None = None
        try:
            # Shielded: the gate is shared, and ending one job's wait must not end the others'.
            if job_id not in await asyncio.shield(gate):
                return
            assert self.runner is not None
            # Before the start: the task's first lines are written as soon as it starts.
            follower = self._follow_log(held)
            try:
                held.process = await self.runner.spawn(held.lease.workload)
            except Exception as exc:
                log.exception("Job %s could not be started", job_id)
                await self._report(reg.agent_id, job_id, protocol.ReportState.FAILED, None, f"start failed: {exc}")
                return
            self._update_slot_metrics()
            log.info("Job %s started: %s (pid %d)", job_id, describe(held.lease.workload), held.process.pid)
            exit_code = await held.process.wait()
            if follower is not None:
                follower.finish()
            if held.fenced:
                self.metrics.jobs.labels("fenced").inc()
                log.warning("Job %s stopped (exit code %d): %s", job_id, exit_code, held.kill_reason)
                return
            outcome = protocol.ReportState.SUCCESS if exit_code == 0 else protocol.ReportState.FAILED
            self.metrics.jobs.labels(outcome.value).inc()
            log.info("Job %s finished with exit code %d", job_id, exit_code)
            lost = getattr(held.process, "status_lost", False)
            reason = held.kill_reason or (None if exit_code == 0 else _failure(exit_code, lost=lost))
            await self._report(reg.agent_id, job_id, outcome, exit_code, reason)
        finally:
            self.state.jobs.pop(job_id, None)
            self._update_slot_metrics()
            self._wake_lease_loop()
            if follower is not None:
                # The slot is free already; the job's last log lines still go out.
                follower.finish()
                await follower.wait()

    def _follow_log(self, held: HeldJob) -> LogFollower | None:
        """Follow the job's log file (lines shipped), or tell the plane where it stays (``--task-logs local``)."""
        if held.lease.workload.get("type", "ExecuteTask") != "ExecuteTask":
            return None  # a callback's or connection test's log: no try of a task to show it in
        log_path = held.lease.workload.get("log_path")
        if self.logs is not None:
            return self.logs.follow(held.job_id, log_path)
        if self.settings.task_logs is protocol.TaskLogs.LOCAL and log_path and self.task_log_folder is not None:
            where = self.task_log_folder / log_path
            notice = (
                f"This try's log stays on agent {self.settings.name}, which keeps its task logs (--task-logs local): "
                f"host {socket.gethostname()}, file {where}"
            )
            task = asyncio.create_task(self._send_notice(held.job_id, notice), name=f"log-notice-{held.job_id}")
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return None

    async def _send_notice(self, job_id: uuid.UUID, event: str) -> None:
        reg = self.state.registration
        assert reg is not None
        line = json.dumps(
            {"timestamp": datetime.now(UTC).isoformat(), "level": "info", "logger": "tether", "event": event}
        )
        batch = protocol.LogBatch(incarnation=self.incarnation, segment=uuid.uuid4(), seq=0, lines=[line], final=True)
        try:
            await self.client.jobs.log(reg.agent_id, job_id, batch)
        except TetherError as exc:
            log.info("Could not tell the plane where the log of job %s is: %s", job_id, exc)

    async def _pass_start_gate(self, agent_id: uuid.UUID, held_jobs: list[HeldJob]) -> set[uuid.UUID]:
        """The jobs the plane confirms may start; the others must not run here."""
        backoff = backoff_for(self.settings)
        job_ids = [held.job_id for held in held_jobs]
        named = ", ".join(str(job_id) for job_id in job_ids)
        deadline = min(held.lease.lease_expires_at.timestamp() for held in held_jobs)
        if self._stopping():
            log.info("Not started: the agent is stopping; the leases will expire (jobs %s)", named)
            return set()
        while True:
            try:
                answer = await self._start(agent_id, job_ids)
                break
            except PlaneRefused as exc:
                log.warning("Not started: the plane refused the start (%s) (jobs %s)", exc, named)
                return set()
            except PlaneUnavailable as exc:
                if time.time() >= deadline or self._stopping():
                    log.warning("Not started: the leases ran out while the plane was unreachable (jobs %s)", named)
                    return set()
                await asyncio.sleep(min(backoff.next_delay(), max(deadline - time.time(), 0.1)))
                log.info("Retrying the start of jobs %s after: %s", named, exc)
        for refusal in answer.refused:
            log.warning(
                "Job %s not started: the plane refused its start (%d %s: %s)",
                refusal.job_id,
                refusal.status,
                refusal.reason,
                refusal.detail,
            )
        return set(answer.started)

    async def _start(self, agent_id: uuid.UUID, job_ids: list[uuid.UUID]) -> protocol.StartManyResponse:
        """One call for every job; one call each to a plane older than the batched start."""
        if not self._start_one_by_one:
            try:
                return await self.client.jobs.start_many(
                    agent_id, protocol.StartManyRequest(incarnation=self.incarnation, job_ids=job_ids)
                )
            except PlaneRefused as exc:
                if exc.status != 404 or exc.reason != NO_REASON:
                    raise
                log.info("The plane does not start jobs in batches; starting them one by one")
                self._start_one_by_one = True
        started, refused = [], []
        for job_id in job_ids:
            try:
                await self.client.jobs.start(agent_id, job_id, protocol.StartRequest(incarnation=self.incarnation))
                started.append(job_id)
            except PlaneRefused as exc:
                if exc.reason in _AGENT_REFUSALS:
                    raise
                refused.append(
                    protocol.StartRefusal(job_id=job_id, status=exc.status, reason=exc.reason, detail=exc.detail)
                )
        return protocol.StartManyResponse(started=started, refused=refused)

    async def _report(
        self,
        agent_id: uuid.UUID,
        job_id: uuid.UUID,
        state: protocol.ReportState,
        exit_code: int | None,
        reason: str | None,
    ) -> None:
        """Deliver an outcome; keep trying while the plane is unreachable."""
        backoff = backoff_for(self.settings)
        body = protocol.ReportRequest(incarnation=self.incarnation, state=state, exit_code=exit_code, reason=reason)
        while True:
            try:
                await self.client.jobs.report(agent_id, job_id, body)
                return
            except PlaneRefused as exc:
                log.warning("The plane refused the outcome of job %s: %s", job_id, exc)
                return
            except PlaneUnavailable as exc:
                delay = backoff.next_delay()
                log.warning("Could not report job %s (%s); retrying in %.1fs", job_id, exc, delay)
                await asyncio.sleep(delay)

    # -- shutdown ---------------------------------------------------------------

    async def _drain(self) -> None:
        self._draining = True
        tasks = [job.task for job in self.state.jobs.values() if job.task is not None]
        if not tasks:
            log.info("Stopped; no tasks were running")
            return
        timeout = 0.0 if self._force else self.settings.drain_timeout.total_seconds()
        log.info("Draining: waiting up to %.0fs for %d task(s) to finish", timeout, len(tasks))
        _, pending = await asyncio.wait(tasks, timeout=timeout) if timeout > 0 else (set(), set(tasks))
        if not pending:
            log.info("Drained: every task finished")
            return
        log.warning("Drain timeout: terminating %d task(s)", len(pending))
        for job in list(self.state.jobs.values()):
            job.kill_reason = "terminated: the agent stopped before the task finished"
            if job.process is not None:
                job.process.terminate()
        grace = self.kill_grace.total_seconds()
        _, pending = await asyncio.wait(pending, timeout=grace)
        for job in list(self.state.jobs.values()):
            if job.process is not None:
                job.process.kill()
        if pending:
            # Reports of killed tasks still go out, but not forever.
            await asyncio.wait(pending, timeout=grace)
            for task in pending:
                task.cancel()


def _airflow_version() -> str:
    try:
        from importlib.metadata import version

        return version("apache-airflow-task-sdk")
    except Exception:
        return "unknown"


def _failure(exit_code: int, *, lost: bool) -> str:
    if lost:
        return f"exit code {exit_code}: its exit status was lost with the task launcher"
    return f"exit code {exit_code}"
