"""The dag-processor role: Airflow's own DAG processor where the DAG files are, the plane kept up to date.

``tether-agent dag-processor`` runs Airflow's ``DagFileProcessorManager`` - its
file discovery, its parsing processes, its bundle refreshes, its callbacks -
with each of its override points that would read or write the metadata database
calling the agent API instead:

- bundles are synced with the plane at start; their refresh state is kept here
  and written through to the plane;
- each file's parse result is sent once it differs from what the plane has; a
  DAG whose serialized form the plane has is sent as its hash only;
- after a bundle refresh the plane learns which files the bundle holds (the DAGs
  of the others go stale) and says which results it lacks;
- the UI's reparse requests and the scheduler's DAG callbacks are claimed from
  the plane every ``WORK_POLL``;
- Variables and Connections at parse time come from this agent's secrets
  backends; the metadata database is never asked.

A result the plane could not take (unreachable) waits here and is sent again; a
newer result of the same file replaces it. Threads: the manager owns the main
thread (it installs signal handlers and forks its parsing processes); the
agent's registration, heartbeats and health endpoints run on an asyncio loop in
a thread of their own, and the manager's calls to the plane are handed to it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Collection
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import attrs
import httpx
from airflow.dag_processing.manager import BundleState, DagFileInfo, DagFileProcessorManager

from tether import protocol
from tether.agent.bridge import PlaneBridge, connect
from tether.agent.client import DagProcessing, compress
from tether.agent.health import AgentMetrics
from tether.agent.settings import AgentSettings
from tether.errors import PlaneRefused, PlaneUnavailable, TetherError

log = logging.getLogger("tether.agent.dag_processor")

T = TypeVar("T")

#: How often the UI's reparse requests and the scheduler's callbacks are claimed from the plane.
WORK_POLL = 2.0
#: How often results and bundle states the plane could not take are offered again.
RETRY_EVERY = 5.0
#: Refusals after which a parse result is not offered again until the file's result changes.
_FINAL_REFUSALS = frozenset({409, 413, 422})


def result_digest(parsed: protocol.ParseResult, source: str | None) -> str:
    """Names what a file's result says, so that an unchanged one is recognised without sending it."""
    content = {
        "dags": sorted((dag.dag_id, dag.hash) for dag in parsed.dags),
        "import_errors": sorted(parsed.import_errors.items()),
        "warnings": sorted(json.dumps(w, sort_keys=True, default=str) for w in parsed.warnings),
        "source": hashlib.sha256(source.encode()).hexdigest() if source is not None else None,
        "bundle_version": parsed.bundle_version,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _warning(warning: Any) -> dict[str, Any]:
    if isinstance(warning, dict):
        return {key: warning.get(key) for key in ("dag_id", "warning_type", "message")}
    return {key: str(getattr(warning, key, "")) for key in ("dag_id", "warning_type", "message")}


def _agent_only_client() -> Any:
    """The parsing processes' last resort for Variables and Connections: nothing is found there.

    Parse-time lookups go to this agent's secrets backends and environment first;
    this client answers what those did not have, as a plane would answer a name it
    does not know. The metadata database is never asked.
    """
    from airflow.sdk.api.client import Client

    def not_found(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"detail": {"reason": "not_found", "message": "not on this agent"}})

    client = Client(base_url=None, token="", dry_run=True, transport=httpx.MockTransport(not_found))
    client.base_url = "http://tether-agent.invalid./"  # type: ignore[assignment]
    return client


@attrs.define(kw_only=True)
class TetherDagProcessorManager(DagFileProcessorManager):  # type: ignore[misc]
    """Airflow's DAG processor manager, reporting to the plane through the agent API."""

    plane: PlaneBridge
    metrics: AgentMetrics
    share_source: bool = False
    _bundles_by_name: dict[str, Any] = attrs.field(factory=dict, init=False)
    _states: dict[str, BundleState] = attrs.field(factory=dict, init=False)
    _unsent_states: dict[str, tuple[datetime, str | None]] = attrs.field(factory=dict, init=False)
    _store_source: bool = attrs.field(default=False, init=False)
    _max_result_bytes: int = attrs.field(default=16 * 1024 * 1024, init=False)
    #: (bundle, file) -> digest of the result the plane has.
    _acked: dict[tuple[str, str], str] = attrs.field(factory=dict, init=False)
    #: (bundle, dag_id) -> hash of the serialized DAG the plane has.
    _known: dict[tuple[str, str], str] = attrs.field(factory=dict, init=False)
    _seq: dict[tuple[str, str], int] = attrs.field(factory=dict, init=False)
    #: Results the plane could not take yet, the newest per file.
    _outbox: dict[tuple[str, str], dict[str, Any]] = attrs.field(factory=dict, init=False)
    _last_retry: float = attrs.field(default=0.0, init=False)
    _last_work_poll: float = attrs.field(default=0.0, init=False)
    _claim_id: uuid.UUID | None = attrs.field(default=None, init=False)
    _claimed_callbacks: list[Any] = attrs.field(factory=list, init=False)

    @property
    def _api(self) -> DagProcessing:
        return self.plane.client.dag_processing

    # -- process set-up -------------------------------------------------------------------

    def prepare_server_process_context(self) -> None:
        """Not a server: secrets come from this agent's backends, never from the metadata database."""

    @functools.cached_property
    def client(self) -> Any:
        return _agent_only_client()

    # -- bundles --------------------------------------------------------------------------

    def get_all_bundles(self) -> list[Any]:
        bundles: list[Any] = super().get_all_bundles()
        self._bundles_by_name = {bundle.name: bundle for bundle in bundles}
        return bundles

    def sync_bundles(self) -> None:
        bundles = self.get_all_bundles()
        if self.bundle_names_to_parse:
            bundles = [b for b in bundles if b.name in self.bundle_names_to_parse]
        request = protocol.BundleSyncRequest(
            incarnation=self.plane.incarnation,
            bundles=[protocol.Bundle(name=b.name, supports_versioning=bool(b.supports_versioning)) for b in bundles],
        )
        delay = 1.0
        while True:
            try:
                answer = self.plane.call(self._api.sync_bundles, self.plane.agent_id, request)
                break
            except TetherError as exc:
                log.error("Cannot sync the bundles %s with the plane: %s; again in %.0fs", _names(bundles), exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, 60.0)
        self._states = {b.name: BundleState(last_refreshed=b.last_refreshed, version=b.version) for b in answer.bundles}
        self._store_source = answer.store_source
        self._max_result_bytes = answer.max_result_bytes
        sharing = "shared with" if self.share_source and self._store_source else "kept from"
        log.info("Bundles %s synced with the plane; DAG source is %s it", _names(bundles), sharing)

    def get_bundle_state(self, bundle_name: str, *, session: Any = None) -> BundleState | None:
        return self._states.get(bundle_name)

    def update_bundle_state(
        self, bundle_name: str, *, last_refreshed: datetime, version: str | None, session: Any = None
    ) -> None:
        current = self._states.get(bundle_name)
        kept = version if version is not None else (current.version if current else None)
        self._states[bundle_name] = BundleState(last_refreshed=last_refreshed, version=kept)
        self._unsent_states[bundle_name] = (last_refreshed, version)
        self._send_states()

    def _send_states(self) -> None:
        for name, (last_refreshed, version) in list(self._unsent_states.items()):
            body = protocol.BundleStateUpdate(
                incarnation=self.plane.incarnation, last_refreshed=last_refreshed, version=version
            )
            try:
                self.plane.call(self._api.update_bundle_state, self.plane.agent_id, name, body)
            except TetherError as exc:
                log.warning("The plane did not take the state of bundle %s yet: %s", name, exc)
                return
            self._unsent_states.pop(name, None)

    def deactivate_deleted_dags(self, bundle_name: str, present: set[DagFileInfo]) -> None:
        """Told with the files the bundle holds, in ``clear_orphaned_import_errors``, right after this."""

    def clear_orphaned_import_errors(
        self, bundle_name: str, observed_filelocs: set[str], *, session: Any = None
    ) -> None:
        """Tell the plane which files the bundle holds; forget what it says it lacks, to send it again."""
        body = protocol.BundleFiles(
            incarnation=self.plane.incarnation,
            files={path: self._acked.get((bundle_name, path)) for path in observed_filelocs},
        )
        try:
            answer = self.plane.call(self._api.bundle_files, self.plane.agent_id, bundle_name, body)
        except TetherError as exc:
            log.warning("Could not tell the plane the files of bundle %s: %s; next refresh", bundle_name, exc)
            return
        for key in [key for key in self._acked if key[0] == bundle_name and key[1] not in observed_filelocs]:
            del self._acked[key]
        for path in answer.resend:
            self._acked.pop((bundle_name, path), None)
        if answer.deactivated or answer.resend:
            log.info(
                "Bundle %s: %d DAG(s) of removed files went stale; the plane asks for %d file(s) again",
                bundle_name,
                answer.deactivated,
                len(answer.resend),
            )

    def deactivate_stale_dags(self, last_parsed: dict[DagFileInfo, datetime | None], *, session: Any = None) -> None:
        """The plane marks a file's missing DAGs stale as each result arrives; nothing to find by time."""

    def purge_inactive_dag_warnings(self) -> None:
        """The plane's to do."""

    # -- parse results ----------------------------------------------------------------------

    def handle_parsing_result(self, file: DagFileInfo, proc: Any, *, session: Any = None) -> None:
        # Passing the session (none) keeps Airflow's own method from opening one on the metadata database.
        super().handle_parsing_result(file, proc, session=None)  # type: ignore[arg-type]

    def persist_parsing_result(
        self,
        *,
        bundle_name: str,
        bundle_version: str | None,
        version_data: dict[str, Any] | None,
        parsing_result: Any,
        run_duration: float,
        relative_fileloc: str | None,
        session: Any = None,
    ) -> None:
        if relative_fileloc is None:
            return
        self.metrics.dag_parse_seconds.observe(run_duration)
        key = (bundle_name, relative_fileloc)
        source = self._source(parsing_result.fileloc)
        dags = [(lazy.dag_id, lazy.hash, lazy) for lazy in parsing_result.serialized_dags]
        self._seq[key] = seq = self._seq.get(key, 0) + 1
        result = protocol.ParseResult(
            incarnation=self.plane.incarnation,
            bundle_name=bundle_name,
            bundle_version=bundle_version,
            version_data=version_data,
            relative_fileloc=relative_fileloc,
            seq=seq,
            run_duration=run_duration,
            dags=[protocol.ParsedDag(dag_id=dag_id, hash=dag_hash) for dag_id, dag_hash, _ in dags],
            import_errors=dict(parsing_result.import_errors or {}),
            warnings=[_warning(w) for w in parsing_result.warnings or []],
            source=source,
            digest="0" * 64,
        )
        digest = result_digest(result, source)
        if self._acked.get(key) == digest:
            self._outbox.pop(key, None)
            self.metrics.dag_files.labels("unchanged").inc()
            return
        with_data = {dag_id for dag_id, dag_hash, _ in dags if self._known.get((bundle_name, dag_id)) != dag_hash}
        self._send(key, result.model_copy(update={"digest": digest}), dags, with_data)

    def _source(self, fileloc: str) -> str | None:
        if not (self.share_source and self._store_source):
            return None
        try:
            return Path(fileloc).read_text(errors="replace")
        except OSError as exc:
            log.warning("Cannot read the source of %s to share it: %s", fileloc, exc)
            return None

    def _send(
        self,
        key: tuple[str, str],
        result: protocol.ParseResult,
        dags: list[tuple[str, str, Any]],
        with_data: set[str],
        *,
        again: bool = False,
    ) -> None:
        sent = result.model_copy(
            update={
                "dags": [
                    protocol.ParsedDag(
                        dag_id=dag_id,
                        hash=dag_hash,
                        data=lazy.data if dag_id in with_data else None,
                        last_loaded=lazy.last_loaded,
                    )
                    for dag_id, dag_hash, lazy in dags
                ]
            }
        )
        body = compress(sent)
        size = len(sent.model_dump_json())
        if size > self._max_result_bytes:
            log.error(
                "The parse result of %s in bundle %s is %d bytes, over the plane's limit of %d: not sent",
                key[1],
                key[0],
                size,
                self._max_result_bytes,
            )
            self._acked[key] = result.digest
            self.metrics.dag_files.labels("refused").inc()
            return
        try:
            answer = self.plane.call(self._api.results, self.plane.agent_id, body)
        except PlaneUnavailable as exc:
            if key not in self._outbox:
                log.warning("The plane did not take the result of %s yet (%s); it waits here", key[1], exc)
            self._outbox[key] = {"result": result, "dags": dags, "with_data": with_data}
            self.metrics.dag_files.labels("queued").inc()
            return
        except PlaneRefused as exc:
            log.error("The plane refused the result of %s in bundle %s: %s", key[1], key[0], exc)
            if exc.status in _FINAL_REFUSALS:
                self._acked[key] = result.digest
                self._outbox.pop(key, None)
            else:
                self._outbox[key] = {"result": result, "dags": dags, "with_data": with_data}
            self.metrics.dag_files.labels("refused").inc()
            return
        self.metrics.dag_upload_bytes.inc(len(body))
        self._outbox.pop(key, None)
        if answer.resend and not again:
            self._send(key, result, dags, with_data | set(answer.resend), again=True)
            return
        if answer.resend:
            log.warning("The plane asked again for DAGs %s of %s; next parse", answer.resend, key[1])
            return
        if answer.deferred:
            log.info("The plane writes DAGs %s of %s later; they go again with the next parse", answer.deferred, key[1])
            self.metrics.dag_files.labels("deferred").inc()
            return
        self._acked[key] = result.digest
        for dag_id, dag_hash, _ in dags:
            self._known[(key[0], dag_id)] = dag_hash
        self.metrics.dag_files.labels("stale" if answer.stale else "sent").inc()

    # -- reparse requests and callbacks -------------------------------------------------------

    def claim_priority_files(self) -> list[DagFileInfo]:
        if time.monotonic() - self._last_work_poll < WORK_POLL or not self._bundles_by_name:
            return []
        self._last_work_poll = time.monotonic()
        self._claim_id = self._claim_id or uuid.uuid4()
        request = protocol.WorkRequest(
            incarnation=self.plane.incarnation,
            claim_id=self._claim_id,
            bundles=sorted(self._bundles_by_name),
            max_callbacks=self.max_callbacks_per_loop,
        )
        try:
            work = self.plane.call(self._api.work, self.plane.agent_id, request)
        except PlaneUnavailable as exc:
            log.debug("No reparse requests or callbacks claimed: %s", exc)
            return []  # the same claim is asked again: what it got, if anything, is not lost
        except PlaneRefused as exc:
            log.warning("The plane refused the claim of reparse requests and callbacks: %s", exc)
            self._claim_id = None
            return []
        self._claim_id = None
        self._claimed_callbacks.extend(_callback_requests(work.callbacks))
        self.metrics.dag_callbacks.inc(len(work.callbacks))
        files = []
        for requested in work.priority_files:
            bundle = self._bundles_by_name.get(requested.bundle_name)
            if bundle is not None:
                files.append(
                    DagFileInfo(
                        rel_path=Path(requested.relative_fileloc),
                        bundle_name=bundle.name,
                        bundle_path=bundle.path,
                    )
                )
        if files:
            log.info("Reparse requested: %s", ", ".join(str(f.rel_path) for f in files))
        return files

    def fetch_callbacks(self) -> list[Any]:
        callbacks, self._claimed_callbacks = self._claimed_callbacks, []
        return callbacks

    # -- the manager's heartbeat: what waits here goes out again ---------------------------------

    def retry_unsent(self) -> None:
        if time.monotonic() - self._last_retry < RETRY_EVERY or not (self._outbox or self._unsent_states):
            return
        self._last_retry = time.monotonic()
        self._send_states()
        for key, pending in list(self._outbox.items()):
            self._send(key, pending["result"], pending["dags"], pending["with_data"])
            if key in self._outbox:
                return  # the plane is still away: the rest waits too


def _names(bundles: Collection[Any]) -> str:
    return ", ".join(sorted(bundle.name for bundle in bundles)) or "(none)"


def _callback_requests(callbacks: list[protocol.CallbackWork]) -> list[Any]:
    """The callback requests Airflow's scheduler stored, read as its DAG processor reads them."""
    from airflow.callbacks import callback_requests

    requests = []
    for callback in callbacks:
        kind = getattr(callback_requests, callback.req_class, None)
        if not (isinstance(kind, type) and issubclass(kind, callback_requests.BaseCallbackRequest)):
            log.error("A callback of unknown kind %r was claimed; it is not run", callback.req_class)
            continue
        try:
            requests.append(kind.from_json(callback.req_data))
        except Exception as exc:
            log.error("A %s callback could not be read (%s); it is not run", callback.req_class, exc)
    return requests


def run(settings: AgentSettings) -> int:
    """``tether-agent dag-processor``: register in the dag-processor role, then parse until stopped."""
    bridge = connect(settings, protocol.AgentRole.DAG_PROCESSOR)
    metrics = bridge.agent.metrics
    if not bridge.wait_registered():
        return bridge.stop()
    manager = TetherDagProcessorManager(
        max_runs=-1,
        plane=bridge,
        metrics=metrics,
        share_source=settings.share_dag_source,
    )
    manager.heartbeat = manager.retry_unsent
    try:
        manager.run()  # type: ignore[no-untyped-call]
    except SystemExit:
        pass  # the manager's own handler of SIGTERM and SIGINT ends it this way, its processes stopped
    finally:
        code = bridge.stop()
    return code
