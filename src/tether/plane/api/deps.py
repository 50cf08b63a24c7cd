"""What every route depends on: the plane's context, token authentication, the IP gate."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Generic, TypeVar

from anyio import CapacityLimiter, to_thread
from fastapi import Depends, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

import tether
from tether import errors, protocol
from tether.plane.api.wakeup import Wakeup
from tether.plane.netaccess import Network, allowed, client_address
from tether.plane.store import Store, TokenIdentity
from tether.plane.store.tokens import LAST_USED_EVERY

#: Database calls the agent API makes at once, each in a worker thread with a connection of
#: its own: the size of its connection pool (``app.agent_api_session_factory``), so no call
#: waits for a connection while holding a thread, and none is opened and closed per call.
DB_THREADS = 32
#: Seconds a reading of the queues' demand is shared by every caller (``api.demand``).
DEMAND_TTL = 2.0
#: Seconds an accepted token is kept while no token changes (``TokenCache``). Every change to a
#: token moves the epoch, which drops every entry within ``token_cache_ttl``: this only bounds how
#: long a change made around the store (an edit of the table by hand) may go unseen.
TOKEN_KEEP = 3600.0
#: Of those, what lease claims may hold: they come in bursts and must leave room for heartbeats.
CLAIM_THREADS = 8

log = logging.getLogger(__name__)

T = TypeVar("T")
K = TypeVar("K")


class SharedLoads(Generic[K, T]):
    """Values by key, each trusted for ``ttl`` seconds, loaded once at a time and refreshed ahead of need.

    A value is trusted from the moment its load began. In the second half of its
    time the first call to see it starts one load in the background and every call
    goes on using it; only a value past its time (or none) makes callers wait -
    all of them for the same one load. With steady traffic nobody waits: a fleet's
    calls no longer pile up behind a reload every ``ttl`` seconds. A load that
    fails (a refused token) drops the value, and the calls waiting on it get the
    failure; the next call loads again.
    """

    def __init__(self, ttl: float, *, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._values: dict[K, tuple[float, T]] = {}
        self._loading: dict[K, asyncio.Future[T]] = {}
        #: Raised by ``clear``: a load begun before it must not put back what it removed.
        self._generation = 0

    async def get(self, key: K, load: Callable[[], Awaitable[T]]) -> T:
        held = self._values.get(key)
        if held is not None:
            age = time.monotonic() - held[0]
            if age <= self.ttl:
                if age > self.ttl / 2:
                    self._load(key, load)
                return held[1]
        return await asyncio.shield(self._load(key, load))

    def clear(self) -> None:
        self._values.clear()
        self._generation += 1

    def forget(self, key: K) -> None:
        """Drop one value: the next call loads it again."""
        self._values.pop(key, None)

    def _load(self, key: K, load: Callable[[], Awaitable[T]]) -> asyncio.Future[T]:
        pending = self._loading.get(key)
        if pending is None:
            began, generation = time.monotonic(), self._generation
            pending = asyncio.ensure_future(load())
            self._loading[key] = pending
            pending.add_done_callback(lambda done: self._loaded(key, done, began, generation))
        return pending

    def _loaded(self, key: K, done: asyncio.Future[T], began: float, generation: int) -> None:
        self._loading.pop(key, None)
        if done.cancelled() or done.exception() is not None:
            self._values.pop(key, None)
        elif generation == self._generation:
            if len(self._values) >= self.max_entries:
                self._values.clear()
            self._values[key] = (began, done.result())


class TokenCache(SharedLoads[str, TokenIdentity]):
    """Accepted tokens: each kept for ``TOKEN_KEEP`` seconds while no token changes, checked every ``ttl``.

    Every ``ttl`` seconds one call reads the store's token epoch (``Store.token_epoch``),
    which moves with every change to a token; a new reading drops every entry. So a
    revoked or shortened token is refused within ``ttl`` of the change (counted from
    when the reading began), as when each entry was trusted for ``ttl`` alone, while a
    fleet whose agents each hold a token of their own costs one look-up per token, not
    one per call. Each token is looked up once at a time, by one call; a token that
    expires is looked up again (and refused) from that moment.

    A token's ``last_used_at`` is not written by its look-ups, which are rare now:
    ``note_use`` collects the tokens accepted, and one write a minute records them all.
    """

    def __init__(self, ttl: float, *, keep: float = 0.0, used_every: float = LAST_USED_EVERY.total_seconds()) -> None:
        # A ttl of 0 keeps nothing: every call looks its token up.
        super().__init__(max(ttl, keep) if ttl > 0 else 0.0)
        self._epochs: SharedLoads[None, int] = SharedLoads(ttl)
        self._epoch: int | None = None
        self._used: set[str] = set()
        self._used_every = used_every
        self._used_since = time.monotonic()
        self._writing: asyncio.Future[None] | None = None

    async def identity(
        self, text: str, load: Callable[[], Awaitable[TokenIdentity]], epoch: Callable[[], Awaitable[int]]
    ) -> TokenIdentity:
        current = await self._epochs.get(None, epoch)
        if current != self._epoch:
            if self._epoch is not None:
                self.clear()
            self._epoch = current
        identity = await self.get(text, load)
        if identity.expires_at is not None and identity.expires_at <= datetime.now(UTC):
            self.forget(text)
            identity = await self.get(text, load)
        return identity

    def note_use(self, token_id: str, write: Callable[[list[str]], Awaitable[object]]) -> None:
        """Count the token as used now; once ``used_every`` seconds have passed, write every token counted since.

        One write at a time, in the background: no call waits for it. A write that fails
        leaves its tokens counted for the next one.
        """
        self._used.add(token_id)
        if self._writing is not None or time.monotonic() - self._used_since < self._used_every:
            return
        used, self._used = sorted(self._used), set()
        self._used_since = time.monotonic()
        self._writing = asyncio.ensure_future(self._write_used(used, write))

    async def _write_used(self, used: list[str], write: Callable[[list[str]], Awaitable[object]]) -> None:
        try:
            await write(used)
        except Exception as exc:
            log.warning("Could not record when %d agent tokens were last used (tried again later): %s", len(used), exc)
            self._used.update(used)
        finally:
            self._writing = None


class RangeCache(SharedLoads[None, list[Network]]):
    """The allowed IP ranges, read at most once every ``ttl`` seconds (and at once after a change here)."""

    async def current(self, load: Callable[[], Awaitable[list[Network]]]) -> list[Network]:
        return await self.get(None, load)


@dataclass
class PlaneContext:
    store: Store
    wakeup: Wakeup
    tokens: TokenCache
    ranges: RangeCache
    listen_dsn: str | None = None
    #: The latest reading of every queue's load, shared by all demand callers for ``DEMAND_TTL``.
    demand: SharedLoads[None, Any] = field(default_factory=lambda: SharedLoads(DEMAND_TTL))
    _claim_limiter: CapacityLimiter | None = None
    _db_limiter: CapacityLimiter | None = None

    def claim_limiter(self) -> CapacityLimiter:
        """Threads that lease claims may hold at once (made on the event loop, at first use).

        Claims come in bursts - a burst of jobs wakes more polls at each round, and
        polls that arrive after it look at once - and must not take every worker
        thread and database connection from heartbeats, which then arrive late and
        make healthy agents look dead.
        """
        if self._claim_limiter is None:
            self._claim_limiter = CapacityLimiter(CLAIM_THREADS)
        return self._claim_limiter

    def db_limiter(self) -> CapacityLimiter:
        if self._db_limiter is None:
            self._db_limiter = CapacityLimiter(DB_THREADS)
        return self._db_limiter

    async def db(self, call: Callable[..., T], *args: Any) -> T:
        """Run a store call in a worker thread, at most ``DB_THREADS`` at once."""
        return await to_thread.run_sync(call, *args, limiter=self.db_limiter())

    @classmethod
    def for_store(cls, store: Store, *, listen_dsn: str | None = None) -> PlaneContext:
        ttl = store.settings.token_cache_ttl.total_seconds()
        return cls(
            store=store,
            wakeup=Wakeup(probe=store.send_notification),
            tokens=TokenCache(ttl, keep=TOKEN_KEEP),
            ranges=RangeCache(ttl),
            listen_dsn=listen_dsn,
        )


async def context(request: Request) -> PlaneContext:
    """The plane's store and helpers, made on first use (mounted apps get no lifespan)."""
    state = request.app.state
    if getattr(state, "tether", None) is None:
        async with state.tether_context_lock:
            if getattr(state, "tether", None) is None:
                state.tether = await run_in_threadpool(state.tether_context_factory)
    ctx: PlaneContext = state.tether
    return ctx


async def address_allowed(request: Request, ctx: Annotated[PlaneContext, Depends(context)]) -> str:
    """Refuse agent calls from outside the allowed IP ranges, naming the address seen."""
    address = client_address(
        request.client.host if request.client else None,
        request.headers.get("X-Forwarded-For"),
        ctx.store.settings.trusted_proxies,
    )
    ranges = await ctx.ranges.current(lambda: ctx.db(ctx.store.allowed_networks))
    if not allowed(address, ranges):
        raise errors.Forbidden(
            f"agent calls from {address} are not allowed: the address is outside the plane's allowed IP ranges",
            reason="address_not_allowed",
        )
    return address


def agent_release(version_header: str | None, user_agent: str | None) -> str:
    """The caller's Tether version, as it says: ``X-Tether-Version``, else its ``User-Agent`` (Tether 0.1)."""
    if version_header:
        return version_header.strip()[:32]
    if user_agent and user_agent.startswith("tether-agent/"):
        return user_agent.removeprefix("tether-agent/").split()[0][:32]
    return "unknown"


async def speaks(
    x_tether_protocol: Annotated[str | None, Header()] = None,
    x_tether_version: Annotated[str | None, Header()] = None,
    user_agent: Annotated[str | None, Header()] = None,
) -> int:
    """The protocol revision of an agent call, refused when this plane does not serve it (ADR 5)."""
    revision = protocol.parse_revision(x_tether_protocol)
    window = (
        f"this plane runs Tether {tether.__version__} and serves agents of protocol "
        f"{protocol.OLDEST_PROTOCOL} to {protocol.PROTOCOL_VERSION} "
        f"(Tether {protocol.release_of(protocol.OLDEST_PROTOCOL)} and newer)"
    )
    if revision is None:
        raise errors.VersionRefused(
            f"send the protocol revision in {protocol.PROTOCOL_HEADER}; {window}", reason="protocol_missing"
        )
    agent = f"the agent runs Tether {agent_release(x_tether_version, user_agent)} (protocol {revision})"
    if revision > protocol.PROTOCOL_VERSION:
        raise errors.VersionRefused(
            f"{window}; {agent}, which is newer: upgrade the plane first", reason="agent_too_new"
        )
    if revision < protocol.OLDEST_PROTOCOL:
        raise errors.VersionRefused(
            f"{window}; {agent}: upgrade the agent to Tether {protocol.release_of(protocol.OLDEST_PROTOCOL)} or newer",
            reason="agent_too_old",
        )
    return revision


async def authenticated(
    ctx: Annotated[PlaneContext, Depends(context)],
    _address: Annotated[str, Depends(address_allowed)],
    _revision: Annotated[int, Depends(speaks)],
    authorization: Annotated[str | None, Header()] = None,
) -> TokenIdentity:
    return await token_of(ctx, authorization)


async def token_only(
    ctx: Annotated[PlaneContext, Depends(context)],
    _address: Annotated[str, Depends(address_allowed)],
    authorization: Annotated[str | None, Header()] = None,
) -> TokenIdentity:
    """The caller's token, for read-only routes that tools other than agents call: no revision header asked for.

    Autoscalers (KEDA's metrics-api scaler) send a bearer token and nothing else.
    """
    return await token_of(ctx, authorization)


async def token_of(ctx: PlaneContext, authorization: str | None) -> TokenIdentity:
    if not authorization or not authorization.lower().startswith("bearer "):
        raise errors.Unauthorized("an agent token is required (Authorization: Bearer ...)", reason="no_token")
    text = authorization[7:].strip()
    identity = await ctx.tokens.identity(
        text, lambda: ctx.db(ctx.store.authenticate, text), lambda: ctx.db(ctx.store.token_epoch)
    )
    ctx.tokens.note_use(identity.id, lambda used: ctx.db(ctx.store.mark_tokens_used, used))
    return identity


def written(answer: BaseModel, revision: int) -> Any:
    """The answer in the caller's revision: as it is for this one, without later fields for older ones."""
    if revision >= protocol.PROTOCOL_VERSION:
        return answer
    return JSONResponse(protocol.written_for(answer, revision))


def scoped(scope: protocol.TokenScope) -> Callable[[TokenIdentity], Awaitable[TokenIdentity]]:
    """A dependency: the caller's token, refused (403 ``scope_missing``) unless it has ``scope``."""

    async def check(identity: Annotated[TokenIdentity, Depends(authenticated)]) -> TokenIdentity:
        identity.require(scope.value)
        return identity

    return check


Ctx = Annotated[PlaneContext, Depends(context)]
Identity = Annotated[TokenIdentity, Depends(authenticated)]
#: An agent token of any scope, from a caller that need not name a protocol revision (read-only routes).
ReaderIdentity = Annotated[TokenIdentity, Depends(token_only)]
#: The caller's token, which may serve the role of the route.
WorkerIdentity = Annotated[TokenIdentity, Depends(scoped(protocol.TokenScope.WORKER))]
DagProcessorIdentity = Annotated[TokenIdentity, Depends(scoped(protocol.TokenScope.DAG_PROCESSOR))]
TriggererIdentity = Annotated[TokenIdentity, Depends(scoped(protocol.TokenScope.TRIGGERER))]
SentinelIdentity = Annotated[TokenIdentity, Depends(scoped(protocol.TokenScope.SENTINEL))]
#: The caller's protocol revision, checked: answers are written in it.
Revision = Annotated[int, Depends(speaks)]
Address = Annotated[str, Depends(address_allowed)]
