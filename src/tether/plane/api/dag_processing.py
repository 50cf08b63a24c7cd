"""The agent API's DAG-processing routes: bundles, parse results, a bundle's files, reparse requests and callbacks.

Agents in the dag-processor role call them; each route checks, like the others,
that the caller is the agent process it claims to be, and the store checks that
the caller's token owns the bundle. Parse results may be large: their route has
a limit of its own (``[tether] max_parse_result_bytes``) and accepts gzip.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Path, Response, status

from tether import protocol
from tether.plane.api.deps import Ctx, DagProcessorIdentity, Revision, written


def takes_large_bodies(path: str) -> bool:
    """Whether the route's body limit is ``[tether] max_parse_result_bytes``: parse results, a bundle's files."""
    return "/dag-processing/" in path and (path.endswith("/results") or path.endswith("/files"))


BundlePath = Annotated[str, Path(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.-]+$")]


def dag_processing_router() -> APIRouter:
    router = APIRouter(prefix="/v1/agents/{agent_id}/dag-processing", tags=["dag-processing"])

    @router.post("/bundles", response_model=protocol.BundleSyncResponse)
    async def sync_bundles(
        agent_id: uuid.UUID,
        body: protocol.BundleSyncRequest,
        ctx: Ctx,
        identity: DagProcessorIdentity,
        revision: Revision,
    ) -> Any:
        return written(await ctx.db(ctx.store.sync_bundles, identity, str(agent_id), body), revision)

    @router.put("/bundles/{bundle_name}/state", status_code=status.HTTP_204_NO_CONTENT)
    async def update_bundle_state(
        agent_id: uuid.UUID,
        bundle_name: BundlePath,
        body: protocol.BundleStateUpdate,
        ctx: Ctx,
        identity: DagProcessorIdentity,
    ) -> Response:
        await ctx.db(ctx.store.update_bundle_state, identity, str(agent_id), bundle_name, body)
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    @router.post("/bundles/{bundle_name}/files", response_model=protocol.BundleFilesResponse)
    async def bundle_files(
        agent_id: uuid.UUID,
        bundle_name: BundlePath,
        body: protocol.BundleFiles,
        ctx: Ctx,
        identity: DagProcessorIdentity,
        revision: Revision,
    ) -> Any:
        answer = await ctx.db(ctx.store.reconcile_bundle_files, identity, str(agent_id), bundle_name, body)
        return written(answer, revision)

    @router.post("/results", response_model=protocol.ParseResultResponse)
    async def parse_result(
        agent_id: uuid.UUID, body: protocol.ParseResult, ctx: Ctx, identity: DagProcessorIdentity, revision: Revision
    ) -> Any:
        return written(await ctx.db(ctx.store.write_parse_result, identity, str(agent_id), body), revision)

    @router.post("/work", response_model=protocol.WorkResponse)
    async def claim_work(
        agent_id: uuid.UUID, body: protocol.WorkRequest, ctx: Ctx, identity: DagProcessorIdentity, revision: Revision
    ) -> Any:
        return written(await ctx.db(ctx.store.claim_work, identity, str(agent_id), body), revision)

    return router
