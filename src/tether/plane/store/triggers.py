"""Triggers of deferred tasks, run by agents in the triggerer role, kept as Airflow keeps its own triggerers'.

Each triggerer agent process is an Airflow triggerer job on the plane (a row of
Airflow's ``job`` table, kept alive by the agent's calls), so Airflow's own rules
assign triggers to it (``Trigger.assign_unassigned``: by capacity, by queue where
``[triggerer] queues_enabled``, taking the triggers of triggerers that went silent)
and its own UI sees it. A new process of the same agent is a new job: the old
one's triggers go back to be assigned. What a trigger fired is written with
``Trigger.submit_event`` / ``submit_failure``, as Airflow's triggerer writes it,
under the trigger's row lock, only from the job that holds the trigger, and once
per outcome id. The plane never gives an agent its Fernet key: kwargs go decrypted.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tether import errors, protocol
from tether.plane.models import Triggerer, TriggerOutcome, TriggerRun
from tether.plane.store.base import Database, TokenIdentity, utcnow
from tether.plane.store.logs import TryOf, append_lines
from tether.plane.store.rules import calling_agent_in_role

JOB_TYPE = "TriggererJob"
#: A triggerer job's heartbeat is written at most this often.
_BEAT_EVERY = timedelta(seconds=5)


def _triggerer_agent(session: Session, identity: TokenIdentity, agent_id: str, incarnation: uuid.UUID) -> Any:
    return calling_agent_in_role(session, identity, agent_id, incarnation, protocol.AgentRole.TRIGGERER)


def _job_table() -> Any:
    from airflow.jobs.job import Job

    return Job.__table__


class TriggerStore(Database):
    def triggerer_load(
        self,
        identity: TokenIdentity,
        agent_id: str,
        request: protocol.TriggererLoad,
        *,
        queues_enabled: bool,
        health_check_threshold: float,
        now: datetime | None = None,
    ) -> tuple[int, list[int]]:
        """Keep the agent process's triggerer job alive, assign it triggers; its job id and the triggers it holds.

        With Airflow's ``[triggerer] queues_enabled`` the agent runs the triggers of its queues, as
        ``airflow triggerer --queues`` would, and, if it serves ``[operators] default_queue``, the
        triggers of no queue (deadline callbacks', asset watchers'); without, every trigger
        (Airflow keeps them queue-less then).
        """
        from airflow.configuration import conf
        from airflow.models.trigger import Trigger

        from tether.plane.models import Agent

        now = now or utcnow()
        with self.transaction() as session:
            agent = _triggerer_agent(session, identity, agent_id, request.incarnation)
            job_id = self._triggerer_job(session, agent, now, beat=request.healthy)
            passes: list[set[str] | None] = [None]
            if queues_enabled:
                queues = set(session.scalar(select(Agent.queues).where(Agent.id == agent.id)) or ())
                default = conf.get("operators", "default_queue", fallback="default")
                passes = [queues, *([None] if default in queues else [])] if queues else [None]
        # Airflow's own assignment, which commits itself; its capacity counts what the job holds of every queue.
        # A cordoned agent keeps what it runs and takes no more.
        ids: set[int] = set()
        with self.session() as session:
            for queues_of_pass in passes:
                if not agent.cordoned and request.healthy:
                    Trigger.assign_unassigned(
                        job_id, request.capacity, health_check_threshold, queues=queues_of_pass, session=session
                    )
                ids.update(Trigger.ids_for_triggerer(job_id, queues=queues_of_pass, session=session))
        return job_id, sorted(ids)

    def _triggerer_job(self, session: Session, agent: Any, now: datetime, *, beat: bool) -> int:
        """The triggerer job of the calling agent process, made for a new one, its heartbeat written if ``beat``."""
        job = _job_table()
        row = session.get(Triggerer, agent.id, with_for_update=True)
        if row is not None and row.incarnation == agent.incarnation:
            if beat and now - row.beat_at >= _BEAT_EVERY:
                session.execute(update(job).where(job.c.id == row.job_id).values(latest_heartbeat=now))
                row.beat_at = now
            return row.job_id
        if row is not None:
            # The agent restarted: its former process's job ends and its triggers go back.
            _end_job(session, row.job_id, now)
            session.delete(row)
            session.flush()
        job_id = session.execute(
            insert(job)
            .values(
                job_type=JOB_TYPE,
                state="running",
                start_date=now,
                latest_heartbeat=now,
                hostname=agent_hostname(session, agent.id),
                unixname="tether-agent",
            )
            .returning(job.c.id)
        ).scalar_one()
        session.add(
            Triggerer(agent_id=agent.id, incarnation=agent.incarnation, job_id=job_id, started_at=now, beat_at=now)
        )
        return int(job_id)

    def trigger_workloads(
        self, identity: TokenIdentity, agent_id: str, request: protocol.TriggerWorkloadsRequest
    ) -> list[dict[str, Any]]:
        """The workloads of triggers the caller's job holds, built as Airflow's triggerer builds them."""
        from airflow.models.dagbag import DBDagBag
        from airflow.models.trigger import Trigger
        from airflow.utils.helpers import log_filename_template_renderer

        with self.transaction() as session:
            agent = _triggerer_agent(session, identity, agent_id, request.incarnation)
            row = session.get(Triggerer, agent.id)
            if row is None or row.incarnation != agent.incarnation:
                raise errors.Conflict("load triggers first: this agent process has no triggerer job", reason="no_job")
            triggers = Trigger.bulk_fetch(set(request.trigger_ids), session=session)
            others = Trigger.fetch_trigger_ids_with_non_task_associations(session=session)
            render = log_filename_template_renderer()
            dag_bag = DBDagBag()
            out = []
            for trigger_id in request.trigger_ids:
                trigger = triggers.get(trigger_id)
                if trigger is None or trigger.triggerer_id != row.job_id:
                    continue  # gone, or no longer this job's
                if trigger.task_instance is None and trigger_id not in others:
                    continue  # its task has moved on already
                workload = _workload(trigger, row.job_id, dag_bag, render, session)
                if workload is None:
                    continue
                out.append(workload)
                ti = trigger.task_instance
                if ti is not None and session.get(TriggerRun, (trigger_id, row.job_id)) is None:
                    session.add(
                        TriggerRun(
                            trigger_id=trigger_id,
                            job_id=row.job_id,
                            ti_id=str(ti.id),
                            try_number=ti.try_number,
                            at=utcnow(),
                        )
                    )
            return out

    def append_trigger_log(
        self,
        identity: TokenIdentity,
        agent_id: str,
        trigger_id: int,
        batch: protocol.LogBatch,
        *,
        now: datetime | None = None,
    ) -> protocol.LogBatchResponse:
        """Keep a batch of a trigger's log lines in the log of the try that deferred, as Airflow shows them there."""
        from airflow.models.taskinstance import TaskInstance

        try:
            with self.transaction() as session:
                agent = _triggerer_agent(session, identity, agent_id, batch.incarnation)
                row = session.get(Triggerer, agent.id)
                run = None
                if row is not None and row.incarnation == agent.incarnation:
                    run = session.get(TriggerRun, (trigger_id, row.job_id))
                if run is None:
                    return protocol.LogBatchResponse(stop=True, reason="the trigger is not this agent process's")
                ti = session.execute(
                    select(
                        TaskInstance.dag_id, TaskInstance.task_id, TaskInstance.run_id, TaskInstance.map_index
                    ).where(TaskInstance.id == run.ti_id)
                ).one_or_none()
                if ti is None:
                    return protocol.LogBatchResponse(stop=True, reason="the task instance is gone")
                try_of = TryOf(run.ti_id, run.try_number, ti.dag_id, ti.task_id, ti.run_id, ti.map_index)
                return append_lines(session, try_of, agent.name, batch, self.settings.task_log_max_bytes, now)
        except IntegrityError:
            return protocol.LogBatchResponse()  # the same batch, kept by a call that raced this one

    def trigger_outcomes(
        self, identity: TokenIdentity, agent_id: str, request: protocol.TriggerOutcomes, *, now: datetime | None = None
    ) -> protocol.TriggerOutcomesResponse:
        """Write what triggers fired, each once, each only from the job holding the trigger."""
        from airflow.models.trigger import Trigger

        now = now or utcnow()
        with self.transaction() as session:
            agent = _triggerer_agent(session, identity, agent_id, request.incarnation)
            row = session.get(Triggerer, agent.id)
            job_id = row.job_id if row is not None and row.incarnation == agent.incarnation else None
        taken: list[uuid.UUID] = []
        refused: list[uuid.UUID] = []
        outcomes: list[protocol.TriggerFired | protocol.TriggerFailed] = [*request.events, *request.failures]
        for outcome in outcomes:
            try:
                with self.transaction() as session:
                    held = session.scalar(
                        select(Trigger.triggerer_id).where(Trigger.id == outcome.trigger_id).with_for_update()
                    )
                    if held is None and _unknown(session, outcome.trigger_id):
                        taken.append(outcome.outcome_id)  # the trigger is gone: nothing waits for its outcome
                        continue
                    if job_id is None or held != job_id:
                        refused.append(outcome.outcome_id)
                        continue
                    session.add(
                        TriggerOutcome(id=str(outcome.outcome_id), trigger_id=outcome.trigger_id, job_id=job_id, at=now)
                    )
                    session.flush()
                    if isinstance(outcome, protocol.TriggerFired):
                        _submit_event(session, outcome)
                    else:
                        Trigger.submit_failure(trigger_id=outcome.trigger_id, exc=outcome.error, session=session)
            except IntegrityError:
                pass  # taken already: an answer that was lost
            taken.append(outcome.outcome_id)
        return protocol.TriggerOutcomesResponse(taken=taken, refused=refused)

    def release_triggerer(self, identity: TokenIdentity, agent_id: str, request: protocol.TriggererRelease) -> None:
        """A triggerer agent stopping: its job ends and its triggers go back, to be assigned at once."""
        now = utcnow()
        with self.transaction() as session:
            agent = _triggerer_agent(session, identity, agent_id, request.incarnation)
            row = session.get(Triggerer, agent.id, with_for_update=True)  # before the job row, as everywhere
            if row is not None and row.incarnation == agent.incarnation:
                _end_job(session, row.job_id, now)
                session.delete(row)

    def clean_triggers(self, *, now: datetime | None = None) -> None:
        """What Airflow's triggerer does every loop: triggers no task, asset or callback needs go."""
        from airflow.models.trigger import Trigger

        cutoff = (now or utcnow()) - timedelta(days=1)
        with self.transaction() as session:
            Trigger.clean_unused(session=session)
            session.execute(delete(TriggerOutcome).where(TriggerOutcome.at < cutoff))
            session.execute(
                delete(TriggerRun).where(
                    TriggerRun.at < cutoff, ~select(Trigger.id).where(Trigger.id == TriggerRun.trigger_id).exists()
                )
            )


def settle_triggerers(session: Session, *, now: datetime, cutoff: datetime, judge_silence: bool) -> int:
    """End the triggerer jobs of agents that are gone, so that their triggers go to others; the sweep's part.

    Gone: deleted, restarted, its token expired or revoked, or (``judge_silence``)
    silent since ``cutoff``. While silence does not count (the agent API is not
    answering, ADR 4) the other jobs' heartbeats are written here instead: no
    triggerer coming back first takes the triggers of the others.
    """
    from tether.plane.models import Agent, AgentToken

    rows = session.execute(
        select(
            Triggerer.agent_id,
            Triggerer.job_id,
            Triggerer.incarnation,
            Triggerer.beat_at,
            Agent.incarnation.label("agent_incarnation"),
            Agent.deleted_at,
            Agent.last_heartbeat,
            AgentToken.revoked_at,
            AgentToken.expires_at,
        )
        .outerjoin(Agent, Agent.id == Triggerer.agent_id)
        .outerjoin(AgentToken, AgentToken.id == Agent.token_id)
        # Triggerer rows before Airflow's job rows, in one order, as the agent API takes them: a
        # sweep that wrote a job's heartbeat first deadlocked with a triggerer's own beat.
        .order_by(Triggerer.agent_id)
        .with_for_update(of=Triggerer)
    ).all()
    gone: list[str] = []
    kept: list[int] = []
    for row in rows:
        if (
            row.agent_incarnation is None
            or row.deleted_at is not None
            or row.agent_incarnation != row.incarnation
            or row.revoked_at is not None
            or (row.expires_at is not None and row.expires_at <= now)
            or (judge_silence and row.last_heartbeat < cutoff)
        ):
            gone.append(row.agent_id)
        elif not judge_silence and now - row.beat_at >= _BEAT_EVERY:
            kept.append(row.job_id)
    if kept:
        job = _job_table()
        session.execute(update(job).where(job.c.id.in_(kept)).values(latest_heartbeat=now))
        session.execute(update(Triggerer).where(Triggerer.job_id.in_(kept)).values(beat_at=now))
    return release_triggerer_jobs(session, gone, now)


def release_triggerer_jobs(session: Session, agent_ids: list[str], now: datetime) -> int:
    """The triggerer jobs of these agents end, their triggers to be assigned again (silent agents', by the sweep)."""
    rows = list(session.scalars(select(Triggerer).where(Triggerer.agent_id.in_(agent_ids)))) if agent_ids else []
    for row in rows:
        _end_job(session, row.job_id, now)
        session.delete(row)
    return len(rows)


def agent_hostname(session: Session, agent_id: str) -> str:
    from tether.plane.models import Agent

    return str(session.scalar(select(Agent.hostname).where(Agent.id == agent_id)) or "")


def _end_job(session: Session, job_id: int, now: datetime) -> None:
    from airflow.models.trigger import Trigger

    job = _job_table()
    session.execute(update(job).where(job.c.id == job_id).values(end_date=now, state="success"))
    session.execute(
        update(Trigger)
        .where(Trigger.triggerer_id == job_id)
        .values(triggerer_id=None)
        .execution_options(synchronize_session=False)
    )


def _submit_event(session: Session, fired: protocol.TriggerFired) -> None:
    """``Trigger.submit_event`` with the event the agent's trigger fired, read back from its serde encoding.

    What reaches Airflow's trigger supervisor from its runner is plain data
    (what the runner's channel carries: JSON types, dates and times), which the
    plane reads back without importing anything of the user's. A payload it
    cannot read fails the waiting tasks with the reason, as Airflow fails a task
    whose payload it cannot store.
    """
    from airflow.models.trigger import Trigger
    from airflow.sdk.serde import deserialize
    from airflow.triggers.base import TaskFailedEvent, TaskSkippedEvent, TaskSuccessEvent, TriggerEvent

    ends = {
        protocol.TriggerEventKind.SUCCESS: TaskSuccessEvent,
        protocol.TriggerEventKind.FAILED: TaskFailedEvent,
        protocol.TriggerEventKind.SKIPPED: TaskSkippedEvent,
    }
    if fired.kind in ends:
        Trigger.submit_event(trigger_id=fired.trigger_id, event=ends[fired.kind](xcoms=fired.xcoms), session=session)
        return
    try:
        payload = deserialize(fired.payload)
    except (ImportError, AttributeError, KeyError, TypeError, ValueError) as exc:
        reason = f"Could not resume the task: the plane cannot read the trigger's event payload ({exc})"
        Trigger.submit_failure(trigger_id=fired.trigger_id, exc=[reason], session=session)
        return
    Trigger.submit_event(trigger_id=fired.trigger_id, event=TriggerEvent(payload), session=session)


def _unknown(session: Session, trigger_id: int) -> bool:
    from airflow.models.trigger import Trigger

    return session.scalar(select(Trigger.id).where(Trigger.id == trigger_id)) is None


def _plain_kwargs(encrypted: str) -> str:
    """A trigger's kwargs as JSON: task deferrals keep them so; others are decrypted here, never on agents."""
    if encrypted.startswith("{"):
        return encrypted
    from airflow.models.crypto import get_fernet

    return str(get_fernet().decrypt(encrypted.encode()).decode())


def _workload(trigger: Any, job_id: int, dag_bag: Any, render: Any, session: Session) -> dict[str, Any] | None:
    """A ``RunTrigger`` for ``trigger``, as Airflow's triggerer supervisor makes it, with its log path."""
    from airflow.exceptions import TaskNotFound
    from airflow.executors.workloads.task import TaskInstanceDTO
    from airflow.executors.workloads.trigger import RunTrigger

    kwargs = _plain_kwargs(trigger.encrypted_kwargs)
    ti = trigger.task_instance
    if ti is None:
        watched = {a.name: a.uri for a in trigger.assets} if trigger.assets else None
        run = RunTrigger(id=trigger.id, classpath=trigger.classpath, encrypted_kwargs=kwargs, watched_assets=watched)
        return {**run.model_dump(mode="json"), "log_path": None}
    if not ti.dag_version_id:
        return None
    dto = TaskInstanceDTO.model_validate(ti, from_attributes=True)
    log_path = f"{render(ti=ti)}.trigger.{job_id}.log"
    extra: dict[str, Any] = {}
    dag_run = ti.get_dagrun(session=session)
    serialized = dag_bag.get_serialized_dag_model_for_run(dag_run, session=session) or dag_bag.get_serialized_dag_model(
        version_id=ti.dag_version_id, session=session
    )
    if serialized is not None:
        try:
            task = serialized.dag.get_task(ti.task_id)
        except TaskNotFound:
            task = None
        if task is not None and task.start_from_trigger:
            extra = {
                "dag_data": serialized.data,
                "dag_run_data": dag_run.dag_run_data.model_dump(exclude_unset=True),
            }
    run = RunTrigger(
        id=trigger.id,
        classpath=trigger.classpath,
        encrypted_kwargs=kwargs,
        ti=dto,
        timeout_after=ti.trigger_timeout,
        **extra,
    )
    return {**json.loads(run.model_dump_json()), "log_path": log_path}
