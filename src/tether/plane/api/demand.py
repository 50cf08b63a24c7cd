"""Demand: the work waiting in and held from each queue, in task slots, for autoscalers.

Read with an agent token of any scope and without a protocol header, so that
KEDA's metrics-api scaler can call it as it is (bearer authentication, a GJSON
``valueLocation`` such as ``replicas``). One reading of every queue's load (one
grouped statement) is shared by all callers for ``DEMAND_TTL`` seconds, so a
fleet's scalers polling every few seconds cost the database one statement every
``DEMAND_TTL`` seconds per API server, whatever their number.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query

from tether import errors, protocol
from tether.plane.api.deps import Ctx, ReaderIdentity
from tether.plane.store import utcnow
from tether.plane.store.jobs import QueueLoad

#: Most queues one call may name.
MAX_QUEUES = 64


def answer(
    loads: dict[str, QueueLoad], as_of: datetime, queues: list[str] | None, slots_per_replica: int
) -> protocol.DemandResponse:
    """The demand of ``queues`` (None: every queue with work) for agents of ``slots_per_replica`` slots."""
    names = sorted(loads) if queues is None else list(dict.fromkeys(queues))
    per_queue = {name: _demand(loads.get(name, QueueLoad()), slots_per_replica) for name in names}
    together = QueueLoad(
        queued=sum(d.queued for d in per_queue.values()),
        running=sum(d.running for d in per_queue.values()),
        queued_slots=sum(d.queued_slots for d in per_queue.values()),
        running_slots=sum(d.running_slots for d in per_queue.values()),
    )
    total = _demand(together, slots_per_replica)
    return protocol.DemandResponse(
        slots_per_replica=slots_per_replica,
        as_of=as_of,
        queues=per_queue,
        **total.model_dump(),
    )


def _demand(load: QueueLoad, slots_per_replica: int) -> protocol.QueueDemand:
    slots = load.queued_slots + load.running_slots
    return protocol.QueueDemand(
        queued=load.queued,
        running=load.running,
        queued_slots=load.queued_slots,
        running_slots=load.running_slots,
        slots=slots,
        replicas=math.ceil(slots / slots_per_replica),
    )


def parse_queues(text: str | None) -> list[str] | None:
    """The queues of a ``queues`` parameter (comma-separated), refused with a sentence when malformed."""
    if text is None or not text.strip():
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    if len(names) > MAX_QUEUES:
        raise errors.PlaneError(f"name at most {MAX_QUEUES} queues, not {len(names)}", reason="invalid_request")
    for name in names:
        if len(name) > 256:
            raise errors.PlaneError("a queue name is at most 256 characters", reason="invalid_request")
    return names


def demand_router() -> APIRouter:
    router = APIRouter(prefix="/v1", tags=["autoscaling"])

    @router.get("/demand", response_model=protocol.DemandResponse)
    async def demand(
        ctx: Ctx,
        _identity: ReaderIdentity,
        slots_per_replica: Annotated[int, Query(ge=1, le=1024)] = 1,
        queues: Annotated[str | None, Query(max_length=64 * 257)] = None,
    ) -> Any:
        names = parse_queues(queues)

        async def read() -> tuple[dict[str, QueueLoad], datetime]:
            as_of = utcnow()
            return await ctx.db(ctx.store.queue_loads), as_of

        loads, as_of = await ctx.demand.get(None, read)
        return answer(loads, as_of, names, slots_per_replica)

    return router
