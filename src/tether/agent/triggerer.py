"""The triggerer role: Airflow's own trigger runner where the triggers' code and connections are.

``tether-agent triggerer`` runs Airflow's ``TriggerRunnerSupervisor`` and its
trigger runner process - the asyncio loop that runs every trigger - with each
of the supervisor's override points that would use the metadata database
calling the agent API instead:

- every loop, *load* keeps this process's Airflow triggerer job alive on the
  plane and says which triggers it holds (the plane assigns them as Airflow
  assigns them to its own triggerers); new ones are fetched as workloads,
  kwargs in the clear, and triggers it no longer holds are cancelled;
- what a trigger fires, or how it fails, is sent in batches and forgotten only
  once the plane has taken it: a plane that is away loses none of it, and an
  outcome sent again is written once;
- the Execution API calls of trigger code (Connections, Variables, XCom) go to
  the plane's Execution API with a token *load* hands out, after this agent's
  own secrets backends and environment, which are asked first;
- each trigger's log is written here as Airflow writes it and, with
  ``task_logs = ship``, followed and sent into the log of the try that
  deferred, for Airflow's log views.

Threads: the supervisor owns the main thread (it forks the runner and handles
its messages); the agent's registration, heartbeats and health endpoints, and
the log followers, run on the ``PlaneBridge``'s loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
import uuid
from collections import deque
from itertools import islice
from pathlib import Path
from typing import Any

import attrs
from airflow.jobs.triggerer_job_runner import TriggerLoggingFactory, TriggerRunnerSupervisor

from tether import protocol
from tether.agent import sdk_internals
from tether.agent.bridge import PlaneBridge, connect
from tether.agent.client import Triggerer
from tether.agent.health import AgentMetrics
from tether.agent.logs import LogFollower
from tether.agent.settings import AgentSettings
from tether.errors import PlaneRefused, PlaneUnavailable

log = logging.getLogger("tether.agent.triggerer")

#: Longest wait for one call to the plane from the supervisor's loop: the runner waits while it waits.
CALL_TIMEOUT = 30.0
#: Most outcomes, or workloads, in one call.
BATCH = 1000
#: A new Execution API token is asked for once this share of the last one's time has passed.
RENEW_AT = 0.5
#: What Airflow's trigger runner warns of when a trigger blocked its event loop.
BLOCKED_WARNING = "async thread was blocked"
#: How long the runner gets to stop its triggers at shutdown before it is killed.
STOP_GRACE = 10.0


def fired(outcome_id: uuid.UUID, trigger_id: int, event: Any) -> protocol.TriggerFired:
    """A trigger's event as the plane takes it: its kind, its payload encoded by Airflow's serde."""
    from airflow.sdk.serde import serialize

    state = getattr(event, "task_instance_state", None)
    if state is not None:
        return protocol.TriggerFired(
            outcome_id=outcome_id,
            trigger_id=trigger_id,
            kind=protocol.TriggerEventKind(str(getattr(state, "value", state))),
            xcoms=getattr(event, "xcoms", None),
        )
    return protocol.TriggerFired(
        outcome_id=outcome_id, trigger_id=trigger_id, payload=serialize(getattr(event, "payload", None))
    )


@attrs.define(kw_only=True)
class TetherTriggerRunnerSupervisor(TriggerRunnerSupervisor):  # type: ignore[misc]
    """Airflow's trigger runner supervisor, its triggers and outcomes going through the agent API."""

    plane: PlaneBridge
    metrics: AgentMetrics
    hostname: str
    execution_api_url: str
    #: Where trigger logs are written (Airflow's ``[logging] base_log_folder``); followed when ``ship_logs``.
    log_folder: Path
    ship_logs: bool = True
    job_id: int | None = attrs.field(default=None, init=False)
    _token: str = attrs.field(default="", init=False)
    _renew_token_at: float = attrs.field(default=0.0, init=False)
    _away_since: float | None = attrs.field(default=None, init=False)
    _outcome_ids: dict[int, uuid.UUID] = attrs.field(factory=dict, init=False)
    _followers: dict[int, LogFollower] = attrs.field(factory=dict, init=False)
    _watchdog_said: bool = attrs.field(default=False, init=False)

    @property
    def _api(self) -> Triggerer:
        return self.plane.client.triggerer

    def _call(self, call: Any, *args: Any) -> Any:
        answer = self.plane.call(call, self.plane.agent_id, *args, timeout=CALL_TIMEOUT)
        if self._away_since is not None:
            log.info("The plane answers again after %.0fs", time.monotonic() - self._away_since)
            self._away_since = None
        return answer

    def _away(self, what: str, exc: Exception) -> None:
        if self._away_since is None:
            self._away_since = time.monotonic()
            log.warning("Cannot %s: %s; triggers run on and their outcomes wait here", what, exc)

    # -- the Execution API ----------------------------------------------------------------

    def make_client(self) -> Any:
        from airflow.sdk.api.client import Client

        return Client(base_url=self.execution_api_url, token=self._token)

    def _use_token(self, token: str, valid_for: int | None) -> None:
        from airflow.sdk.api.client import BearerAuth

        self._token = token
        self._renew_token_at = time.monotonic() + (valid_for or 600) * RENEW_AT
        self.client.auth = BearerAuth(token)

    # -- triggers ------------------------------------------------------------------------

    def load_triggers(self) -> None:
        body = protocol.TriggererLoad(
            incarnation=self.plane.incarnation,
            capacity=self.capacity,
            want_token=time.monotonic() >= self._renew_token_at,
            healthy=self._runner_answers(),
        )
        try:
            answer: protocol.TriggererLoadResponse = self._call(self._api.load, body)
        except PlaneUnavailable as exc:
            self._away("load triggers", exc)
            return
        except PlaneRefused as exc:
            log.warning("The plane refused to load triggers: %s", exc)
            return
        if answer.execution_token:
            self._use_token(answer.execution_token, answer.token_valid_for)
        if answer.job_id != self.job_id:
            log.info("Running triggers as Airflow triggerer job %s", answer.job_id)
            self.job_id = answer.job_id
        self.update_triggers(set(answer.trigger_ids))
        self._finish_followers()

    def build_trigger_workloads(self, new_trigger_ids: set[int]) -> list[Any]:
        from airflow.executors.workloads.trigger import RunTrigger

        built: list[Any] = []
        ids = sorted(new_trigger_ids)
        for start in range(0, len(ids), BATCH):
            body = protocol.TriggerWorkloadsRequest(incarnation=self.plane.incarnation, trigger_ids=ids[start:][:BATCH])
            try:
                answer: protocol.TriggerWorkloadsResponse = self._call(self._api.workloads, body)
            except (PlaneUnavailable, PlaneRefused) as exc:
                log.warning("Could not fetch the workloads of triggers %s: %s; next loop", body.trigger_ids, exc)
                break
            for data in answer.workloads:
                log_path = data.pop("log_path", None)
                try:
                    workload = RunTrigger.model_validate(data)
                except ValueError as exc:
                    log.error("The plane sent a trigger workload that is not one (%s): %s", data.get("id"), exc)
                    continue
                if log_path and workload.ti is not None:
                    self.logger_cache[workload.id] = TriggerLoggingFactory(log_path=log_path, ti=workload.ti)  # type: ignore[arg-type]
                    self._follow(workload.id, log_path)
                built.append(workload)
        return built

    def clean_unused(self) -> None:
        """The plane cleans unused triggers (in the scheduler's executor), as Airflow's triggerer would."""

    # -- outcomes ------------------------------------------------------------------------

    def handle_events(self) -> None:
        if not self.events:
            return
        sent: list[protocol.TriggerFired] = []
        entries: dict[uuid.UUID, Any] = {}
        for entry in islice(self.events, BATCH):
            outcome_id = self._outcome_ids.setdefault(id(entry), uuid.uuid4())
            try:
                sent.append(fired(outcome_id, entry.trigger_id, entry.event))
            except Exception as exc:
                # Airflow fails the task of a payload it cannot encode; so does this, through the trigger's failure.
                log.error("The event of trigger %s cannot be encoded: %s", entry.trigger_id, exc)
                self._forget(self.events, {id(entry)})
                self.failed_triggers.append(
                    (entry.trigger_id, [f"Trigger event payload could not be serialized: {type(exc).__name__}: {exc}"])
                )
                continue
            entries[outcome_id] = entry
        if not sent:
            return
        try:
            answer = self._send_outcomes(protocol.TriggerOutcomes(incarnation=self.plane.incarnation, events=sent))
        except _Rejected as exc:
            # The plane will not take these events as sent: their tasks fail instead of waiting forever.
            self._forget(self.events, {id(entry) for entry in entries.values()})
            self.failed_triggers.extend(
                (entry.trigger_id, [f"The plane refused the trigger's event: {exc}"]) for entry in entries.values()
            )
            return
        if answer is None:
            return
        for outcome_id in answer.taken:
            taken = entries.get(outcome_id)
            if taken is not None and taken.persist_seq is not None:
                self.persisted_event_seqs.append(taken.persist_seq)
        self._settle(self.events, answer, entries, "fired")

    def handle_failed_triggers(self) -> None:
        if not self.failed_triggers:
            return
        sent: list[protocol.TriggerFailed] = []
        entries: dict[uuid.UUID, Any] = {}
        for entry in islice(self.failed_triggers, BATCH):
            outcome_id = self._outcome_ids.setdefault(id(entry), uuid.uuid4())
            trigger_id, error = entry
            sent.append(protocol.TriggerFailed(outcome_id=outcome_id, trigger_id=trigger_id, error=_clamp(error)))
            entries[outcome_id] = entry
        try:
            answer = self._send_outcomes(protocol.TriggerOutcomes(incarnation=self.plane.incarnation, failures=sent))
        except _Rejected:
            self._forget(self.failed_triggers, {id(entry) for entry in entries.values()})
            return
        if answer is not None:
            self._settle(self.failed_triggers, answer, entries, "failed")

    def _send_outcomes(self, body: protocol.TriggerOutcomes) -> protocol.TriggerOutcomesResponse | None:
        """The plane's answer; None while it is away, or refuses for now; ``_Rejected`` when it never takes these."""
        try:
            answer: protocol.TriggerOutcomesResponse = self._call(self._api.outcomes, body)
        except PlaneUnavailable as exc:
            self._away("send what triggers fired", exc)
            return None
        except PlaneRefused as exc:
            if exc.status in (400, 422):
                log.error("The plane refused trigger outcomes: %s; they are dropped", exc)
                raise _Rejected(str(exc)) from None
            log.warning("The plane refused trigger outcomes: %s; they go again", exc)
            return None
        return answer

    def _settle(
        self, queue: deque[Any], answer: protocol.TriggerOutcomesResponse, entries: dict[uuid.UUID, Any], kind: str
    ) -> None:
        """Forget the outcomes the plane took, or refused as no longer this agent's; count them."""
        done = (set(answer.taken) | set(answer.refused)) & set(entries)
        self._forget(queue, {id(entries[outcome_id]) for outcome_id in done})
        self.metrics.trigger_outcomes.labels(kind).inc(len(set(answer.taken) & set(entries)))
        self._count_refused(answer, entries)

    def _count_refused(self, answer: protocol.TriggerOutcomesResponse, entries: dict[uuid.UUID, Any]) -> None:
        refused = [o for o in answer.refused if o in entries]
        if refused:
            log.info(
                "%d trigger outcome(s) dropped: their triggers are no longer this agent's (another runs them)",
                len(refused),
            )
            self.metrics.trigger_outcomes.labels("refused").inc(len(refused))

    def _forget(self, queue: deque[Any], ids: set[int]) -> None:
        if not ids:
            return
        kept = [entry for entry in queue if id(entry) not in ids]
        queue.clear()
        queue.extend(kept)
        for key in ids:
            self._outcome_ids.pop(key, None)

    # -- health ---------------------------------------------------------------------------

    def _runner_answers(self) -> bool:
        """Whether the runner spoke within Airflow's ``[triggerer] runner_health_check_threshold``."""
        silence = sdk_internals.trigger_runner_silence(self)
        if silence is None:
            if not self._watchdog_said:
                log.warning("Airflow's trigger runner keeps no time of its last message: a stuck runner goes unseen")
                self._watchdog_said = True
            return True
        threshold = self.runner_health_check_threshold
        if threshold > 0 and silence > threshold:
            if not self._watchdog_said:
                log.error(
                    "The trigger runner has said nothing for %.0fs (threshold %.0fs): its event loop looks stuck. "
                    "This agent stops keeping its triggerer job alive, so that its triggers go to other triggerers.",
                    silence,
                    threshold,
                )
                self._watchdog_said = True
            return False
        self._watchdog_said = False
        return True

    def heartbeat(self) -> None:
        """The triggerer job's heartbeat goes with each *load*; the agent's own, from its thread."""

    def metric_tags(self) -> dict[str, str]:
        return {"hostname": self.hostname}

    def emit_metrics(self) -> None:
        super().emit_metrics()  # type: ignore[no-untyped-call]
        self.metrics.triggers_running.set(len(self.running_triggers))

    # -- logs -------------------------------------------------------------------------------

    def _follow(self, trigger_id: int, log_path: str) -> None:
        if not self.ship_logs or trigger_id in self._followers:
            return

        async def start() -> LogFollower:
            follower = LogFollower(
                key=trigger_id,
                name=f"trigger {trigger_id}",
                path=self.log_folder / log_path,
                send=self._send_log,
                incarnation=self.plane.incarnation,
                metrics=self.metrics,
                settings=self.plane.agent.settings,
            )
            follower.start()
            return follower

        try:
            self._followers[trigger_id] = self.plane.call(start)
        except PlaneUnavailable as exc:
            log.warning("The log of trigger %s is not followed: %s", trigger_id, exc)

    async def _send_log(self, trigger_id: int, batch: protocol.LogBatch) -> protocol.LogBatchResponse:
        return await self.plane.client.triggerer.log(self.plane.agent_id, trigger_id, batch)

    def _finish_followers(self) -> None:
        """Followers of triggers that ended (Airflow closed their log) read to the end and stop."""
        for trigger_id in [t for t in self._followers if t not in self.logger_cache]:
            self.plane.run_soon(self._followers.pop(trigger_id).finish)

    def finish_all_followers(self, timeout: float) -> None:
        followers, self._followers = list(self._followers.values()), {}
        for follower in followers:
            self.plane.run_soon(follower.finish)

        async def wait() -> None:
            await asyncio.gather(*(f.wait(timeout) for f in followers))

        with contextlib.suppress(PlaneUnavailable):
            self.plane.call(wait, timeout=timeout + 5)


class _Rejected(Exception):
    """The plane will never take these outcomes as they were sent."""


def count_blocked_loop_warnings(metrics: AgentMetrics) -> None:
    """Count the trigger runner's warnings that its event loop was blocked, as they reach the agent's log.

    Airflow's runner counts them in its own process (``triggers.blocked_main_thread``),
    where the agent's ``/metrics`` cannot see them; its warning comes to this process
    to be logged, and is counted here. Called once the supervisor set up its logging.
    """
    import structlog

    def count(logger: Any, method_name: str, event_dict: Any) -> Any:
        event = event_dict.get("event") if isinstance(event_dict, dict) else None
        if isinstance(event, str) and BLOCKED_WARNING in event:
            metrics.trigger_loop_blocked.inc()
        return event_dict

    processors = list(structlog.get_config()["processors"])
    structlog.configure(processors=[count, *processors])


def _clamp(error: list[str] | None) -> list[str] | None:
    """A failure's traceback lines, within what the protocol takes: the last ones, each cut short."""
    if error is None:
        return None
    return [line[:16_000] for line in error[-500:]]


def run(settings: AgentSettings, *, log_folder: Path, execution_api_url: str) -> int:
    """``tether-agent triggerer``: register in the triggerer role, then run triggers until stopped."""
    bridge = connect(settings, protocol.AgentRole.TRIGGERER)
    metrics = bridge.agent.metrics
    if not bridge.wait_registered():
        return bridge.stop()
    supervisor = TetherTriggerRunnerSupervisor.start(
        capacity=settings.trigger_capacity,
        plane=bridge,
        metrics=metrics,
        hostname=socket.gethostname(),
        execution_api_url=execution_api_url,
        log_folder=log_folder,
        ship_logs=settings.task_logs is protocol.TaskLogs.SHIP,
    )
    count_blocked_loop_warnings(metrics)
    signals_seen = 0

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            log.info("%s received: stopping the triggers", signal.Signals(signum).name)
            supervisor.stop = True
        else:
            log.warning("%s received again: killing the trigger runner now", signal.Signals(signum).name)
            supervisor.kill(signal.SIGKILL)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    died = True
    try:
        supervisor.run()
        died = not supervisor.stop
    finally:
        log.info("Waiting for the triggers to stop")
        supervisor.kill(escalation_delay=STOP_GRACE, force=True)
        # What fired before the runner stopped goes out, and the last log lines; then the job ends and its
        # triggers go to other triggerers at once.
        supervisor.handle_events()
        supervisor.handle_failed_triggers()
        supervisor.finish_all_followers(timeout=30.0)
        release = protocol.TriggererRelease(incarnation=bridge.incarnation)
        with contextlib.suppress(PlaneUnavailable, PlaneRefused):
            bridge.call(bridge.client.triggerer.release, bridge.agent_id, release)
        code = bridge.stop()
    if died:
        log.error("The trigger runner process died; the agent stops so that it is restarted")
        return code or 1
    return code
