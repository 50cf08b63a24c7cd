"""Sentinel reports: the latest word of each namespace's sentinel on the agents' pods and backends."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select

from tether import protocol
from tether.plane.models import SentinelReport
from tether.plane.store.base import Database, TokenIdentity, utcnow
from tether.plane.views import BackendOut, PodOut, SentinelOut


class SentinelStore(Database):
    def save_sentinel_report(
        self, identity: TokenIdentity, body: protocol.SentinelReport, *, now: datetime | None = None
    ) -> protocol.SentinelReportResponse:
        """Keep ``body`` as its namespace's latest report (one row a namespace, replaced each time)."""
        now = now or utcnow()
        interval = self.settings.sentinel_interval.total_seconds()
        with self.transaction() as session:
            row = session.get(SentinelReport, body.namespace)
            if row is None:
                row = SentinelReport(namespace=body.namespace)
                session.add(row)
            row.sentinel = body.name
            row.token_id = identity.id
            row.received_at = now
            row.interval = interval
            row.pods = [pod.model_dump(mode="json") for pod in body.pods]
            row.backends = [check.model_dump(mode="json") for check in body.backends]
        return protocol.SentinelReportResponse(interval=interval)

    def sentinel_views(self, *, now: datetime | None = None) -> list[SentinelOut]:
        now = now or utcnow()
        with self.transaction() as session:
            rows = session.scalars(select(SentinelReport).order_by(SentinelReport.namespace)).all()
            return [_view(row, now) for row in rows]


def _view(row: SentinelReport, now: datetime) -> SentinelOut:
    age = (now - row.received_at).total_seconds()
    return SentinelOut(
        namespace=row.namespace,
        sentinel=row.sentinel,
        received_at=row.received_at,
        # Two reports missed: what it says may no longer be so.
        stale=age > 2 * row.interval + 5,
        pods=[
            PodOut.model_validate({**pod, "namespace": row.namespace, "reported_at": row.received_at})
            for pod in row.pods
        ],
        backends=[BackendOut.model_validate(check) for check in row.backends],
    )
