"""Agent tokens (create, list, revoke, authenticate) and the audit log operators read."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from tether import errors
from tether.plane import tokens
from tether.plane.models import Agent, AgentToken, AuditEntry
from tether.plane.store.base import Database, TokenIdentity, audit, snapshot, utcnow
from tether.plane.store.rules import settle_agent
from tether.protocol import TokenScope


class Unchanged:
    """An argument not given: the field keeps its value."""


UNCHANGED = Unchanged()

_TOKEN_AUDIT_FIELDS = ("id", "name", "description", "scopes", "bundles", "expires_at", "revoked_at", "revoked_by")
#: ``last_used_at`` is for people: written at most this often, not on every request.
LAST_USED_EVERY = timedelta(minutes=1)
#: Tokens whose ``last_used_at`` one statement writes.
_USED_PER_STATEMENT = 500


class TokenStore(Database):
    def create_token(
        self,
        *,
        name: str,
        description: str | None = None,
        expires_in: timedelta | None = None,
        expires_at: datetime | None = None,
        scopes: Sequence[str] = (TokenScope.WORKER,),
        bundles: Sequence[str] | None = None,
        created_by: str | None = None,
        now: datetime | None = None,
    ) -> tuple[tokens.IssuedToken, AgentToken]:
        """A new token for ``scopes`` (and, for dag-processors, ``bundles``; None: any), expiring at ``expires_at``
        (or ``expires_in`` from now; neither: never)."""
        scopes = sorted({TokenScope(scope).value for scope in scopes})
        if not scopes:
            raise errors.Invalid("a token needs at least one scope", reason="no_scope")
        if bundles is not None and TokenScope.DAG_PROCESSOR.value not in scopes:
            raise errors.Invalid(
                "bundles limit what a dag-processor token may write: give the token the dag-processor scope too",
                reason="bundles_without_dag_processor",
            )
        now = now or utcnow()
        if expires_in is not None:
            expires_at = now + expires_in
        with self.transaction() as session:
            live = _live_tokens(session, now)
            if any(t.name == name for t in live):
                raise errors.Conflict(
                    f"an active agent token named {name!r} already exists; pick another name or revoke it",
                    reason="token_name_taken",
                )
            if len(live) >= self.settings.max_agent_tokens:
                raise errors.Invalid(
                    f"at most {self.settings.max_agent_tokens} agent tokens may be active at once; revoke one "
                    "or raise [tether] max_agent_tokens",
                    reason="token_limit",
                )
            issued = tokens.issue()
            row = AgentToken(
                id=issued.id,
                name=name,
                description=description,
                secret_hash=issued.secret_hash,
                created_at=now,
                created_by=created_by,
                expires_at=expires_at,
                scopes=scopes,
                bundles=sorted(set(bundles)) if bundles is not None else None,
            )
            session.add(row)
            session.flush()
            audit(
                session,
                actor=created_by or "unknown",
                action="token.create",
                target_type="token",
                target_id=row.id,
                before=None,
                after=snapshot(row, _TOKEN_AUDIT_FIELDS),
                now=now,
            )
            session.expunge(row)
        return issued, row

    def list_tokens(self) -> list[AgentToken]:
        with self.transaction() as session:
            rows = list(session.scalars(select(AgentToken).order_by(AgentToken.created_at)))
            session.expunge_all()
        return rows

    def get_token(self, token_id: str) -> AgentToken:
        with self.transaction() as session:
            row = _token(session, token_id)
            session.expunge(row)
        return row

    def update_token(
        self,
        token_id: str,
        *,
        expires_at: datetime | Unchanged | None = UNCHANGED,
        description: str | Unchanged | None = UNCHANGED,
        changed_by: str | None = None,
        now: datetime | None = None,
    ) -> AgentToken:
        """Change when a token expires (sooner, later, never; an expired one may be given time again) or what it is for.

        A revoked token stays revoked: it cannot be changed.
        """
        now = now or utcnow()
        with self.transaction() as session:
            row = _token(session, token_id)
            if row.revoked_at is not None:
                raise errors.Conflict(
                    f"agent token {row.name} was revoked; create another instead", reason="token_revoked"
                )
            before = snapshot(row, _TOKEN_AUDIT_FIELDS)
            if not isinstance(expires_at, Unchanged):
                row.expires_at = expires_at
            if not isinstance(description, Unchanged):
                row.description = description
            session.flush()
            after = snapshot(row, _TOKEN_AUDIT_FIELDS)
            if after != before:
                audit(
                    session,
                    actor=changed_by or "unknown",
                    action="token.update",
                    target_type="token",
                    target_id=row.id,
                    before=before,
                    after=after,
                    now=now,
                )
            session.expunge(row)
        return row

    def revoke_token(self, token_id: str, *, revoked_by: str | None = None, now: datetime | None = None) -> AgentToken:
        """Revoke a token and fence the agents that use it: their running jobs fail, their leases go back."""
        now = now or utcnow()
        with self.transaction() as session:
            row = _token(session, token_id)
            if row.revoked_at is None:
                before = snapshot(row, _TOKEN_AUDIT_FIELDS)
                row.revoked_at = now
                row.revoked_by = revoked_by
                session.flush()
                for agent_id in session.scalars(select(Agent.id).where(Agent.token_id == token_id)).all():
                    settle_agent(session, agent_id, reason=f"agent token {row.name} was revoked", now=now)
                audit(
                    session,
                    actor=revoked_by or "unknown",
                    action="token.revoke",
                    target_type="token",
                    target_id=row.id,
                    before=before,
                    after=snapshot(row, _TOKEN_AUDIT_FIELDS),
                    now=now,
                )
            session.expunge(row)
        return row

    def authenticate(self, text_: str, *, now: datetime | None = None) -> TokenIdentity:
        now = now or utcnow()
        try:
            token_id = tokens.parse_id(text_)
        except tokens.MalformedToken as exc:
            raise errors.Unauthorized(str(exc), reason="token_malformed") from None
        with self.transaction() as session:
            row = session.get(AgentToken, token_id)
            if row is None or not tokens.matches(text_, row.secret_hash):
                raise errors.Unauthorized("the agent token is not known to this plane", reason="token_unknown")
            if row.revoked_at is not None:
                raise errors.Unauthorized(
                    f"the agent token {tokens.short_form(row.id)} ({row.name}) was revoked",
                    reason="token_revoked",
                )
            if row.expires_at is not None and row.expires_at <= now:
                expired_at = f"{row.expires_at:%Y-%m-%d %H:%M} UTC"
                raise errors.Unauthorized(
                    f"the agent token {tokens.short_form(row.id)} ({row.name}) expired at {expired_at}",
                    reason="token_expired",
                )
            if row.last_used_at is None or now - row.last_used_at > LAST_USED_EVERY:
                row.last_used_at = now
            return TokenIdentity(
                id=row.id,
                name=row.name,
                scopes=frozenset(row.scopes or (TokenScope.WORKER.value,)),
                bundles=frozenset(row.bundles) if row.bundles is not None else None,
                expires_at=row.expires_at,
            )

    def mark_tokens_used(self, token_ids: Sequence[str], *, now: datetime | None = None) -> None:
        """Write ``last_used_at`` of tokens the API server accepted since it last did: a statement per 500.

        Never moves it back (another API server may have written a later time).
        """
        now = now or utcnow()
        ids = sorted(set(token_ids))
        with self.transaction() as session:
            for start in range(0, len(ids), _USED_PER_STATEMENT):
                session.execute(
                    update(AgentToken)
                    .where(
                        AgentToken.id.in_(ids[start : start + _USED_PER_STATEMENT]),
                        or_(AgentToken.last_used_at.is_(None), AgentToken.last_used_at < now),
                    )
                    .values(last_used_at=now)
                    .execution_options(synchronize_session=False)
                )

    def token_epoch(self) -> int:
        """A number that changes whenever an accepted token may have stopped being accepted.

        Every change to a token (``update_token``, ``revoke_token``) writes an audit entry
        in its own transaction, so the newest audit entry's id is that number: one
        primary-key look-up, whatever the count of tokens. Other audited changes move it
        too; that only costs a few extra look-ups.
        """
        with self.statement() as conn:
            return int(conn.execute(select(func.coalesce(func.max(AuditEntry.id), 0))).scalar_one())

    def audit_log(
        self, *, limit: int = 100, target_type: str | None = None, target_id: str | None = None
    ) -> list[AuditEntry]:
        with self.transaction() as session:
            query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
            if target_type:
                query = query.where(AuditEntry.target_type == target_type)
            if target_id:
                query = query.where(AuditEntry.target_id == target_id)
            rows = list(session.scalars(query))
            session.expunge_all()
        return rows


def _token(session: Session, token_id: str) -> AgentToken:
    row = session.get(AgentToken, token_id)
    if row is None:
        raise errors.NotFound(f"no agent token with id {token_id!r}", reason="token_not_found")
    return row


def _live_tokens(session: Session, now: datetime) -> list[AgentToken]:
    return list(
        session.scalars(
            select(AgentToken).where(
                AgentToken.revoked_at.is_(None),
                or_(AgentToken.expires_at.is_(None), AgentToken.expires_at > now),
            )
        )
    )
