"""``tether-agent check`` against a real plane: all ✓, then each ✗ caused on purpose."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tether.embedded import BIN, Plane, agent_env


@pytest.fixture(scope="module")
def token(pg_plane: Plane) -> str:
    return pg_plane.create_token("preflight")


def _check(plane: Plane, home: Path, token: str, **env: str) -> tuple[int, str]:
    home.mkdir(parents=True, exist_ok=True)
    environment = agent_env(plane, home, token=token, name="preflight-agent")
    environment.update(env)
    result = subprocess.run(
        [str(BIN / "tether-agent"), "check"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    return result.returncode, result.stdout


def _lines(output: str, mark: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(mark)]


def test_every_check_passes_against_a_healthy_plane(pg_plane: Plane, token: str, tmp_path: Path) -> None:
    code, output = _check(pg_plane, tmp_path, token)
    assert code == 0, output
    passed = _lines(output, "✓")
    for name in (
        "plane reachable",
        "protocol version",
        "agent token accepted",
        "secrets backend",
        "XCom backend",
        "DAG bundle 'dags-folder'",
    ):
        assert any(line.startswith(f"✓ {name}") for line in passed), (name, output)
    assert "accepted from address 127.0.0.1" in output
    assert _lines(output, "✗") == []


@pytest.mark.parametrize(
    ("env", "failing", "fix"),
    [
        ({"TETHER_PLANE_URL": "http://127.0.0.1:9"}, "plane reachable", "--plane-url"),
        ({"TETHER_TOKEN": "tether_0000000000_" + "A" * 43}, "agent token accepted", "tokens create"),
        ({"TETHER_TOKEN": "not-a-token"}, "agent token accepted", "tokens create"),
        ({"AIRFLOW__WORKERS__SECRETS_BACKEND": "no.such.Backend"}, "secrets backend", "secrets_backend"),
        ({"AIRFLOW__CORE__XCOM_BACKEND": "no.such.XCom"}, "XCom backend", "xcom_backend"),
        ({"AIRFLOW__CORE__DAGS_FOLDER": "/nonexistent/dags"}, "DAG bundle 'dags-folder'", "bundle"),
    ],
)
def test_each_failure_is_reported_with_a_fix_and_a_non_zero_exit(
    pg_plane: Plane, token: str, tmp_path: Path, env: dict[str, str], failing: str, fix: str
) -> None:
    code, output = _check(pg_plane, tmp_path, token, **env)
    assert code == 1, output
    failed = _lines(output, "✗")
    assert [line.split(":")[0] for line in failed] == [f"✗ {failing}"], output
    assert fix in output.split(failed[0], 1)[1].splitlines()[1]


def test_an_address_outside_the_allowed_ranges_is_named(pg_plane: Plane, token: str, tmp_path: Path) -> None:
    pg_plane.airflow("tether", "allowed-ip-ranges", "set", "203.0.113.0/24")
    try:
        # The API server trusts the ranges it read for [tether] token_cache_ttl (2 s) after a change.
        deadline = time.monotonic() + 10
        code, output = _check(pg_plane, tmp_path, token)
        while code == 0 and time.monotonic() < deadline:
            time.sleep(0.5)
            code, output = _check(pg_plane, tmp_path, token)
    finally:
        pg_plane.airflow("tether", "allowed-ip-ranges", "set")
    assert code == 1
    assert "127.0.0.1" in _lines(output, "✗ agent token accepted")[0]
    assert "allowed-ip-ranges add" in output
