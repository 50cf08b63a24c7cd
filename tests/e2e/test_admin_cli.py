"""The ``airflow tether`` CLI on a real plane: the same operations and fields as the REST API."""

from __future__ import annotations

import json
from typing import Any

from tether.embedded import Plane


def _json(plane: Plane, *args: str) -> Any:
    return json.loads(plane.airflow("tether", *args, "--output", "json").stdout)


def test_tokens_are_created_once_listed_shown_and_revoked(pg_plane: Plane) -> None:
    created = _json(
        pg_plane, "tokens", "create", "--name", "cli-token", "--description", "from the CLI", "--expires-in-days", "7"
    )
    assert created["secret"].startswith(f"tether_{created['id']}_") and created["expires_at"]
    listed = _json(pg_plane, "tokens", "list")
    mine = next(t for t in listed if t["id"] == created["id"])
    assert "secret" not in mine and created["secret"] not in json.dumps(listed)
    assert mine["created_by"].startswith("cli:") and mine["state"] == "active"
    shown = _json(pg_plane, "tokens", "show", created["id"])
    assert shown["description"] == "from the CLI"
    revoked = _json(pg_plane, "tokens", "revoke", created["id"])
    assert revoked["state"] == "revoked"
    table = pg_plane.airflow("tether", "tokens", "list").stdout
    assert "cli-token" in table and "revoked" in table and created["secret"] not in table


def test_refusals_are_one_line_and_a_non_zero_exit(pg_plane: Plane) -> None:
    missing = pg_plane.airflow("tether", "tokens", "revoke", "nope", check=False)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[-1] == "error: no agent token with id 'nope'"
    bad_range = pg_plane.airflow("tether", "allowed-ip-ranges", "add", "10.0.0.0/99", check=False)
    assert bad_range.returncode == 1 and "'10.0.0.0/99' is not an IPv4 or IPv6" in bad_range.stderr
    unknown_agent = pg_plane.airflow("tether", "agents", "cordon", "ghost", check=False)
    assert unknown_agent.returncode == 1 and "no agent with id or name 'ghost'" in unknown_agent.stderr


def test_audit_reads_back_what_the_cli_did(pg_plane: Plane) -> None:
    _json(pg_plane, "tokens", "create", "--name", "audited-cli")
    entries = _json(pg_plane, "audit", "--target-type", "token", "--limit", "5")
    newest = entries[0]
    assert newest["action"] == "token.create" and newest["actor"].startswith("cli:")
    assert newest["after"]["name"] == "audited-cli" and newest["before"] is None


def test_token_expiry_is_set_and_changed_from_the_cli(pg_plane: Plane) -> None:
    created = _json(pg_plane, "tokens", "create", "--name", "cli-expiring", "--expires", "12h")
    assert created["expires_at"] and created["state"] == "active"
    extended = _json(pg_plane, "tokens", "update", created["id"], "--expires", "2030-01-31T18:00Z")
    assert extended["expires_at"].startswith("2030-01-31T18:00:00")
    forever = _json(pg_plane, "tokens", "update", created["id"], "--expires", "never", "--description", "rotated")
    assert forever["expires_at"] is None and forever["description"] == "rotated"
    entries = _json(pg_plane, "audit", "--target-id", created["id"], "--limit", "5")
    assert [entry["action"] for entry in entries][:2] == ["token.update", "token.update"]
    bad = pg_plane.airflow("tether", "tokens", "update", created["id"], "--expires", "soon", check=False)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1].startswith("error: --expires: expiry 'soon' is not a duration")
