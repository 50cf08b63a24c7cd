"""Bodies of the ``airflow tether`` commands: format output, call the store.

Each command renders the same models as the REST API (``tether.plane.views``):
a table for people by default, every field with ``--output json``.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, NoReturn, TypeVar

from pydantic import BaseModel

from tether import errors
from tether.plane.config import PlaneSettings
from tether.plane.expiry import parse_expiry
from tether.plane.store import Store, airflow_session_factory, utcnow
from tether.plane.store.agents import RangeChange
from tether.plane.values import agent_values, configured_plane_url
from tether.plane.views import AuditOut, BundleOut, IpRangeOut, PodOut, SentinelOut, TokenOut

T = TypeVar("T")

TOKEN_COLUMNS = ("id", "name", "token", "state", "scopes", "created_at", "created_by", "expires_at", "last_used_at")
AGENT_COLUMNS = (
    "name",
    "roles",
    "status",
    "cordoned",
    "last_heartbeat",
    "pod",
    "queues",
    "slots",
    "free_slots",
    "running_jobs",
    "token_name",
    "tether_version",
    "protocol",
    "version_support",
)
AUDIT_COLUMNS = ("at", "actor", "action", "target_type", "target_id", "before", "after")


def _store() -> Store:
    return Store(airflow_session_factory(), settings=PlaneSettings.from_airflow())


def _actor() -> str:
    return f"cli:{getpass.getuser()}"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, PodOut):
        return value.summary()
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) or "-"
    if isinstance(value, dict):
        return json.dumps(value, default=str, sort_keys=True)
    return str(getattr(value, "value", value))


def _emit(models: Sequence[BaseModel], output: str, columns: Sequence[str] | None = None) -> None:
    if output == "json":
        print(json.dumps([m.model_dump(mode="json") for m in models], indent=2))
        return
    if not models:
        print("(none)")
        return
    headers = list(columns or type(models[0]).model_fields)
    cells = [[_fmt(getattr(m, h)) for h in headers] for m in models]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _emit_one(model: BaseModel, output: str) -> None:
    if output == "json":
        print(json.dumps(model.model_dump(mode="json"), indent=2))
        return
    fields = model.model_dump()
    width = max(len(k) for k in fields)
    for key, value in fields.items():
        print(f"{key.ljust(width)}  {_fmt(value)}")


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(1)


def _call(action: Callable[[], T]) -> T:
    """Run a store action; a refusal is one line on stderr and exit status 1."""
    try:
        return action()
    except errors.TetherError as exc:
        _fail(str(exc))


# -- tokens ---------------------------------------------------------------------


def _expiry(text: str, now: datetime) -> datetime | None:
    try:
        return parse_expiry(text, now)
    except ValueError as exc:
        _fail(f"--expires: {exc}")


def tokens_create(args: argparse.Namespace) -> None:
    if args.expires_in_days is not None and args.expires_in_days < 1:
        _fail("--expires-in-days must be 1 or more (leave it out for a token that never expires)")
    if args.expires is not None and args.expires_in_days is not None:
        _fail("give --expires or --expires-in-days, not both")
    now = utcnow()
    expires_at = _expiry(args.expires, now) if args.expires is not None else None
    if args.expires_in_days:
        expires_at = now + timedelta(days=args.expires_in_days)
    issued, row = _call(
        lambda: _store().create_token(
            name=args.name,
            description=args.description,
            expires_at=expires_at,
            scopes=args.scope or ["worker"],
            bundles=[b.strip() for b in args.bundles.split(",") if b.strip()] if args.bundles is not None else None,
            created_by=_actor(),
            now=now,
        )
    )
    out = TokenOut.from_row(row, utcnow())
    if args.output == "json":
        print(json.dumps({**out.model_dump(mode="json"), "secret": issued.text}, indent=2))
        return
    print(issued.text)
    expiry = f"expires {out.expires_at:%Y-%m-%d %H:%M} UTC" if out.expires_at else "never expires"
    print(
        f"Agent token {row.name!r} created (id {row.id}, for {', '.join(row.scopes)}, {expiry}). "
        "This is the only time it is shown: "
        "store it now, for example in a Kubernetes Secret.",
        file=sys.stderr,
    )


def tokens_list(args: argparse.Namespace) -> None:
    now = utcnow()
    _emit([TokenOut.from_row(row, now) for row in _call(_store().list_tokens)], args.output, TOKEN_COLUMNS)


def tokens_show(args: argparse.Namespace) -> None:
    _emit_one(TokenOut.from_row(_call(lambda: _store().get_token(args.token_id)), utcnow()), args.output)


def tokens_update(args: argparse.Namespace) -> None:
    if args.expires is None and args.description is None:
        _fail("give --expires, --description or both")
    now = utcnow()
    changes: dict[str, Any] = {}
    if args.expires is not None:
        changes["expires_at"] = _expiry(args.expires, now)
    if args.description is not None:
        changes["description"] = args.description
    row = _call(lambda: _store().update_token(args.token_id, changed_by=_actor(), now=now, **changes))
    _emit_one(TokenOut.from_row(row, utcnow()), args.output)


def tokens_revoke(args: argparse.Namespace) -> None:
    row = _call(lambda: _store().revoke_token(args.token_id, revoked_by=_actor()))
    _emit_one(TokenOut.from_row(row, utcnow()), args.output)


# -- agents ---------------------------------------------------------------------


def agents_list(args: argparse.Namespace) -> None:
    store = _store()
    agents = _call(store.agent_views)
    _emit(agents, args.output, AGENT_COLUMNS)
    if args.output != "json":
        _print_sentinels(_call(store.sentinel_views), {a.name for a in agents} | {a.hostname for a in agents})


def _print_sentinels(reports: Sequence[SentinelOut], agents: set[str]) -> None:
    """Each namespace's sentinel report under the agents: its backends, and pods no agent registered from."""
    for report in reports:
        backends = ", ".join(
            f"{b.name} {'answers' if b.ok else 'FAILS: ' + (b.detail or 'no answer')}" for b in report.backends
        )
        stale = " (STALE: no report for two intervals)" if report.stale else ""
        print(
            f"\nSentinel {report.sentinel} in namespace {report.namespace}, "
            f"reported {_fmt(report.received_at)}{stale}: {backends or 'no backend checked'}"
        )
        unregistered = [pod for pod in report.pods if pod.name not in agents]
        for pod in unregistered:
            print(f"  pod {pod.name} (no agent registered): {pod.summary()}")


def agents_show(args: argparse.Namespace) -> None:
    _emit_one(_call(lambda: _store().agent_view(args.agent)), args.output)


def agents_cordon(args: argparse.Namespace) -> None:
    view = _call(lambda: _store().cordon(args.agent, reason=args.reason, actor=_actor()))
    _emit_one(view, args.output)


def agents_uncordon(args: argparse.Namespace) -> None:
    _emit_one(_call(lambda: _store().uncordon(args.agent, actor=_actor())), args.output)


def agents_delete(args: argparse.Namespace) -> None:
    _emit_one(_call(lambda: _store().delete_agent(args.agent, actor=_actor())), args.output)


# -- allowed IP ranges ------------------------------------------------------------


def _emit_ranges(output: str, store: Store) -> None:
    rows = [IpRangeOut.from_row(r) for r in store.allowed_ranges()]
    _emit(rows, output)
    if not rows and output != "json":
        print("The list is empty: agents may call from any address.", file=sys.stderr)


def ranges_list(args: argparse.Namespace) -> None:
    _emit_ranges(args.output, _store())


def _change_ranges(args: argparse.Namespace, mode: RangeChange) -> None:
    store = _store()
    _call(lambda: store.set_allowed_ranges(args.cidrs, actor=_actor(), mode=mode))
    _emit_ranges(args.output, store)


def ranges_set(args: argparse.Namespace) -> None:
    _change_ranges(args, "set")


def ranges_add(args: argparse.Namespace) -> None:
    _change_ranges(args, "add")


def ranges_remove(args: argparse.Namespace) -> None:
    _change_ranges(args, "remove")


# -- bundles -----------------------------------------------------------------------


def bundles_list(args: argparse.Namespace) -> None:
    _emit([BundleOut.from_row(row) for row in _call(_store().bundles)], args.output)


def bundles_release(args: argparse.Namespace) -> None:
    _call(lambda: _store().release_bundle(args.bundle, actor=_actor()))
    print(f"Bundle {args.bundle!r} released: the next agent to sync it owns it.", file=sys.stderr)


# -- audit ------------------------------------------------------------------------


def audit(args: argparse.Namespace) -> None:
    rows = _call(lambda: _store().audit_log(limit=args.limit, target_type=args.target_type, target_id=args.target_id))
    _emit([AuditOut.from_row(r) for r in rows], args.output, AUDIT_COLUMNS)


# -- Helm values --------------------------------------------------------------------


def agents_values(args: argparse.Namespace) -> None:
    """The values file on stdout, ready to redirect; what the user still has to do on stderr."""
    values = _call(
        lambda: agent_values(
            plane_url=configured_plane_url(),
            namespace=args.namespace,
            queues=args.queues.split(","),
            slots=args.slots,
            agent_token_secret_name=args.agent_token_secret_name,
            resource_name_prefix=args.resource_name_prefix,
            secret_backend=args.secret_backend,
            xcom_backend=args.xcom_backend,
        )
    )
    print(values.text, end="")
    for warning in values.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if values.missing:
        print("Fill in before `helm install` (the chart refuses the file until they are set):", file=sys.stderr)
        for missing in values.missing:
            print(f"  {missing.name}: {missing.hint}", file=sys.stderr)
