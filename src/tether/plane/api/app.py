"""The agent API (v1), mounted by the plugin under ``/tether`` in Airflow's API server.

Routes are thin: they authenticate, validate and call the ``Store``. The app is
built without reading configuration; the store and settings are made on the
first request (mounted sub-apps get no lifespan events of their own).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import re
import time
import uuid
import zlib
from collections.abc import Callable
from datetime import timedelta
from typing import Annotated, Any

from fastapi import FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DisconnectionError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import tether
from tether import errors, protocol
from tether.collector import settle_garbage_collector
from tether.plane import metrics
from tether.plane.api.admin import Authorizer, admin_router, airflow_authorizer
from tether.plane.api.dag_processing import dag_processing_router, takes_large_bodies
from tether.plane.api.demand import demand_router
from tether.plane.api.deps import (
    DB_THREADS,
    Address,
    Ctx,
    Identity,
    PlaneContext,
    Revision,
    SentinelIdentity,
    WorkerIdentity,
    written,
)
from tether.plane.api.tokens import with_execution_tokens
from tether.plane.api.triggers import triggerer_router
from tether.plane.api.wakeup import ListenerState
from tether.plane.config import PlaneSettings
from tether.plane.store import NOTIFY_CHANNEL, Store, TokenIdentity
from tether.plane.ui import ui_router, ui_static
from tether.plane.values import configured_plane_url

log = logging.getLogger("tether.api")

#: Fraction of the lease wait by which a poll may be cut short, to spread agents' polls out.
LEASE_JITTER = 0.25
#: A pooled connection unused for this long is checked before a call uses it (see ``ping_when_idle``).
PING_IDLE_CONNECTIONS_AFTER = timedelta(seconds=10)
_RETURNED_AT = "tether_returned_at"


def agent_api_session_factory(
    conn: str, *, ping_idle_after: timedelta = PING_IDLE_CONNECTIONS_AFTER
) -> Callable[[], Any]:
    """Sessions on a connection pool of the agent API's own, as large as its database threads.

    Airflow's pool in the API server (5 connections and 10 more opened and closed
    on demand) is shared with the Execution API. Agent calls run up to
    ``DB_THREADS`` at once: on that pool a fleet's heartbeats opened a new
    connection - a new PostgreSQL backend - for most calls, and waited behind the
    tasks' own calls. With a pool of their own that never overflows they do neither.

    Where Airflow checks every connection before use (``sql_alchemy_pool_pre_ping``,
    its default), this pool checks only those unused for ``ping_idle_after``: a
    heartbeat is one statement, and a check before each doubled what a fleet cost
    the database. A connection in steady use is not the one a firewall or
    PgBouncer dropped; one broken otherwise (the server restarted) fails its call,
    which the agent retries, and the pool replaces it.
    """
    from airflow import settings as airflow_settings
    from airflow.configuration import conf
    from sqlalchemy import create_engine
    from sqlalchemy.orm import sessionmaker

    args = airflow_settings.prepare_engine_args()  # type: ignore[no-untyped-call]
    if conf.has_option("database", "sql_alchemy_connect_args"):
        args["connect_args"] = conf.getimport("database", "sql_alchemy_connect_args")
    if "poolclass" not in args:  # no pool at all when Airflow's is switched off (PgBouncer and the like)
        args.update(pool_size=DB_THREADS, max_overflow=0)
    check = bool(args.pop("pool_pre_ping", False))
    engine = create_engine(conn, **args)
    if check:
        ping_when_idle(engine, ping_idle_after)
    return sessionmaker(bind=engine, expire_on_commit=False)


def ping_when_idle(engine: Engine, after: timedelta) -> None:
    """Check a pooled connection (one ``SELECT 1``) before use only if it sat unused for ``after``.

    A connection that fails the check is discarded and another taken, as with
    SQLAlchemy's ``pool_pre_ping``.
    """
    idle = after.total_seconds()

    @event.listens_for(engine, "checkin")
    def returned(dbapi_connection: Any, record: Any) -> None:
        record.info[_RETURNED_AT] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def taken(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        since = record.info.get(_RETURNED_AT)
        if since is None or time.monotonic() - since < idle:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except engine.dialect.loaded_dbapi.Error as exc:
            raise DisconnectionError(f"a pooled connection idle for {time.monotonic() - since:.0f}s is gone") from exc


def _context_from_airflow() -> PlaneContext:
    from airflow import settings as airflow_settings

    from tether.plane.store import airflow_session_factory

    plane_settings = PlaneSettings.from_airflow()
    dsn = None
    conn = airflow_settings.SQL_ALCHEMY_CONN or ""
    if conn.startswith("postgresql"):
        from sqlalchemy.engine import make_url

        url = make_url(plane_settings.listen_database_url or conn)
        dsn = url.set(drivername="postgresql").render_as_string(hide_password=False)
        store = Store(agent_api_session_factory(conn), settings=plane_settings)
    else:
        store = Store(airflow_session_factory(), settings=plane_settings)
    # By the first agent call the API server has imported and built everything it keeps for life.
    settle_garbage_collector()
    return PlaneContext.for_store(store, listen_dsn=dsn)


class RequestLog:
    """Echo (or assign) a request id and log each request with its status and duration.

    A plain ASGI middleware: Starlette's ``@app.middleware("http")`` runs every
    request through a task group and memory streams, which with a thousand agents
    holding long-polls cost the API server more CPU than the requests themselves.

    Answered requests are logged at DEBUG: Airflow's access log (``http.access``)
    has each of them already, with the request id agents send, and a fleet's polls
    need not be logged twice. Refused and failed ones are logged at INFO.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = protocol.REQUEST_ID_HEADER.lower().encode()
        rid = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == header), "") or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        started = time.monotonic()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (header, rid.encode("latin-1"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            log.log(
                logging.INFO if status >= 400 else logging.DEBUG,
                "%s %s -> %d in %.1f ms [request_id=%s]",
                scope.get("method"),
                scope.get("path"),
                status,
                (time.monotonic() - started) * 1000,
                rid,
            )


#: A NUL character escaped in JSON text (and not itself an escaped backslash followed by "u0000").
_JSON_NUL = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


def _has_nul(scope: Scope) -> bool:
    """Whether the request's path or query names a NUL character, which no name or id of the plane holds."""
    query: bytes = scope.get("query_string", b"")
    return "\x00" in scope.get("path", "") or b"%00" in query or b"\x00" in query


class BodyLimit:
    """Refuse bodies over the route's limit with 413, and header blocks over ``MAX_HEADER_BYTES`` with 431.

    Text with a NUL character is refused too (400 in the path or query, 422 in a
    body), before the database refuses to store it: no name, id or setting holds
    one. Log lines are the exception: a NUL a task printed is shown as U+FFFD.

    ``limit_for`` gives the limit of a path. A body sent with ``Content-Encoding:
    gzip`` is decompressed here, and its limit holds for what it decompresses to.
    Both are refused before anything reads the request: no token is parsed, no
    body read, nothing logged but the refusal.
    """

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header_bytes = sum(len(name) + len(value) + 4 for name, value in scope.get("headers", []))
        if header_bytes > protocol.MAX_HEADER_BYTES:
            refused = f"the request's headers are over {protocol.MAX_HEADER_BYTES} bytes"
            await _problem(431, refused, "headers_too_large")(scope, receive, send)
            return
        if _has_nul(scope):
            refused = "the request's path or query holds a NUL character"
            await _problem(400, refused, "invalid_request")(scope, receive, send)
            return
        limit = self.limit_for(scope.get("path", ""))
        too_large = _problem(413, f"the request body is over {limit} bytes", "body_too_large")
        headers = dict(scope.get("headers", []))
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            await too_large(scope, receive, send)
            return
        # Read the whole body here, before any route sees it: a limit hit halfway through a
        # route's own read would surface as FastAPI's reason-less 400, not as our 413.
        body = b""
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            if len(body) > limit:
                await too_large(scope, receive, send)
                return
            more = bool(message.get("more_body", False))
        if headers.get(b"content-encoding", b"").lower() == b"gzip":
            try:
                body = _gunzip(body, limit)
            except errors.PlaneError as exc:
                await _problem(exc.status_code, exc.detail, exc.reason)(scope, receive, send)
                return
            scope = {
                **scope,
                "headers": [
                    (name, value)
                    for name, value in scope.get("headers", [])
                    if name not in (b"content-encoding", b"content-length")
                ]
                + [(b"content-length", str(len(body)).encode())],
            }
        if not scope.get("path", "").endswith("/logs") and _JSON_NUL.search(body):
            refused = "invalid request: text in the body holds a NUL character (\\u0000)"
            await _problem(422, refused, "invalid_request")(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _gunzip(body: bytes, limit: int) -> bytes:
    """``body`` decompressed; refused when it is not gzip or decompresses to over ``limit`` bytes."""
    inflate = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        out = inflate.decompress(body, limit + 1)
    except zlib.error as exc:
        raise errors.PlaneError(f"the request body is not valid gzip: {exc}", reason="bad_encoding") from None
    if len(out) > limit or inflate.unconsumed_tail:
        raise errors.TooLarge(f"the request body decompresses to over {limit} bytes", reason="body_too_large")
    if not inflate.eof:
        raise errors.PlaneError("the request body is not valid gzip: it ends early", reason="bad_encoding")
    return out


def _problem(status: int, detail: str, reason: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": detail, "reason": reason})


async def _lease(
    ctx: PlaneContext, identity: TokenIdentity, agent_id: uuid.UUID, body: protocol.LeaseRequest
) -> protocol.LeaseResponse:
    """Hold the poll until jobs are leased to the agent or the wait is over."""
    settings = ctx.store.settings
    # Each poll is held a little less than asked, at random: agents that started
    # together (a fleet rollout, a plane restart) drift apart instead of all asking
    # again in the same instant, every lease_wait, in front of everyone's heartbeats.
    wait = min(body.wait, settings.lease_wait.total_seconds()) * random.uniform(1 - LEASE_JITTER, 1)
    deadline = time.monotonic() + wait
    if body.heartbeat:
        # Stamped as the poll arrives: it proves the agent is there now, not when the poll ends (ADR 8).
        beat = functools.partial(ctx.store.poll_heartbeat, identity, str(agent_id), body)
        if await ctx.db(beat):
            return protocol.LeaseResponse(cordoned=True)
    if ctx.listen_dsn is not None:
        ctx.wakeup.start_listening(ctx.listen_dsn, NOTIFY_CHANNEL)
    poll = settings.poll_interval.total_seconds()
    claim = functools.partial(ctx.store.claim, identity, str(agent_id), body)
    queues = list(body.queues)
    with ctx.wakeup.subscribe(queues, body.free_slots) as woken:
        # A queue found empty since its last notification needs no second look: a fleet's
        # idle polls then cost the database nothing until a job comes.
        look_now = not ctx.wakeup.known_empty(queues, body.free_slots)
        while True:
            woken.clear()
            leases: list[protocol.Lease] | None = []
            if look_now:
                async with ctx.claim_limiter():
                    # A notification wakes a few polls of its queue. Those that get a thread after
                    # a claim begun since then found the queue empty need not look: one job then
                    # costs a few claims, not one per waiting agent.
                    if not ctx.wakeup.known_empty(queues, body.free_slots):
                        look = ctx.wakeup.look(queues)
                        try:
                            leases = await ctx.db(claim)
                        except BaseException:
                            ctx.wakeup.cannot_lease(queues)
                            raise
                        # Pass the wake on to the polls that may take what this one left.
                        if leases == []:
                            ctx.wakeup.found_empty(look, body.free_slots)
                        elif leases is None:
                            ctx.wakeup.cannot_lease(queues)
                        else:
                            ctx.wakeup.leased(queues)
            look_now = True
            remaining = deadline - time.monotonic()
            if leases or remaining <= 0:
                return protocol.LeaseResponse(leases=with_execution_tokens(leases or []))
            # With LISTEN in place a new job wakes us; without it, look again on a timer.
            listening = ctx.wakeup.listening
            pause = remaining if listening else min(poll, remaining)
            try:
                await asyncio.wait_for(woken.wait(), pause)
            except TimeoutError:
                if listening and ctx.wakeup.listening and not woken.is_set():
                    # Every change that makes a job claimable notifies: not woken, nothing new.
                    # (Woken as the wait ended, it still looks: the wake is its to pass on.)
                    return protocol.LeaseResponse(leases=[])


def create_app(
    context_factory: Callable[[], PlaneContext] = _context_from_airflow,
    authorizer: Authorizer = airflow_authorizer,
    plane_url: Callable[[], str | None] = configured_plane_url,
) -> FastAPI:
    app = FastAPI(
        title="Tether agent API",
        version=tether.__version__,
        description="The protocol Tether agents speak to the plane (version 1).",
        openapi_url="/v1/openapi.json",
        docs_url="/v1/docs",
        redoc_url=None,
    )
    app.state.tether_context_factory = context_factory
    app.state.tether_context_lock = asyncio.Lock()
    app.state.tether_authorizer = authorizer
    app.state.tether_plane_url = plane_url

    app.add_middleware(RequestLog)

    def limit_for(path: str) -> int:
        if takes_large_bodies(path):
            context: PlaneContext | None = getattr(app.state, "tether", None)
            settings = context.store.settings if context is not None else PlaneSettings()
            return settings.max_parse_result_bytes
        if path.endswith("/logs"):
            return protocol.MAX_LOG_BATCH_BYTES
        return protocol.MAX_BODY_BYTES

    app.add_middleware(BodyLimit, limit_for=limit_for)

    @app.exception_handler(errors.PlaneError)
    async def plane_error(request: Request, exc: errors.PlaneError) -> JSONResponse:
        metrics.incr("refusals", reason=exc.reason)
        log.warning(
            "refused %s %s: %s [request_id=%s]",
            request.method,
            request.url.path,
            exc.detail,
            getattr(request.state, "request_id", "-"),
        )
        return _problem(exc.status_code, exc.detail, exc.reason)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.incr("refusals", reason="invalid_request")
        problems = []
        for err in exc.errors()[:5]:
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            problems.append(f"{where or 'body'}: {err.get('msg')}")
        return _problem(422, "invalid request: " + "; ".join(problems), "invalid_request")

    @app.get("/v1/health", response_model=protocol.Health, tags=["agent"])
    async def health(request: Request, x_tether_protocol: Annotated[str | None, Header()] = None) -> Any:
        revision = protocol.parse_revision(x_tether_protocol)
        if revision is None or not protocol.OLDEST_PROTOCOL <= revision <= protocol.PROTOCOL_VERSION:
            revision = protocol.PROTOCOL_VERSION
        # Read without making the plane's context: probes come before any agent call, and cost nothing.
        ctx: PlaneContext | None = getattr(request.app.state, "tether", None)
        listener = ctx.wakeup.state if ctx is not None else ListenerState.NOT_USED
        answer = protocol.Health(version=tether.__version__, protocol=revision, listener=listener)
        return written(answer, revision)

    @app.get("/v1/preflight", response_model=protocol.PreflightResponse, tags=["agent"])
    async def preflight(ctx: Ctx, identity: Identity, address: Address, revision: Revision) -> Any:
        answer = protocol.PreflightResponse(
            token_name=identity.name,
            address=address,
            protocol=revision,
            version=tether.__version__,
            heartbeat_interval=ctx.store.settings.heartbeat_interval.total_seconds(),
        )
        return written(answer, revision)

    @app.post("/v1/agents/register", response_model=protocol.RegisterResponse, tags=["agent"])
    async def register(body: protocol.RegisterRequest, ctx: Ctx, identity: Identity, revision: Revision) -> Any:
        agent = await ctx.db(functools.partial(ctx.store.register, identity, body, protocol=revision))
        settings = ctx.store.settings
        answer = protocol.RegisterResponse(
            agent_id=uuid.UUID(agent.id),
            heartbeat_interval=settings.heartbeat_interval.total_seconds(),
            lease_wait=settings.lease_wait.total_seconds(),
            cordoned=agent.cordoned,
            poll_heartbeat_window=window.total_seconds() if (window := settings.poll_heartbeat_window) else None,
        )
        return written(answer, revision)

    @app.post("/v1/agents/{agent_id}/heartbeat", response_model=protocol.HeartbeatResponse, tags=["agent"])
    async def heartbeat(
        agent_id: uuid.UUID, body: protocol.HeartbeatRequest, ctx: Ctx, identity: Identity, revision: Revision
    ) -> Any:
        return written(await ctx.db(ctx.store.heartbeat, identity, str(agent_id), body), revision)

    @app.post("/v1/agents/{agent_id}/lease", response_model=protocol.LeaseResponse, tags=["agent"])
    async def lease(
        agent_id: uuid.UUID, body: protocol.LeaseRequest, ctx: Ctx, identity: WorkerIdentity, revision: Revision
    ) -> Any:
        return written(await _lease(ctx, identity, agent_id, body), revision)

    @app.post("/v1/agents/{agent_id}/jobs/{job_id}/start", response_model=protocol.StartResponse, tags=["agent"])
    async def start(
        agent_id: uuid.UUID,
        job_id: uuid.UUID,
        body: protocol.StartRequest,
        ctx: Ctx,
        identity: WorkerIdentity,
        revision: Revision,
    ) -> Any:
        return written(await ctx.db(ctx.store.start, identity, str(agent_id), str(job_id), body), revision)

    @app.post("/v1/agents/{agent_id}/jobs/start", response_model=protocol.StartManyResponse, tags=["agent"])
    async def start_many(
        agent_id: uuid.UUID, body: protocol.StartManyRequest, ctx: Ctx, identity: WorkerIdentity, revision: Revision
    ) -> Any:
        return written(await ctx.db(ctx.store.start_many, identity, str(agent_id), body), revision)

    @app.post("/v1/agents/{agent_id}/jobs/{job_id}/report", response_model=protocol.ReportResponse, tags=["agent"])
    async def report(
        agent_id: uuid.UUID,
        job_id: uuid.UUID,
        body: protocol.ReportRequest,
        ctx: Ctx,
        identity: WorkerIdentity,
        revision: Revision,
    ) -> Any:
        return written(await ctx.db(ctx.store.report, identity, str(agent_id), str(job_id), body), revision)

    @app.post("/v1/agents/{agent_id}/jobs/{job_id}/logs", response_model=protocol.LogBatchResponse, tags=["agent"])
    async def task_log(
        agent_id: uuid.UUID,
        job_id: uuid.UUID,
        body: protocol.LogBatch,
        ctx: Ctx,
        identity: WorkerIdentity,
        revision: Revision,
    ) -> Any:
        return written(await ctx.db(ctx.store.append_log, identity, str(agent_id), str(job_id), body), revision)

    @app.post("/v1/agents/{agent_id}/logs", response_model=protocol.JobLogBatchesResponse, tags=["agent"])
    async def task_logs(
        agent_id: uuid.UUID, body: protocol.JobLogBatches, ctx: Ctx, identity: WorkerIdentity, revision: Revision
    ) -> Any:
        return written(await ctx.db(ctx.store.append_logs, identity, str(agent_id), body), revision)

    app.include_router(dag_processing_router())
    app.include_router(triggerer_router())

    @app.post("/v1/sentinel/report", response_model=protocol.SentinelReportResponse, tags=["sentinel"])
    async def sentinel_report(
        body: protocol.SentinelReport, ctx: Ctx, identity: SentinelIdentity, revision: Revision
    ) -> Any:
        return written(await ctx.db(ctx.store.save_sentinel_report, identity, body), revision)

    app.include_router(demand_router())
    app.include_router(admin_router())
    app.include_router(ui_router())
    app.mount("/ui/static", ui_static(), name="tether_ui_static")
    return app
