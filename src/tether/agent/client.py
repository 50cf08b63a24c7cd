"""The agent's client for the plane's agent API, grouped by resource.

I/O happens only in ``httpx``; tests pass an ``httpx.MockTransport``. Transport
errors, 5xx and answers that do not parse (``PlaneUnavailable``, ``ProtocolError``)
are retried by the caller's loop with capped, jittered backoff (see ``Backoff``);
a 4xx is the plane's answer and is raised as ``PlaneRefused``.
"""

from __future__ import annotations

import random
import ssl
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

import tether
from tether import protocol
from tether.agent.settings import AgentSettings
from tether.errors import PlaneRefused, PlaneUnavailable, ProtocolError

T = TypeVar("T", bound=BaseModel)

#: The reason of a 4xx that names none, such as a plane's "no such route".
NO_REASON = "refused"


@dataclass
class Backoff:
    """Capped exponential backoff with full jitter."""

    base: float = 0.5
    cap: float = 30.0
    attempt: int = 0

    def next_delay(self) -> float:
        delay = random.uniform(0, min(self.cap, self.base * 2**self.attempt))
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


def make_http_client(settings: AgentSettings, transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
    verify: ssl.SSLContext | bool = True
    if settings.ca_bundle or settings.client_cert:
        context = ssl.create_default_context(cafile=str(settings.ca_bundle) if settings.ca_bundle else None)
        if settings.client_cert and settings.client_key:
            context.load_cert_chain(str(settings.client_cert), str(settings.client_key))
        verify = context
    return httpx.AsyncClient(
        base_url=settings.plane_url + protocol.API_PREFIX,
        headers={
            "Authorization": f"Bearer {settings.token}",
            protocol.PROTOCOL_HEADER: str(protocol.PROTOCOL_VERSION),
            protocol.VERSION_HEADER: tether.__version__,
            "User-Agent": f"tether-agent/{tether.__version__}",
        },
        verify=verify,
        # Proxies come from HTTP_PROXY / HTTPS_PROXY / NO_PROXY.
        trust_env=True,
        transport=transport,
        timeout=httpx.Timeout(10.0),
    )


async def _call(
    http: httpx.AsyncClient,
    method: str,
    path: str,
    answer: type[T],
    *,
    body: BaseModel | None = None,
    read_timeout: float | None = None,
) -> T:
    """One call to the agent API: the request id sent and named in every error, errors translated."""
    rid = uuid.uuid4().hex
    headers = {protocol.REQUEST_ID_HEADER: rid}
    kwargs: dict[str, Any] = {}
    if body is not None:
        headers["Content-Type"] = "application/json"
        kwargs["content"] = body.model_dump_json()
    if read_timeout is not None:
        kwargs["timeout"] = httpx.Timeout(10.0, read=read_timeout)
    try:
        response = await http.request(method, path, headers=headers, **kwargs)
    except httpx.TransportError as exc:
        raise PlaneUnavailable(f"cannot reach the plane: {exc!r} [request_id={rid}]") from exc
    return _decode(response, answer, rid)


def _decode(response: httpx.Response, answer: type[T], rid: str) -> T:
    if response.status_code >= 500:
        raise PlaneUnavailable(f"the plane answered {response.status_code} [request_id={rid}]")
    if response.status_code >= 400:
        try:
            problem = response.json()
            detail, reason = str(problem.get("detail")), str(problem.get("reason", NO_REASON))
        except (ValueError, AttributeError):
            detail, reason = response.text[:200], NO_REASON
        raise PlaneRefused(response.status_code, f"{detail} [request_id={rid}]", reason)
    try:
        return answer.model_validate_json(response.content)
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(part) for part in problem.get("loc", ())) or "body"
        raise ProtocolError(
            f"the plane's answer to {response.request.method} {response.request.url.path} is not a "
            f"{answer.__name__} ({where}: {problem.get('msg')}) [request_id={rid}]"
        ) from None


class _Resource:
    def __init__(self, http: httpx.AsyncClient) -> None:
        self._http = http

    async def _post(self, path: str, body: BaseModel, answer: type[T], *, timeout: float | None = None) -> T:
        return await _call(self._http, "POST", path, answer, body=body, read_timeout=timeout)


class Agents(_Resource):
    async def register(self, body: protocol.RegisterRequest) -> protocol.RegisterResponse:
        return await self._post("/agents/register", body, protocol.RegisterResponse)

    async def heartbeat(self, agent_id: uuid.UUID, body: protocol.HeartbeatRequest) -> protocol.HeartbeatResponse:
        return await self._post(f"/agents/{agent_id}/heartbeat", body, protocol.HeartbeatResponse)

    async def lease(self, agent_id: uuid.UUID, body: protocol.LeaseRequest) -> protocol.LeaseResponse:
        return await self._post(f"/agents/{agent_id}/lease", body, protocol.LeaseResponse, timeout=body.wait + 15)


class Jobs(_Resource):
    async def start(
        self, agent_id: uuid.UUID, job_id: uuid.UUID, body: protocol.StartRequest
    ) -> protocol.StartResponse:
        return await self._post(f"/agents/{agent_id}/jobs/{job_id}/start", body, protocol.StartResponse)

    async def start_many(self, agent_id: uuid.UUID, body: protocol.StartManyRequest) -> protocol.StartManyResponse:
        return await self._post(f"/agents/{agent_id}/jobs/start", body, protocol.StartManyResponse)

    async def report(
        self, agent_id: uuid.UUID, job_id: uuid.UUID, body: protocol.ReportRequest
    ) -> protocol.ReportResponse:
        return await self._post(f"/agents/{agent_id}/jobs/{job_id}/report", body, protocol.ReportResponse)


class PlaneClient:
    def __init__(self, http: httpx.AsyncClient) -> None:
        self._http = http
        self.agents = Agents(http)
        self.jobs = Jobs(http)

    async def health(self) -> protocol.Health:
        return await _call(self._http, "GET", "/health", protocol.Health)

    async def preflight(self) -> protocol.PreflightResponse:
        return await _call(self._http, "GET", "/preflight", protocol.PreflightResponse)

    async def aclose(self) -> None:
        await self._http.aclose()


def backoff_for(settings: AgentSettings) -> Backoff:
    return Backoff(cap=max(settings.max_backoff, timedelta(seconds=0.5)).total_seconds())
