"""The sweep and the triggerer agents' calls lock the same rows in one order, on PostgreSQL.

A triggerer agent's load call locks its ``tether_triggerer`` row and then writes its
Airflow job's heartbeat. While the agent API is not judged (ADR 4) the scheduler's
sweep writes those heartbeats itself. Taken in the opposite order the two deadlock,
and PostgreSQL ends one of them: an agent call, or the sweep and with it the
scheduler.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, create_engine, insert, select, text, update
from sqlalchemy.orm import sessionmaker

from tests.conftest import create_pg_database, drop_pg_database
from tests.integration.conftest import SETTINGS, StoreAgent
from tether.embedded import wait_until
from tether.plane.models import Triggerer, metadata
from tether.plane.store import Store, utcnow

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def pg_engine(pg_admin_url: str) -> Iterator[Engine]:
    from airflow.jobs.job import Job

    url = create_pg_database(pg_admin_url)
    engine = create_engine(url)
    metadata.create_all(engine)
    Job.__table__.create(engine)
    try:
        yield engine
    finally:
        engine.dispose()
        drop_pg_database(pg_admin_url, url)


def _triggerer_with_an_old_beat(engine: Engine, store: Store) -> tuple[str, int]:
    from airflow.jobs.job import Job

    agent = StoreAgent(store, "trig")
    an_hour_ago = utcnow() - timedelta(hours=1)
    with engine.begin() as conn:
        job_id = conn.execute(
            insert(Job.__table__)
            .values(job_type="TriggererJob", state="running", start_date=an_hour_ago, latest_heartbeat=an_hour_ago)
            .returning(Job.__table__.c.id)
        ).scalar_one()
        conn.execute(
            insert(Triggerer).values(
                agent_id=agent.agent_id,
                incarnation=str(agent.incarnation),
                job_id=job_id,
                started_at=an_hour_ago,
                beat_at=an_hour_ago,
            )
        )
    return agent.agent_id, int(job_id)


def _waiting_on_a_lock(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            ).scalar_one()
        )


def _sweep_behind_the_agent_api(
    engine: Engine, store: Store, agent_id: str, then: Callable[[Connection], None], **sweep: Any
) -> dict[str, int]:
    """A sweep started while the agent API holds the agent's triggerer row, which then runs ``then``.

    Returns the sweep's counts; fails if either side met a deadlock.
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["counts"] = store.sweep(**sweep)
        except Exception as exc:  # asserted below
            outcome["error"] = exc

    sweeping = threading.Thread(target=run)
    with engine.connect() as api:
        # What the agent API's calls do first (TriggerStore._triggerer_job, release_triggerer): lock the row.
        api.execute(select(Triggerer.job_id).where(Triggerer.agent_id == agent_id).with_for_update()).scalar_one()
        sweeping.start()
        # The sweep is held up by that lock: it must be, or the test shows nothing.
        wait_until(lambda: _waiting_on_a_lock(engine) >= 1, 30, "the sweep to wait on the triggerer's row")
        # A sweep that wrote the job row first would hold it now: PostgreSQL would end
        # ``then``'s statement or the sweep as a deadlock.
        then(api)
        api.commit()
    sweeping.join(timeout=60)
    assert not sweeping.is_alive()
    assert "error" not in outcome, outcome.get("error")
    counts: dict[str, int] = outcome["counts"]
    return counts


def test_a_sweep_writing_heartbeats_waits_behind_a_triggerers_own_beat_without_a_deadlock(
    pg_engine: Engine,
) -> None:
    from airflow.jobs.job import Job

    store = Store(sessionmaker(bind=pg_engine, expire_on_commit=False), settings=SETTINGS)
    agent_id, job_id = _triggerer_with_an_old_beat(pg_engine, store)
    job = Job.__table__

    def beat(api: Connection) -> None:  # the load call's heartbeat of the job
        api.execute(update(job).where(job.c.id == job_id).values(latest_heartbeat=utcnow()))

    counts = _sweep_behind_the_agent_api(pg_engine, store, agent_id, beat, judge_silence=False)
    assert counts["triggerers_ended"] == 0
    with pg_engine.connect() as conn:
        beat_at = conn.execute(select(Triggerer.beat_at).where(Triggerer.agent_id == agent_id)).scalar_one()
    assert utcnow() - beat_at < timedelta(minutes=1), "the sweep wrote the beat the agent API was not there to"


def test_a_stopping_triggerer_and_a_sweep_ending_its_job_do_not_deadlock(pg_engine: Engine) -> None:
    """The sweep ending a silent triggerer's job while the agent says it stops: the release ends it."""
    from airflow.jobs.job import Job
    from airflow.models.team import Team
    from airflow.models.trigger import Trigger

    for table in (Team.__table__, Trigger.__table__):  # the sweep's release clears the job's triggers
        table.create(pg_engine)
    store = Store(sessionmaker(bind=pg_engine, expire_on_commit=False), settings=SETTINGS)
    agent_id, job_id = _triggerer_with_an_old_beat(pg_engine, store)
    job = Job.__table__

    def release(api: Connection) -> None:  # release_triggerer: the job ends, the row goes
        api.execute(update(job).where(job.c.id == job_id).values(state="success"))
        api.execute(text("DELETE FROM tether_triggerer WHERE agent_id = :a"), {"a": agent_id})

    counts = _sweep_behind_the_agent_api(pg_engine, store, agent_id, release, now=utcnow() + timedelta(hours=1))
    assert counts["triggerers_ended"] == 0, "the release ended the job; the sweep found nothing left"
