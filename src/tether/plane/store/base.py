"""What every part of the store stands on: sessions, one-statement connections, the audit trail."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session

from tether import errors
from tether.plane.config import PlaneSettings
from tether.plane.models import AuditEntry

#: The PostgreSQL channel that wakes agents waiting for jobs; its payload is the job's queue.
NOTIFY_CHANNEL = "tether_jobs"
#: The databases whose hot statements the store has (``INSERT ... ON CONFLICT``, ``UPDATE ... RETURNING``).
SUPPORTED_DIALECTS = ("postgresql", "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class TokenIdentity:
    """The token an agent request was authenticated with."""

    id: str
    name: str
    #: The roles its agents may serve (``protocol.TokenScope`` values).
    scopes: frozenset[str] = frozenset({"worker"})
    #: The DAG bundles its dag-processor agents may write; None: any.
    bundles: frozenset[str] | None = None
    #: When it stops being accepted; None: never. A cached identity past it is looked up again.
    expires_at: datetime | None = None

    def require(self, scope: str) -> None:
        """Refuse a call this token may not make, naming the scope it lacks."""
        if scope not in self.scopes:
            raise errors.Forbidden(
                f"agent token {self.name} may serve {', '.join(sorted(self.scopes)) or 'nothing'}, not {scope}: "
                f"use a token created with --scope {scope}",
                reason="scope_missing",
            )

    def may_write_bundle(self, bundle: str) -> None:
        if self.bundles is not None and bundle not in self.bundles:
            raise errors.Forbidden(
                f"agent token {self.name} may write DAG bundles {', '.join(sorted(self.bundles)) or '(none)'}, "
                f"not {bundle}: use a token created with --bundles {bundle}",
                reason="bundle_not_allowed",
            )


def airflow_session_factory() -> Callable[[], Session]:
    """Sessions of our own on Airflow's engine.

    Not Airflow's scoped ``settings.Session``: in the scheduler that is the very
    session the scheduling loop has open, and closing it would end its transaction.
    """
    from airflow import settings
    from sqlalchemy.orm import sessionmaker

    if settings.engine is None:
        settings.configure_orm()
    return sessionmaker(bind=settings.engine, expire_on_commit=False)


def snapshot(row: Any, fields: Sequence[str]) -> dict[str, Any]:
    """The audited fields of a row, as JSON."""
    out = {}
    for name in fields:
        value = getattr(row, name)
        out[name] = value.isoformat() if isinstance(value, datetime) else value
    return out


def audit(
    session: Session,
    *,
    actor: str,
    action: str,
    target_type: str,
    target_id: str,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    now: datetime,
) -> None:
    """Record an operator's change in the same transaction as the change itself."""
    session.add(
        AuditEntry(
            at=now,
            actor=actor,
            action=action,
            target_type=target_type,
            target_id=target_id,
            before=before,
            after=after,
        )
    )


def notify(session: Session, queues: Iterable[str]) -> None:
    """Wake agents waiting on ``queues``; PostgreSQL delivers it when the transaction commits."""
    if session.get_bind().dialect.name == "postgresql":
        for queue in set(queues):
            session.execute(text("SELECT pg_notify(:channel, :queue)"), {"channel": NOTIFY_CHANNEL, "queue": queue})


class Database:
    """The store's access to the metadata database: a transaction, or one statement that commits itself."""

    def __init__(self, session_factory: Callable[[], Session], *, settings: PlaneSettings) -> None:
        self._session_factory = session_factory
        self.settings = settings
        self._checked_dialect = False
        self._bound: Engine | None = None

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session whose statements commit together when the block ends (and roll back if it raises)."""
        session = self._session_factory()
        try:
            self._check_dialect(session)
            with session.begin():
                yield session
        finally:
            session.close()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session for Airflow's own functions that commit as they go; closed (and rolled back) after."""
        session = self._session_factory()
        try:
            self._check_dialect(session)
            yield session
            session.commit()
        finally:
            session.close()

    def send_notification(self, channel: str, payload: str) -> None:
        """One notification, sent now (the job listener's probe of its own connection)."""
        with self.statement() as conn:
            conn.execute(text("SELECT pg_notify(:channel, :payload)"), {"channel": channel, "payload": payload})

    @contextmanager
    def statement(self) -> Iterator[Connection]:
        """A connection for one statement that commits as it runs: no BEGIN and COMMIT round trips.

        For the agent API's hot paths, each a single conditional statement: atomic on its own.
        Taken from the engine's pool directly, without a session (its identity map and
        state) around one statement.
        """
        engine = self._engine()
        with engine.connect() as conn:
            if engine.dialect.driver != "psycopg2":
                yield conn.execution_options(isolation_level="AUTOCOMMIT")
                return
            driver = conn.connection.dbapi_connection
            assert driver is not None
            # psycopg2's own switch, which sends nothing. SQLAlchemy's AUTOCOMMIT isolation level
            # resets the connection as it goes back to the pool with one more statement (SET
            # default_transaction_isolation): a second round trip, and a second transaction on
            # the server, for every heartbeat, start and report.
            driver.autocommit = True
            try:
                yield conn
            finally:
                if not driver.closed:  # a lost connection is discarded by the pool
                    driver.autocommit = False

    def _engine(self) -> Engine:
        """The engine the store's sessions are bound to, found (and its dialect checked) once."""
        if self._bound is None:
            session = self._session_factory()
            try:
                self._check_dialect(session)
                bind = session.get_bind()
            finally:
                session.close()
            self._bound = bind if isinstance(bind, Engine) else bind.engine
        return self._bound

    def _check_dialect(self, session: Session) -> None:
        if self._checked_dialect:
            return
        dialect = session.get_bind().dialect.name
        if dialect not in SUPPORTED_DIALECTS:
            raise errors.ConfigError(
                f"Tether needs a PostgreSQL metadata database (SQLite for trying it out); this one is {dialect}"
            )
        self._checked_dialect = True
