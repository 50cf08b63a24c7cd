"""DAG processing on agents: what they parse, written as Airflow's own DAG processor writes it.

Agents in the dag-processor role run Airflow's DAG processor where the DAG files
are and send one result per file. The plane writes each through Airflow's own
``update_dag_parsing_results_in_db`` (serialized DAGs, DAG versions, DAG code,
import errors, warnings), so the scheduler and the UI see what they would see
with a local processor. Tether's own tables add what a remote writer needs:
which agent token owns a bundle (``tether_bundle``), the last result written per
file, so a result that did not change is neither sent nor written again and an
older one arriving late is dropped (``tether_dag_file``), and claims of the UI's
reparse requests and of DAG callbacks that a retried call gets again
(``tether_work_claim``).

A DAG that disappears from its file is marked stale with the result that no
longer has it; a deleted file's DAGs when the bundle's files are reconciled.
Airflow's own processor finds both by time; an agent tells.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, text, update
from sqlalchemy.orm import Session

from tether import errors, protocol
from tether.plane.models import Bundle, DagFile, WorkClaim
from tether.plane.store.base import Database, TokenIdentity, audit, snapshot, utcnow
from tether.plane.store.rules import calling_agent_in_role

log = logging.getLogger(__name__)

#: What the Code tab shows where a DAG's source stays with the agents.
SOURCE_STAYS_WITH_AGENTS = (
    "# The source of this DAG stays with the Tether agents that parse it\n"
    "# (bundle {bundle}, file {fileloc}).\n"
    "# To show it here, turn on [tether] store_dag_source on the plane and\n"
    "# --share-dag-source on the agents of the dag-processor role.\n"
)
#: The warning types a parse result may carry (Airflow's ``DagWarningType``).
_WARNING_FIELDS = ("dag_id", "warning_type", "message")

#: The sources of the DAG files being written, by the ``fileloc`` in their serialized form.
_SOURCES: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("tether_dag_sources", default=None)
_source_patch_installed = False


def _install_source_patch() -> None:
    """Make Airflow's DAG code writer take a written file's source from the parse result, not from a file.

    Airflow's ``DagCode`` reads the DAG file by its path while the DAG is written;
    the plane has no DAG files. During a write by this module the source comes from
    ``_SOURCES``; any other caller reads the file as before.
    """
    global _source_patch_installed
    if _source_patch_installed:
        return
    from airflow.models.dagcode import DagCode

    original = DagCode.__dict__.get("get_code_from_file")
    if not isinstance(original, staticmethod):
        log.error(
            "Airflow's DagCode.get_code_from_file is not a static method: DAGs parsed by agents are written "
            "without their source, and the write records the missing file as an import error"
        )
        _source_patch_installed = True
        return
    read_file = original.__func__

    def get_code_from_file(fileloc: str) -> str:
        sources = _SOURCES.get()
        if sources is not None and fileloc in sources:
            return sources[fileloc]
        return str(read_file(fileloc))

    DagCode.get_code_from_file = staticmethod(get_code_from_file)  # type: ignore[method-assign]
    _source_patch_installed = True


@contextmanager
def _sources(sources: dict[str, str]) -> Iterator[None]:
    _install_source_patch()
    token = _SOURCES.set(sources)
    try:
        yield
    finally:
        _SOURCES.reset(token)


def _dag_processor(session: Session, identity: TokenIdentity, agent_id: str, incarnation: uuid.UUID) -> Any:
    return calling_agent_in_role(session, identity, agent_id, incarnation, protocol.AgentRole.DAG_PROCESSOR)


def _lock_file(session: Session, bundle_name: str, relative_fileloc: str) -> None:
    """Serialize writers of one file (two agents parsing the same bundle) until the transaction ends."""
    if session.get_bind().dialect.name == "postgresql":
        key = int.from_bytes(hashlib.sha256(f"{bundle_name}\0{relative_fileloc}".encode()).digest()[:8], "big")
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key - (1 << 63)})


class DagStore(Database):
    # -- bundles ------------------------------------------------------------------------

    def sync_bundles(
        self,
        identity: TokenIdentity,
        agent_id: str,
        request: protocol.BundleSyncRequest,
        *,
        now: datetime | None = None,
    ) -> protocol.BundleSyncResponse:
        """Record the bundles an agent parses (Airflow's bundle rows, and their owner) and return their state.

        The first token to sync a bundle owns it: agents with another token may not write it.
        """
        from airflow.models.dagbundle import DagBundleModel

        now = now or utcnow()
        names = [bundle.name for bundle in request.bundles]
        for name in names:
            identity.may_write_bundle(name)
        with self.transaction() as session:
            agent = _dag_processor(session, identity, agent_id, request.incarnation)
            owners = {row.name: row for row in session.scalars(select(Bundle).where(Bundle.name.in_(names)))}
            foreign = sorted(name for name, row in owners.items() if row.token_id != identity.id)
            if foreign:
                raise errors.Forbidden(
                    f"bundle(s) {', '.join(foreign)} are parsed with another agent token; only agents with "
                    "that token may write them (airflow tether bundles release NAME gives a bundle up)",
                    reason="bundle_not_allowed",
                )
            for name in names:
                row = owners.get(name)
                if row is None:
                    session.add(
                        Bundle(
                            name=name, token_id=identity.id, first_agent=agent.name, created_at=now, last_sync_at=now
                        )
                    )
                else:
                    row.last_sync_at = now
            states = {
                row.name: row for row in session.scalars(select(DagBundleModel).where(DagBundleModel.name.in_(names)))
            }
            for name in names:
                if name not in states:
                    states[name] = DagBundleModel(name=name)
                    session.add(states[name])
                states[name].active = True
            session.flush()
            return protocol.BundleSyncResponse(
                bundles=[
                    protocol.BundleState(
                        name=name, last_refreshed=states[name].last_refreshed, version=states[name].version
                    )
                    for name in names
                ],
                store_source=self.settings.store_dag_source,
                max_result_bytes=self.settings.max_parse_result_bytes,
            )

    def update_bundle_state(
        self, identity: TokenIdentity, agent_id: str, bundle_name: str, request: protocol.BundleStateUpdate
    ) -> None:
        from airflow.models.dagbundle import DagBundleModel

        values: dict[str, Any] = {"last_refreshed": request.last_refreshed}
        if request.version is not None:
            values["version"] = request.version
        with self.transaction() as session:
            _dag_processor(session, identity, agent_id, request.incarnation)
            self._owned(session, identity, [bundle_name])
            session.execute(update(DagBundleModel).where(DagBundleModel.name == bundle_name).values(**values))

    def release_bundle(self, name: str, *, actor: str, now: datetime | None = None) -> None:
        """Forget which token owns a bundle: the next agent to sync it owns it."""
        with self.transaction() as session:
            row = session.get(Bundle, name)
            if row is None:
                raise errors.NotFound(f"no bundle {name!r} is parsed by agents", reason="bundle_not_found")
            before = snapshot(row, ("name", "token_id", "first_agent"))
            session.delete(row)
            audit(
                session,
                actor=actor,
                action="bundle.release",
                target_type="bundle",
                target_id=name,
                before=before,
                after=None,
                now=now or utcnow(),
            )

    def bundles(self) -> list[Bundle]:
        with self.transaction() as session:
            rows = list(session.scalars(select(Bundle).order_by(Bundle.name)))
            session.expunge_all()
        return rows

    @staticmethod
    def _owned(session: Session, identity: TokenIdentity, names: Sequence[str]) -> None:
        for name in names:
            identity.may_write_bundle(name)
        owned = set(
            session.scalars(select(Bundle.name).where(Bundle.name.in_(list(names)), Bundle.token_id == identity.id))
        )
        missing = sorted(set(names) - owned)
        if missing:
            raise errors.Forbidden(
                f"this agent's token does not own bundle(s) {', '.join(missing)}: sync them first, or they are "
                "parsed with another token",
                reason="bundle_not_allowed",
            )

    # -- parse results -----------------------------------------------------------------

    def write_parse_result(
        self, identity: TokenIdentity, agent_id: str, result: protocol.ParseResult, *, now: datetime | None = None
    ) -> protocol.ParseResultResponse:
        """Write one file's parse result as Airflow's DAG processor would, once.

        Refused (409, and recorded as the file's import error) when the file defines a
        DAG that another bundle owns. A result with a DAG left out whose serialized
        form the plane does not have is answered with the DAGs to send again, and
        nothing is written.
        """
        now = now or utcnow()
        serialized = _checked_dags(result)
        conflict: str | None = None
        with self.transaction() as session:
            _dag_processor(session, identity, agent_id, result.incarnation)
            self._owned(session, identity, [result.bundle_name])
            _lock_file(session, result.bundle_name, result.relative_fileloc)
            row = session.get(DagFile, (result.bundle_name, result.relative_fileloc))
            if row is not None and row.incarnation == str(result.incarnation) and row.seq >= result.seq:
                return protocol.ParseResultResponse(stale=True)
            known = dict(row.dag_hashes) if row is not None else {}
            resend = [dag.dag_id for dag in result.dags if dag.data is None and known.get(dag.dag_id) != dag.hash]
            if resend:
                return protocol.ParseResultResponse(resend=resend)
            conflict = _foreign_dag_ids(session, result)
            deferred: list[str] = []
            if conflict is not None:
                # Written down as the file's import error, and as this result's fate: not asked for again.
                _record_import_error(session, result, conflict, now)
            else:
                self._write(session, result, serialized)
                _mark_gone_dags_stale(session, result)
                deferred = _deferred(session, result, now)
            if deferred:
                # Airflow writes a DAG at most every [core] min_serialized_dag_update_interval: the plane
                # does not have this result yet, and says so, so that the agent sends it again.
                return protocol.ParseResultResponse(deferred=deferred)
            if row is None:
                row = DagFile(bundle_name=result.bundle_name, relative_fileloc=result.relative_fileloc)
                session.add(row)
            row.digest = result.digest
            row.dag_hashes = {} if conflict is not None else {dag.dag_id: dag.hash for dag in result.dags}
            row.incarnation = str(result.incarnation)
            row.seq = result.seq
            row.updated_at = now
        if conflict is not None:
            raise errors.Conflict(conflict, reason="dag_id_owned")
        log.info(
            "Wrote the parse result of %s in bundle %s (version %s): DAGs %s, %d import error(s)",
            result.relative_fileloc,
            result.bundle_name,
            result.bundle_version or "-",
            ", ".join(f"{dag.dag_id}{'' if dag.data is not None else ' (unchanged)'}" for dag in result.dags) or "none",
            len(result.import_errors),
        )
        return protocol.ParseResultResponse()

    def _write(self, session: Session, result: protocol.ParseResult, dags: list[Any]) -> None:
        from airflow.dag_processing.collection import update_dag_parsing_results_in_db
        from airflow.models.dagwarning import DagWarning

        import_errors = {(result.bundle_name, path): error for path, error in result.import_errors.items()}
        placeholder = SOURCE_STAYS_WITH_AGENTS.format(bundle=result.bundle_name, fileloc=result.relative_fileloc)
        source = result.source if (result.source is not None and self.settings.store_dag_source) else placeholder
        with _sources({dag.fileloc: source for dag in dags}):
            update_dag_parsing_results_in_db(
                bundle_name=result.bundle_name,
                bundle_version=result.bundle_version,
                version_data=result.version_data,
                dags=dags,
                import_errors=import_errors,
                parse_duration=result.run_duration,
                warnings={DagWarning(**{key: warning[key] for key in _WARNING_FIELDS}) for warning in result.warnings},
                session=session,
                files_parsed={(result.bundle_name, result.relative_fileloc), *import_errors},
            )

    # -- a bundle's files ----------------------------------------------------------------

    def reconcile_bundle_files(
        self, identity: TokenIdentity, agent_id: str, bundle_name: str, request: protocol.BundleFiles
    ) -> protocol.BundleFilesResponse:
        """After a refresh: the DAGs of files no longer in the bundle go stale, their import errors go.

        Answers the files whose latest result the plane lacks, to be sent again.
        """
        from airflow.models.asset import remove_references_to_deleted_dags
        from airflow.models.dag import DagModel
        from airflow.models.errors import ParseImportError

        present = set(request.files)
        with self.transaction() as session:
            _dag_processor(session, identity, agent_id, request.incarnation)
            self._owned(session, identity, [bundle_name])
            before = _active_dags(session, bundle_name)
            if DagModel.deactivate_deleted_dags(bundle_name=bundle_name, rel_filelocs=present, session=session):
                remove_references_to_deleted_dags(session=session)
            session.execute(
                delete(ParseImportError).where(
                    ParseImportError.bundle_name == bundle_name, ParseImportError.filename.not_in(present)
                )
            )
            session.execute(
                delete(DagFile).where(DagFile.bundle_name == bundle_name, DagFile.relative_fileloc.not_in(present))
            )
            written = {
                row.relative_fileloc: row
                for row in session.scalars(select(DagFile).where(DagFile.bundle_name == bundle_name))
            }
            active = _active_dags(session, bundle_name)
            resend = sorted(
                path
                for path, digest in request.files.items()
                if path not in written or written[path].digest != digest or not set(written[path].dag_hashes) <= active
            )
            return protocol.BundleFilesResponse(resend=resend, deactivated=len(before - active))

    # -- reparse requests and callbacks ------------------------------------------------------

    def claim_work(
        self, identity: TokenIdentity, agent_id: str, request: protocol.WorkRequest, *, now: datetime | None = None
    ) -> protocol.WorkResponse:
        """The UI's reparse requests and the DAG callbacks for the caller's bundles, claimed once.

        Claimed work leaves Airflow's tables; a retry of the same claim gets the same work again.
        """
        from airflow.models.dagbag import DagPriorityParsingRequest
        from airflow.models.db_callback_request import DbCallbackRequest

        now = now or utcnow()
        with self.transaction() as session:
            _dag_processor(session, identity, agent_id, request.incarnation)
            claimed = session.get(WorkClaim, str(request.claim_id))
            if claimed is not None:
                if claimed.agent_id != agent_id:
                    raise errors.Conflict("that claim is another agent's", reason="claim_taken")
                return protocol.WorkResponse.model_validate(claimed.work)
            self._owned(session, identity, request.bundles)
            files = list(
                session.scalars(
                    select(DagPriorityParsingRequest).where(DagPriorityParsingRequest.bundle_name.in_(request.bundles))
                )
            )
            callbacks = (
                list(
                    session.scalars(
                        select(DbCallbackRequest)
                        .where(DbCallbackRequest.bundle_name.in_(request.bundles))
                        .order_by(DbCallbackRequest.priority_weight.desc())
                        .limit(request.max_callbacks)
                        .with_for_update(skip_locked=True)
                    )
                )
                if request.max_callbacks
                else []
            )
            work = protocol.WorkResponse(
                priority_files=[
                    protocol.PriorityFile(bundle_name=f.bundle_name, relative_fileloc=f.relative_fileloc) for f in files
                ],
                callbacks=[
                    protocol.CallbackWork(req_class=cb.data["req_class"], req_data=cb.data["req_data"])
                    for cb in callbacks
                ],
            )
            if files or callbacks:
                for claimed_row in (*files, *callbacks):
                    session.delete(claimed_row)
                session.add(
                    WorkClaim(
                        id=str(request.claim_id),
                        agent_id=agent_id,
                        work=work.model_dump(mode="json"),
                        created_at=now,
                    )
                )
            return work


def _checked_dags(result: protocol.ParseResult) -> list[Any]:
    """The result's serialized DAGs as Airflow reads them; refused when they do not say what the result says."""
    from airflow.serialization.serialized_objects import DagSerialization, LazyDeserializedDAG

    dags = []
    for dag in result.dags:
        if dag.data is None:
            continue
        try:
            DagSerialization.validate_schema(dag.data)
            lazy = LazyDeserializedDAG(data=dag.data, last_loaded=dag.last_loaded)
            dag_id, fileloc = lazy.dag_id, lazy.relative_fileloc
        except Exception as exc:
            raise errors.Invalid(
                f"DAG {dag.dag_id!r} of {result.relative_fileloc} is not a serialized DAG Airflow can read: {exc}",
                reason="invalid_dag",
            ) from None
        if dag_id != dag.dag_id or fileloc != result.relative_fileloc:
            raise errors.Invalid(
                f"the serialized DAG sent as {dag.dag_id!r} of {result.relative_fileloc} is {dag_id!r} of {fileloc}",
                reason="invalid_dag",
            )
        dags.append(lazy)
    return dags


def _foreign_dag_ids(session: Session, result: protocol.ParseResult) -> str | None:
    """Why the result may not be written: a DAG id another bundle owns, or None."""
    from airflow.models.dag import DagModel

    ids = [dag.dag_id for dag in result.dags]
    if not ids:
        return None
    taken = session.execute(
        select(DagModel.dag_id, DagModel.bundle_name).where(
            DagModel.dag_id.in_(ids), DagModel.bundle_name != result.bundle_name, DagModel.is_stale.is_(False)
        )
    ).all()
    if not taken:
        return None
    owned = ", ".join(f"{dag_id!r} belongs to bundle {bundle!r}" for dag_id, bundle in sorted(taken))
    return f"{owned}; bundle {result.bundle_name!r} ({result.relative_fileloc}) cannot take it over"


def _record_import_error(session: Session, result: protocol.ParseResult, message: str, now: datetime) -> None:
    from airflow.models.errors import ParseImportError

    existing = session.scalars(
        select(ParseImportError).where(
            ParseImportError.bundle_name == result.bundle_name,
            ParseImportError.filename == result.relative_fileloc,
        )
    ).first()
    if existing is None:
        session.add(
            ParseImportError(
                filename=result.relative_fileloc,
                bundle_name=result.bundle_name,
                timestamp=now,
                stacktrace=message,
            )
        )
    else:
        existing.stacktrace = message
        existing.timestamp = now


def _deferred(session: Session, result: protocol.ParseResult, written_at: datetime) -> list[str]:
    """The DAGs of the result that Airflow left unwritten because it wrote them a moment ago."""
    from airflow.configuration import conf
    from airflow.models.serialized_dag import SerializedDagModel

    sent = {dag.dag_id: dag.hash for dag in result.dags if dag.data is not None}
    if not sent:
        return []
    interval = timedelta(seconds=conf.getint("core", "min_serialized_dag_update_interval", fallback=30))
    latest: dict[str, tuple[str, datetime]] = {}
    rows = session.execute(
        select(SerializedDagModel.dag_id, SerializedDagModel.dag_hash, SerializedDagModel.last_updated).where(
            SerializedDagModel.dag_id.in_(list(sent))
        )
    )
    for dag_id, dag_hash, last_updated in rows:
        if dag_id not in latest or last_updated > latest[dag_id][1]:
            latest[dag_id] = (dag_hash, last_updated)
    return sorted(
        dag_id
        for dag_id, (dag_hash, last_updated) in latest.items()
        # Not touched by this write, though it differs, and written less than the interval ago.
        if dag_hash != sent[dag_id] and written_at - interval < last_updated < written_at
    )


def _mark_gone_dags_stale(session: Session, result: protocol.ParseResult) -> None:
    """The DAGs that the file defined before and no longer does are stale (Airflow finds them by time)."""
    from airflow.models.dag import DagModel

    session.execute(
        update(DagModel)
        .where(
            DagModel.bundle_name == result.bundle_name,
            DagModel.relative_fileloc == result.relative_fileloc,
            DagModel.dag_id.not_in([dag.dag_id for dag in result.dags]),
            DagModel.is_stale.is_(False),
        )
        .values(is_stale=True)
        .execution_options(synchronize_session=False)
    )


def _active_dags(session: Session, bundle_name: str) -> set[str]:
    from airflow.models.dag import DagModel

    return set(
        session.scalars(
            select(DagModel.dag_id).where(DagModel.bundle_name == bundle_name, DagModel.is_stale.is_(False))
        )
    )
