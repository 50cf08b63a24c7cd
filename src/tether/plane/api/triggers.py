"""The agent API's triggerer routes: load triggers, fetch their workloads, send what they fired, stop.

Agents in the triggerer role call them, every second or so while they run.
*load* keeps the agent process's Airflow triggerer job alive and assigns it
triggers the way Airflow assigns them to its own triggerers; with the answer
comes, when asked for, a token for the Execution API calls that trigger code
makes (Connections, Variables, XCom) - the same API Airflow's own triggerer
uses in its process.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Path, Response, status

from tether import protocol
from tether.plane.api.deps import Ctx, Revision, TriggererIdentity, written
from tether.plane.api.tokens import execution_token


def _triggerer_settings() -> tuple[bool, float]:
    from airflow.configuration import conf

    return (
        conf.getboolean("triggerer", "queues_enabled", fallback=False),
        conf.getfloat("triggerer", "triggerer_health_check_threshold"),
    )


def triggerer_router() -> APIRouter:
    router = APIRouter(prefix="/v1/agents/{agent_id}/triggerer", tags=["triggerer"])

    @router.post("/load", response_model=protocol.TriggererLoadResponse)
    async def load(
        agent_id: uuid.UUID, body: protocol.TriggererLoad, ctx: Ctx, identity: TriggererIdentity, revision: Revision
    ) -> Any:
        queues_enabled, threshold = _triggerer_settings()
        job_id, ids = await ctx.db(
            lambda: ctx.store.triggerer_load(
                identity, str(agent_id), body, queues_enabled=queues_enabled, health_check_threshold=threshold
            )
        )
        token, valid_for = execution_token(body.incarnation) if body.want_token else (None, None)
        answer = protocol.TriggererLoadResponse(
            trigger_ids=ids, job_id=job_id, execution_token=token, token_valid_for=valid_for
        )
        return written(answer, revision)

    @router.post("/workloads", response_model=protocol.TriggerWorkloadsResponse)
    async def workloads(
        agent_id: uuid.UUID,
        body: protocol.TriggerWorkloadsRequest,
        ctx: Ctx,
        identity: TriggererIdentity,
        revision: Revision,
    ) -> Any:
        found = await ctx.db(ctx.store.trigger_workloads, identity, str(agent_id), body)
        return written(protocol.TriggerWorkloadsResponse(workloads=found), revision)

    @router.post("/outcomes", response_model=protocol.TriggerOutcomesResponse)
    async def outcomes(
        agent_id: uuid.UUID, body: protocol.TriggerOutcomes, ctx: Ctx, identity: TriggererIdentity, revision: Revision
    ) -> Any:
        return written(await ctx.db(ctx.store.trigger_outcomes, identity, str(agent_id), body), revision)

    @router.post("/triggers/{trigger_id}/logs", response_model=protocol.LogBatchResponse)
    async def trigger_log(
        agent_id: uuid.UUID,
        trigger_id: Annotated[int, Path(ge=1)],
        body: protocol.LogBatch,
        ctx: Ctx,
        identity: TriggererIdentity,
        revision: Revision,
    ) -> Any:
        answer = await ctx.db(ctx.store.append_trigger_log, identity, str(agent_id), trigger_id, body)
        return written(answer, revision)

    @router.post("/release", status_code=status.HTTP_204_NO_CONTENT)
    async def release(
        agent_id: uuid.UUID, body: protocol.TriggererRelease, ctx: Ctx, identity: TriggererIdentity
    ) -> Response:
        await ctx.db(ctx.store.release_triggerer, identity, str(agent_id), body)
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    return router
