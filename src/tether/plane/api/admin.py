"""Admin REST API: agent tokens, agents and allowed IP ranges.

Protected by Airflow's own auth manager: the caller must be allowed to change
the deployment's configuration (reads need configuration read access). Every
change is written to the audit log with the user's name.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, status
from starlette.concurrency import run_in_threadpool

from tether import errors
from tether.plane.api.deps import Ctx, PlaneContext
from tether.plane.expiry import parse_expiry
from tether.plane.store import utcnow
from tether.plane.store.agents import RangeChange
from tether.plane.views import (
    AgentAction,
    AgentOut,
    AuditOut,
    IpRangeOut,
    IpRanges,
    IpRangesOut,
    SentinelOut,
    TokenCreate,
    TokenCreated,
    TokenOut,
    TokenUpdate,
)

Method = Literal["GET", "POST", "PUT", "DELETE"]
#: Resolves the calling user and checks their access; returns the user's name.
Authorizer = Callable[[Request, Method], Awaitable[str]]


async def airflow_authorizer(request: Request, method: Method) -> str:
    """Authenticate with Airflow's auth manager (bearer JWT or the UI's cookie)."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.core_api.security import get_user
    from fastapi.security import HTTPAuthorizationCredentials
    from fastapi.security.utils import get_authorization_scheme_param

    scheme, credentials = get_authorization_scheme_param(request.headers.get("Authorization"))
    bearer = HTTPAuthorizationCredentials(scheme=scheme, credentials=credentials) if scheme else None
    try:
        user = await get_user(request, None, bearer)
    except Exception as exc:
        detail = getattr(exc, "detail", "not authenticated")
        raise errors.Unauthorized(f"log in to Airflow first: {detail}", reason="not_authenticated") from None
    if not get_auth_manager().is_authorized_configuration(method=method, user=user):
        raise errors.Forbidden(
            f"user {user.get_name()!r} may not {'read' if method == 'GET' else 'change'} Tether's settings; "
            "it needs Airflow's configuration access (an admin)",
            reason="forbidden",
        )
    return user.get_name()


def _actor(method: Method) -> Callable[[Request], Awaitable[str]]:
    async def dependency(request: Request) -> str:
        authorize: Authorizer = request.app.state.tether_authorizer
        return await authorize(request, method)

    return dependency


Reader = Annotated[str, Depends(_actor("GET"))]
Creator = Annotated[str, Depends(_actor("POST"))]
Changer = Annotated[str, Depends(_actor("PUT"))]
Deleter = Annotated[str, Depends(_actor("DELETE"))]


def _expiry(text: str, now: datetime) -> datetime | None:
    try:
        return parse_expiry(text, now)
    except ValueError as exc:
        raise errors.Invalid(str(exc), reason="invalid_expiry") from None


def admin_router() -> APIRouter:
    router = APIRouter(tags=["admin"])

    # -- tokens -------------------------------------------------------------------

    @router.get("/v1/tokens", response_model=list[TokenOut])
    async def list_tokens(ctx: Ctx, _user: Reader) -> list[TokenOut]:
        now = utcnow()
        return [TokenOut.from_row(row, now) for row in await run_in_threadpool(ctx.store.list_tokens)]

    @router.post("/v1/tokens", response_model=TokenCreated, status_code=status.HTTP_201_CREATED)
    async def create_token(body: TokenCreate, ctx: Ctx, user: Creator) -> TokenCreated:
        now = utcnow()
        expires_at = _expiry(body.expires, now) if body.expires is not None else None
        if body.expires_in_days:
            expires_at = now + timedelta(days=body.expires_in_days)
        issued, row = await run_in_threadpool(
            lambda: ctx.store.create_token(
                name=body.name,
                description=body.description,
                expires_at=expires_at,
                scopes=body.scopes,
                bundles=body.bundles,
                created_by=user,
                now=now,
            )
        )
        out = TokenOut.from_row(row, utcnow())
        return TokenCreated(**out.model_dump(), secret=issued.text)

    @router.patch("/v1/tokens/{token_id}", response_model=TokenOut)
    async def update_token(token_id: str, body: TokenUpdate, ctx: Ctx, user: Changer) -> TokenOut:
        """Change when a token expires (sooner, later, never) or its description; audited."""
        now = utcnow()
        changes: dict[str, Any] = {}
        if body.expires is not None:
            changes["expires_at"] = _expiry(body.expires, now)
        if body.description is not None:
            changes["description"] = body.description
        row = await run_in_threadpool(lambda: ctx.store.update_token(token_id, changed_by=user, now=now, **changes))
        ctx.tokens.clear()
        return TokenOut.from_row(row, utcnow())

    @router.get("/v1/tokens/{token_id}", response_model=TokenOut)
    async def show_token(token_id: str, ctx: Ctx, _user: Reader) -> TokenOut:
        return TokenOut.from_row(await run_in_threadpool(ctx.store.get_token, token_id), utcnow())

    @router.post("/v1/tokens/{token_id}/revoke", response_model=TokenOut)
    async def revoke_token(token_id: str, ctx: Ctx, user: Changer) -> TokenOut:
        row = await run_in_threadpool(lambda: ctx.store.revoke_token(token_id, revoked_by=user))
        ctx.tokens.clear()
        return TokenOut.from_row(row, utcnow())

    # -- agents -------------------------------------------------------------------

    @router.get("/v1/agents", response_model=list[AgentOut])
    async def list_agents(ctx: Ctx, _user: Reader) -> list[AgentOut]:
        return [v for v in await run_in_threadpool(ctx.store.agent_views)]

    @router.get("/v1/sentinels", response_model=list[SentinelOut])
    async def list_sentinels(ctx: Ctx, _user: Reader) -> list[SentinelOut]:
        """Each namespace's latest sentinel report: its agent pods and whether its backends answer."""
        return await ctx.db(ctx.store.sentinel_views)

    @router.get("/v1/agents/{agent_id}", response_model=AgentOut)
    async def show_agent(agent_id: str, ctx: Ctx, _user: Reader) -> AgentOut:
        return await run_in_threadpool(ctx.store.agent_view, agent_id)

    @router.post("/v1/agents/{agent_id}/action", response_model=AgentOut)
    async def agent_action(agent_id: str, body: AgentAction, ctx: Ctx, user: Changer) -> AgentOut:
        if body.action == "CORDON":
            view = await run_in_threadpool(lambda: ctx.store.cordon(agent_id, reason=body.reason, actor=user))
        else:
            view = await run_in_threadpool(lambda: ctx.store.uncordon(agent_id, actor=user))
        return view

    @router.delete("/v1/agents/{agent_id}", response_model=AgentOut)
    async def delete_agent(agent_id: str, ctx: Ctx, user: Deleter) -> AgentOut:
        return await run_in_threadpool(lambda: ctx.store.delete_agent(agent_id, actor=user))

    # -- allowed IP ranges ----------------------------------------------------------

    async def _ranges(ctx: PlaneContext) -> IpRangesOut:
        rows = await run_in_threadpool(ctx.store.allowed_ranges)
        return IpRangesOut(ranges=[IpRangeOut.from_row(r) for r in rows], enforced=bool(rows))

    @router.get("/v1/allowed-ip-ranges", response_model=IpRangesOut)
    async def list_ranges(ctx: Ctx, _user: Reader) -> IpRangesOut:
        return await _ranges(ctx)

    async def _change(ctx: PlaneContext, cidrs: list[str], user: str, mode: RangeChange) -> IpRangesOut:
        await run_in_threadpool(lambda: ctx.store.set_allowed_ranges(cidrs, actor=user, mode=mode))
        ctx.ranges.clear()
        return await _ranges(ctx)

    @router.put("/v1/allowed-ip-ranges", response_model=IpRangesOut)
    async def set_ranges(body: IpRanges, ctx: Ctx, user: Changer) -> IpRangesOut:
        return await _change(ctx, body.ranges, user, "set")

    @router.post("/v1/allowed-ip-ranges", response_model=IpRangesOut)
    async def add_ranges(body: IpRanges, ctx: Ctx, user: Creator) -> IpRangesOut:
        return await _change(ctx, body.ranges, user, "add")

    @router.delete("/v1/allowed-ip-ranges/{cidr:path}", response_model=IpRangesOut)
    async def remove_range(cidr: str, ctx: Ctx, user: Deleter) -> IpRangesOut:
        return await _change(ctx, [cidr], user, "remove")

    # -- audit ------------------------------------------------------------------------

    @router.get("/v1/audit", response_model=list[AuditOut])
    async def audit(
        ctx: Ctx,
        _user: Reader,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        # No NUL character: the database refuses one in a string, and the call must fail with 422, not 500.
        target_type: Annotated[str | None, Query(max_length=32, pattern="^[^\x00]*$")] = None,
        target_id: Annotated[str | None, Query(max_length=256, pattern="^[^\x00]*$")] = None,
    ) -> list[AuditOut]:
        rows = await run_in_threadpool(
            lambda: ctx.store.audit_log(limit=limit, target_type=target_type, target_id=target_id)
        )
        return [AuditOut.from_row(r) for r in rows]

    return router
