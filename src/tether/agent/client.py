"""The agent's client for the plane's agent API, grouped by resource.

I/O happens only in ``httpx``; tests pass an ``httpx.MockTransport``. Transport
errors, 5xx and answers that do not parse (``PlaneUnavailable``, ``ProtocolError``)
are retried by the caller's loop with capped, jittered backoff (see ``Backoff``);
a 4xx is the plane's answer and is raised as ``PlaneRefused``.
"""

from __future__ import annotations

import gzip
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


#: Seconds an idle connection to the plane is kept for the next call. Longer than the heartbeat
#: interval (10 s by default): the heartbeat's connection sits idle while the lease long-poll holds
#: the other, and with httpx's 5 s every heartbeat opened a new TLS connection, a handshake on both
#: ends. Shorter than the idle timeouts of the load balancers and proxies in front of planes (60 s
#: and more) and than the API server's own (``[api] worker_timeout``, 120 s).
KEEPALIVE_EXPIRY = 30.0
#: The connections to the plane an agent keeps: httpx's defaults, with the idle time above.
#: Asked of the answers to the calls every agent makes all the time (registration, heartbeat, lease, start,
#: report): each is a few hundred bytes to a few kB of JSON, and the API server's compression of those
#: cost it more CPU than the bytes it saved were worth.
PLAIN_ANSWER = {"Accept-Encoding": "identity"}
CONNECTION_LIMITS = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=KEEPALIVE_EXPIRY)


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
        limits=CONNECTION_LIMITS,
    )


async def _call(
    http: httpx.AsyncClient,
    method: str,
    path: str,
    answer: type[T],
    *,
    body: BaseModel | bytes | None = None,
    gzipped: bool = False,
    read_timeout: float | None = None,
    plain: bool = False,
) -> T:
    """One call to the agent API: the request id sent and named in every error, errors translated.

    ``body`` is a model, or its JSON already encoded (``gzipped``: and compressed). ``plain``: the
    answer is asked for uncompressed (``PLAIN_ANSWER``).
    """
    rid = uuid.uuid4().hex
    headers = {protocol.REQUEST_ID_HEADER: rid}
    kwargs: dict[str, Any] = {}
    if body is not None:
        headers["Content-Type"] = "application/json"
        kwargs["content"] = body if isinstance(body, bytes) else body.model_dump_json()
    if gzipped:
        headers["Content-Encoding"] = "gzip"
    if plain:
        headers.update(PLAIN_ANSWER)
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
    if response.status_code == 204:
        return answer()
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

    async def _post(
        self, path: str, body: BaseModel, answer: type[T], *, timeout: float | None = None, plain: bool = False
    ) -> T:
        return await _call(self._http, "POST", path, answer, body=body, read_timeout=timeout, plain=plain)


class Agents(_Resource):
    async def register(self, body: protocol.RegisterRequest) -> protocol.RegisterResponse:
        return await self._post("/agents/register", body, protocol.RegisterResponse, plain=True)

    async def heartbeat(self, agent_id: uuid.UUID, body: protocol.HeartbeatRequest) -> protocol.HeartbeatResponse:
        return await self._post(f"/agents/{agent_id}/heartbeat", body, protocol.HeartbeatResponse, plain=True)

    async def lease(self, agent_id: uuid.UUID, body: protocol.LeaseRequest) -> protocol.LeaseResponse:
        return await self._post(
            f"/agents/{agent_id}/lease", body, protocol.LeaseResponse, timeout=body.wait + 15, plain=True
        )


class Jobs(_Resource):
    async def start(
        self, agent_id: uuid.UUID, job_id: uuid.UUID, body: protocol.StartRequest
    ) -> protocol.StartResponse:
        return await self._post(f"/agents/{agent_id}/jobs/{job_id}/start", body, protocol.StartResponse, plain=True)

    async def start_many(self, agent_id: uuid.UUID, body: protocol.StartManyRequest) -> protocol.StartManyResponse:
        return await self._post(f"/agents/{agent_id}/jobs/start", body, protocol.StartManyResponse, plain=True)

    async def report(
        self, agent_id: uuid.UUID, job_id: uuid.UUID, body: protocol.ReportRequest
    ) -> protocol.ReportResponse:
        return await self._post(f"/agents/{agent_id}/jobs/{job_id}/report", body, protocol.ReportResponse, plain=True)

    async def log(self, agent_id: uuid.UUID, job_id: uuid.UUID, body: protocol.LogBatch) -> protocol.LogBatchResponse:
        """Lines of a running job's log; sent compressed."""
        path = f"/agents/{agent_id}/jobs/{job_id}/logs"
        return await _call(self._http, "POST", path, protocol.LogBatchResponse, body=compress(body), gzipped=True)

    async def logs(self, agent_id: uuid.UUID, body: protocol.JobLogBatches) -> protocol.JobLogBatchesResponse:
        """Batches of several jobs' logs in one call; sent compressed."""
        path = f"/agents/{agent_id}/logs"
        return await _call(self._http, "POST", path, protocol.JobLogBatchesResponse, body=compress(body), gzipped=True)


class Nothing(BaseModel):
    """The answer of a call that answers nothing (204)."""


class DagProcessing(_Resource):
    """The calls of an agent in the dag-processor role."""

    def _path(self, agent_id: uuid.UUID, tail: str) -> str:
        return f"/agents/{agent_id}/dag-processing/{tail}"

    async def sync_bundles(self, agent_id: uuid.UUID, body: protocol.BundleSyncRequest) -> protocol.BundleSyncResponse:
        return await self._post(self._path(agent_id, "bundles"), body, protocol.BundleSyncResponse)

    async def update_bundle_state(
        self, agent_id: uuid.UUID, bundle_name: str, body: protocol.BundleStateUpdate
    ) -> None:
        path = self._path(agent_id, f"bundles/{bundle_name}/state")
        await _call(self._http, "PUT", path, Nothing, body=body)

    async def bundle_files(
        self, agent_id: uuid.UUID, bundle_name: str, body: protocol.BundleFiles
    ) -> protocol.BundleFilesResponse:
        path = self._path(agent_id, f"bundles/{bundle_name}/files")
        return await _call(self._http, "POST", path, protocol.BundleFilesResponse, body=compress(body), gzipped=True)

    async def results(self, agent_id: uuid.UUID, compressed: bytes) -> protocol.ParseResultResponse:
        """Send a ``ParseResult`` already encoded and gzip-compressed (see ``compress``)."""
        path = self._path(agent_id, "results")
        return await _call(self._http, "POST", path, protocol.ParseResultResponse, body=compressed, gzipped=True)

    async def work(self, agent_id: uuid.UUID, body: protocol.WorkRequest) -> protocol.WorkResponse:
        return await self._post(self._path(agent_id, "work"), body, protocol.WorkResponse)


class Triggerer(_Resource):
    """The calls of an agent in the triggerer role."""

    def _path(self, agent_id: uuid.UUID, tail: str) -> str:
        return f"/agents/{agent_id}/triggerer/{tail}"

    async def load(self, agent_id: uuid.UUID, body: protocol.TriggererLoad) -> protocol.TriggererLoadResponse:
        return await self._post(self._path(agent_id, "load"), body, protocol.TriggererLoadResponse)

    async def workloads(
        self, agent_id: uuid.UUID, body: protocol.TriggerWorkloadsRequest
    ) -> protocol.TriggerWorkloadsResponse:
        return await self._post(self._path(agent_id, "workloads"), body, protocol.TriggerWorkloadsResponse)

    async def outcomes(self, agent_id: uuid.UUID, body: protocol.TriggerOutcomes) -> protocol.TriggerOutcomesResponse:
        return await self._post(self._path(agent_id, "outcomes"), body, protocol.TriggerOutcomesResponse)

    async def log(self, agent_id: uuid.UUID, trigger_id: int, body: protocol.LogBatch) -> protocol.LogBatchResponse:
        """Lines of a running trigger's log; sent compressed."""
        path = self._path(agent_id, f"triggers/{trigger_id}/logs")
        return await _call(self._http, "POST", path, protocol.LogBatchResponse, body=compress(body), gzipped=True)

    async def release(self, agent_id: uuid.UUID, body: protocol.TriggererRelease) -> None:
        await _call(self._http, "POST", self._path(agent_id, "release"), Nothing, body=body)


class Sentinel(_Resource):
    async def report(self, body: protocol.SentinelReport) -> protocol.SentinelReportResponse:
        return await self._post("/sentinel/report", body, protocol.SentinelReportResponse)


def compress(body: BaseModel) -> bytes:
    """A request body as JSON, gzip-compressed: what large DAG-processing calls send."""
    return gzip.compress(body.model_dump_json().encode(), compresslevel=5)


class PlaneClient:
    def __init__(self, http: httpx.AsyncClient) -> None:
        self._http = http
        self.agents = Agents(http)
        self.jobs = Jobs(http)
        self.dag_processing = DagProcessing(http)
        self.triggerer = Triggerer(http)
        self.sentinel = Sentinel(http)

    async def health(self) -> protocol.Health:
        return await _call(self._http, "GET", "/health", protocol.Health)

    async def preflight(self) -> protocol.PreflightResponse:
        return await _call(self._http, "GET", "/preflight", protocol.PreflightResponse)

    async def aclose(self) -> None:
        await self._http.aclose()


def backoff_for(settings: AgentSettings) -> Backoff:
    return Backoff(cap=max(settings.max_backoff, timedelta(seconds=0.5)).total_seconds())
