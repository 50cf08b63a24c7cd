"""Admin REST API: agent tokens, agents and allowed IP ranges.

Protected by Airflow's own auth manager: the caller must be allowed to change
the deployment's configuration (reads need configuration read access). Every
change is written to the audit log with the user's name.

The Remote Agents pages in Airflow's UI call this same API with the browser's
session cookie, so a change carried by that cookie alone must come from a page
of this server, as JSON (``refuse_cross_origin``): another site's page can make
a browser send the cookie, but not those headers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Query, Request, status
from starlette.concurrency import run_in_threadpool

from tether import errors
from tether.plane.api.deps import Ctx, PlaneContext
from tether.plane.expiry import parse_expiry
from tether.plane.store import utcnow
from tether.plane.store.agents import RangeChange
from tether.plane.values import DEFAULT_SLOTS, DEFAULT_TOKEN_SECRET_NAME, agent_values, helm_install_command
from tether.plane.views import (
    AgentAction,
    AgentOut,
    AgentValuesOut,
    AuditOut,
    IpRangeOut,
    IpRanges,
    IpRangesOut,
    MissingValueOut,
    SentinelOut,
    TokenCreate,
    TokenCreated,
    TokenOut,
    TokenUpdate,
    TryOut,
    UserOut,
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


#: The cookie Airflow's UI keeps its user's session in (the auth manager's ``COOKIE_NAME_JWT_TOKEN``).
SESSION_COOKIE = "_token"


def refuse_cross_origin(request: Request, plane_url: str | None = None) -> None:
    """Refuse a change that only the browser's session cookie authenticates, unless a page of this server sent it.

    A call with an ``Authorization`` header (the CLI, scripts, the REST API's users) carries
    its own credential and is not a browser's ambient one. A call with the cookie alone must
    be JSON and come from this origin: ``Sec-Fetch-Site: same-origin`` where the browser
    sends it (no page can forge it), else an ``Origin`` naming this server - as the request
    reached it (``Host``, ``X-Forwarded-Host``) or as Airflow knows it (``plane_url``, its
    ``[api] base_url``). A form or a plain ``fetch`` from another site can be neither
    without the server's consent (CORS).
    """
    if request.headers.get("authorization") or SESSION_COOKIE not in request.cookies:
        return
    site = request.headers.get("sec-fetch-site")
    if site is not None and site != "same-origin":
        raise errors.Forbidden(
            f"refused a change sent from another site (Sec-Fetch-Site: {site}): use the Remote Agents pages "
            "of this Airflow, or call the API with a bearer token",
            reason="cross_origin",
        )
    origin = request.headers.get("origin")
    if site is None and origin is not None:
        hosts = {request.headers.get("host"), request.headers.get("x-forwarded-host")}
        if plane_url:
            hosts.add(urlsplit(plane_url).netloc)
        if urlsplit(origin).netloc not in hosts - {None, ""}:
            raise errors.Forbidden(
                f"refused a change sent from another origin ({origin}): use the Remote Agents pages of this "
                "Airflow, or call the API with a bearer token",
                reason="cross_origin",
            )
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise errors.Invalid(
            f"a change sent with the session cookie must be JSON (Content-Type: application/json), "
            f"not {content_type or 'no content type'}",
            reason="cross_origin",
        )


def _actor(method: Method) -> Callable[[Request], Awaitable[str]]:
    async def dependency(request: Request) -> str:
        if method != "GET":
            refuse_cross_origin(request, request.app.state.tether_plane_url())
        authorize: Authorizer = request.app.state.tether_authorizer
        return await authorize(request, method)

    return dependency


async def may_change(request: Request) -> bool:
    """Whether the (already authenticated) caller may change Tether's settings, as the API would decide."""
    authorize: Authorizer = request.app.state.tether_authorizer
    try:
        await authorize(request, "PUT")
    except errors.Forbidden:
        return False
    return True


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

    # -- what the Remote Agents pages read -------------------------------------------

    @router.get("/v1/me", response_model=UserOut)
    async def me(request: Request, user: Reader) -> UserOut:
        """Who is calling, and whether they may change anything (the pages show the rest read-only)."""
        return UserOut(name=user, may_change=await may_change(request))

    @router.get("/v1/tries-in-flight", response_model=list[TryOut])
    async def tries_in_flight(ctx: Ctx, _user: Reader) -> list[TryOut]:
        """The task tries agents hold now: leased to them or running there."""
        return await run_in_threadpool(ctx.store.tries_in_flight)

    @router.get("/v1/task-tries", response_model=list[TryOut])
    async def task_tries(
        ctx: Ctx,
        _user: Reader,
        dag_id: Annotated[str, Query(min_length=1, max_length=250)],
        run_id: Annotated[str, Query(min_length=1, max_length=250)],
        task_id: Annotated[str, Query(min_length=1, max_length=250)],
        map_index: Annotated[int, Query(ge=-1)] = -1,
    ) -> list[TryOut]:
        """Each try of one task instance: which agent ran it, its lease, start and report times."""
        return await run_in_threadpool(
            lambda: ctx.store.task_tries(dag_id=dag_id, run_id=run_id, task_id=task_id, map_index=map_index)
        )

    @router.get("/v1/agent-values", response_model=AgentValuesOut)
    async def values_file(
        request: Request,
        _user: Reader,
        namespace: Annotated[str, Query(max_length=253)] = "tether-agents",
        queues: Annotated[str, Query(max_length=4096, description="Comma-separated")] = "default",
        slots: Annotated[int, Query(ge=1, le=10_000)] = DEFAULT_SLOTS,
        agent_token_secret_name: Annotated[str, Query(max_length=253)] = DEFAULT_TOKEN_SECRET_NAME,
        resource_name_prefix: Annotated[str, Query(max_length=64)] = "",
        secret_backend: Annotated[str, Query(max_length=512)] = "",
        xcom_backend: Annotated[str, Query(max_length=512)] = "",
    ) -> AgentValuesOut:
        """The values.yaml ``airflow tether agents values`` prints for the same choices."""
        plane_url: str | None = request.app.state.tether_plane_url()
        values = agent_values(
            plane_url=plane_url,
            namespace=namespace,
            queues=queues.split(","),
            slots=slots,
            agent_token_secret_name=agent_token_secret_name,
            resource_name_prefix=resource_name_prefix,
            secret_backend=secret_backend.strip(),
            xcom_backend=xcom_backend.strip(),
        )
        return AgentValuesOut(
            text=values.text,
            missing=[MissingValueOut(name=m.name, hint=m.hint) for m in values.missing],
            warnings=list(values.warnings),
            helm_install=helm_install_command(namespace),
        )

    # -- audit ------------------------------------------------------------------------

    @router.get("/v1/audit", response_model=list[AuditOut])
    async def audit(
        ctx: Ctx,
        _user: Reader,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        target_type: Annotated[str | None, Query(max_length=32)] = None,
        target_id: Annotated[str | None, Query(max_length=256)] = None,
    ) -> list[AuditOut]:
        rows = await run_in_threadpool(
            lambda: ctx.store.audit_log(limit=limit, target_type=target_type, target_id=target_id)
        )
        return [AuditOut.from_row(r) for r in rows]

    return router
