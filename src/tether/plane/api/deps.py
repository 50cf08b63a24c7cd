"""What every route depends on: the plane's context, token authentication, the IP gate."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

from anyio import CapacityLimiter, to_thread
from fastapi import Depends, Header, Request
from starlette.concurrency import run_in_threadpool

from tether import errors, protocol
from tether.plane.api.wakeup import Wakeup
from tether.plane.netaccess import Network, allowed, client_address
from tether.plane.store import Store, TokenIdentity

#: Database calls the agent API makes at once, each in a worker thread with a connection of
#: its own: the size of its connection pool (``app.agent_api_session_factory``), so no call
#: waits for a connection while holding a thread, and none is opened and closed per call.
DB_THREADS = 32
#: Of those, what lease claims may hold: they come in bursts and must leave room for heartbeats.
CLAIM_THREADS = 8

T = TypeVar("T")


@dataclass
class TokenCache:
    """Accepted tokens, trusted for ``ttl`` seconds so a revocation bites within that time."""

    ttl: float
    entries: dict[str, tuple[float, TokenIdentity]] = field(default_factory=dict)
    _loading: dict[str, asyncio.Future[TokenIdentity]] = field(default_factory=dict)

    def get(self, text: str) -> TokenIdentity | None:
        hit = self.entries.get(text)
        if hit is None or time.monotonic() - hit[0] > self.ttl:
            self.entries.pop(text, None)
            return None
        return hit[1]

    def put(self, text: str, identity: TokenIdentity) -> None:
        if len(self.entries) > 10_000:
            self.entries.clear()
        self.entries[text] = (time.monotonic(), identity)

    async def lookup(self, text: str, load: Callable[[], Awaitable[TokenIdentity]]) -> TokenIdentity:
        """The cached identity, or ``load``'s - one load per token at a time.

        A fleet shares a handful of tokens: when one's entry runs out, every agent
        call in flight at that moment misses together, and each would look the
        token up again. They wait for the first one's answer instead (a refusal too).
        """
        cached = self.get(text)
        if cached is not None:
            return cached
        pending = self._loading.get(text)
        if pending is None:
            pending = asyncio.ensure_future(load())
            self._loading[text] = pending
            pending.add_done_callback(lambda done: self._loaded(text, done))
        return await asyncio.shield(pending)

    def _loaded(self, text: str, done: asyncio.Future[TokenIdentity]) -> None:
        self._loading.pop(text, None)
        if not done.cancelled() and done.exception() is None:
            self.put(text, done.result())


@dataclass
class RangeCache:
    """The allowed IP ranges, re-read at most every ``ttl`` seconds (and at once after a change here)."""

    ttl: float
    load: Callable[[], list[Network]]
    _value: list[Network] = field(default_factory=list)
    _loaded_at: float | None = None

    def get(self) -> list[Network]:
        if self._loaded_at is None or time.monotonic() - self._loaded_at > self.ttl:
            self._value = self.load()
            self._loaded_at = time.monotonic()
        return self._value

    def fresh(self) -> list[Network] | None:
        """The ranges if they need no reload; the caller then avoids a trip to a worker thread."""
        if self._loaded_at is None or time.monotonic() - self._loaded_at > self.ttl:
            return None
        return self._value

    def invalidate(self) -> None:
        self._loaded_at = None


@dataclass
class PlaneContext:
    store: Store
    wakeup: Wakeup
    tokens: TokenCache
    ranges: RangeCache
    listen_dsn: str | None = None
    _claim_limiter: CapacityLimiter | None = None
    _db_limiter: CapacityLimiter | None = None

    def claim_limiter(self) -> CapacityLimiter:
        """Threads that lease claims may hold at once (made on the event loop, at first use).

        Claims come in bursts - every waiting agent looks when a job is queued - and
        must not take every worker thread and database connection from heartbeats,
        which then arrive late and make healthy agents look dead.
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
            wakeup=Wakeup(),
            tokens=TokenCache(ttl=ttl),
            ranges=RangeCache(ttl=ttl, load=store.allowed_networks),
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
    ranges = ctx.ranges.fresh()
    if ranges is None:
        ranges = await ctx.db(ctx.ranges.get)
    if not allowed(address, ranges):
        raise errors.Forbidden(
            f"agent calls from {address} are not allowed: the address is outside the plane's allowed IP ranges",
            reason="address_not_allowed",
        )
    return address


async def authenticated(
    ctx: Annotated[PlaneContext, Depends(context)],
    _address: Annotated[str, Depends(address_allowed)],
    authorization: Annotated[str | None, Header()] = None,
    x_tether_protocol: Annotated[str | None, Header()] = None,
) -> TokenIdentity:
    if x_tether_protocol is not None and x_tether_protocol.strip() != str(protocol.PROTOCOL_VERSION):
        raise errors.Invalid(
            f"this plane speaks protocol {protocol.PROTOCOL_VERSION}, the agent sent {x_tether_protocol[:16]!r}",
            reason="protocol_mismatch",
        )
    if not authorization or not authorization.lower().startswith("bearer "):
        raise errors.Unauthorized("an agent token is required (Authorization: Bearer ...)", reason="no_token")
    text = authorization[7:].strip()
    return await ctx.tokens.lookup(text, lambda: ctx.db(ctx.store.authenticate, text))


Ctx = Annotated[PlaneContext, Depends(context)]
Identity = Annotated[TokenIdentity, Depends(authenticated)]
Address = Annotated[str, Depends(address_allowed)]
