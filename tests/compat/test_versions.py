"""Plane and agents of different releases, with real processes (ADR 5).

The plane is upgraded first and serves agents of its own and the previous minor
release; agents read answers with fields they do not know; a plane too old for an
agent refuses it with a 4xx that names both versions, and the agent keeps asking
instead of exiting; an upgrade in place keeps tokens, cordons and queued jobs.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.compat.conftest import AddingRelay, agents_list, make_plane
from tests.conftest import create_pg_database, drop_pg_database
from tether.embedded import BIN, AgentProcess, Plane, start_agent, wait_until

DAG = "compat_chain"


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory, pg_admin_url: str) -> Iterator[Plane]:
    """A plane of this release on PostgreSQL."""
    url = create_pg_database(pg_admin_url)
    plane = make_plane(tmp_path_factory.mktemp("compat") / "plane", url)
    try:
        plane.migrate()
        plane.start()
        plane.wait_for_dag(DAG)
        yield plane
    finally:
        plane.stop()
        drop_pg_database(pg_admin_url, url)


@pytest.fixture(scope="module")
def token(plane: Plane) -> str:
    return plane.create_token("compat")


def _ready(agent: AgentProcess) -> None:
    wait_until(lambda: agent.health("/readyz") == 200, 120, f"agent {agent.name} ready")


def _run_on(plane: Plane, agent: AgentProcess) -> None:
    """The DAG runs to success, every task of it on ``agent``."""
    run_id = plane.trigger(DAG)
    assert plane.wait_for_run(DAG, run_id, timeout=180) == "success"
    ran_on = wait_until(
        lambda: {row[0] for row in plane.query("SELECT agent_name FROM tether_job WHERE run_id = :r", r=run_id)},
        30,
        "the run's jobs",
    )
    assert ran_on == {agent.name}


def _log(agent: AgentProcess) -> str:
    return agent.process.log_path.read_text(errors="replace")


def _metric(agent: AgentProcess, name: str, *, missing: float | None = None) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", agent.metrics(), re.MULTILINE)
    if match is None and missing is not None:
        return missing
    assert match, f"{name} not in the agent's metrics"
    return float(match.group(1))


def test_an_agent_of_the_previous_release_runs_tasks_on_this_plane(plane: Plane, token: str, release_0_1: Path) -> None:
    old = start_agent(plane, "agent-0-1", token, bin_dir=release_0_1, queues="default", slots="4")
    try:
        _ready(old)
        _run_on(plane, old)
        (listed,) = [agent for agent in agents_list(plane) if agent["name"] == "agent-0-1"]
        assert (listed["tether_version"], listed["protocol"], listed["version_support"]) == ("0.1.0", 1, "supported")
        # It reads the plane's health as its own release wrote it, and its preflight passes.
        check = subprocess.run(
            [str(release_0_1 / "tether-agent"), "check"], env=old.env, capture_output=True, text=True, timeout=120
        )
        assert "✓ protocol version: both speak protocol 1" in check.stdout, check.stdout + check.stderr
    finally:
        old.process.stop()


def test_this_agent_reads_answers_with_fields_it_does_not_know(plane: Plane, token: str) -> None:
    relay = AddingRelay(plane.url)
    agent = start_agent(
        plane,
        "agent-reads-more",
        token,
        queues="default",
        slots="4",
        plane_url=relay.url,
        execution_api_url=f"{plane.url}/execution/",
    )
    try:
        _ready(agent)
        _run_on(plane, agent)
        assert relay.added >= 5, "the relay changed too few answers to show anything"
        assert agent.process.alive()
        assert "is not a" not in _log(agent)  # no answer was taken for a broken one
        # The Task SDK features are on with an SDK as expected (the next test turns one off).
        assert _metric(agent, 'tether_agent_sdk_feature{feature="head_start"}') == 1
    finally:
        agent.process.stop()
        relay.close()


def test_without_the_sdk_shape_the_head_start_relies_on_tasks_run_and_the_agent_says_so(
    plane: Plane, token: str, tmp_path: Path
) -> None:
    # The supervisor takes its socket pairs from a function of its own: the head start cannot
    # lend it the pairs it made ahead, while the SDK itself works as before.
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import socket\n"
        "from airflow.sdk.execution_time import supervisor\n"
        "def socketpair(*args, **kwargs):\n"
        "    return socket.socketpair(*args, **kwargs)\n"
        "supervisor.socketpair = socketpair\n"
    )
    agent = start_agent(plane, "agent-plain-start", token, env={"PYTHONPATH": str(shim)}, queues="default", slots="4")
    try:
        _ready(agent)
        said = (
            "Task SDK feature head_start is off: the Task SDK's supervisor does not use socket.socketpair; "
            "spares fork the task process when the task comes"
        )
        assert _log(agent).count(said) == 1
        assert _metric(agent, 'tether_agent_sdk_feature{feature="head_start"}') == 0
        _run_on(plane, agent)
        check = subprocess.run(
            [str(BIN / "tether-agent"), "check"], env=agent.env, capture_output=True, text=True, timeout=120
        )
        assert "! Task SDK feature head_start: off: the Task SDK's supervisor does not use" in check.stdout
    finally:
        agent.process.stop()


def test_this_agent_and_a_plane_of_the_previous_release_refused_clearly_and_asked_again(
    tmp_path: Path, release_0_1: Path
) -> None:
    old_plane = make_plane(tmp_path / "old-plane", f"sqlite:///{tmp_path / 'old.db'}", bin_dir=release_0_1)
    old_plane.migrate()
    token = old_plane.create_token("newer-agents")
    old_plane.start(("api-server",))
    agent = start_agent(old_plane, "agent-too-new", token, queues="default", slots="1", max_backoff="1")
    try:
        refused = 'tether_agent_plane_errors_total{kind="refused"}'
        wait_until(
            lambda: agent.health("/metrics") == 200 and _metric(agent, refused, missing=0) >= 3, 120, "three refusals"
        )
        assert agent.process.alive(), _log(agent)
        lines = [line for line in _log(agent).splitlines() if "refuses this agent's registration" in line]
        assert len(lines) == 1, lines
        assert "422 protocol_mismatch: this plane speaks protocol 1, the agent sent '2'" in lines[0]
        check = subprocess.run(
            [str(BIN / "tether-agent"), "check"], env=agent.env, capture_output=True, text=True, timeout=120
        )
        assert check.returncode == 1
        assert "✗ protocol version: the plane runs Tether 0.1.0, which speaks protocol 1 at most" in check.stdout
        assert "upgrade the plane first" in check.stdout
    finally:
        agent.process.stop()
        old_plane.stop()


def test_a_plane_upgraded_in_place_keeps_its_tokens_cordons_and_queued_jobs(
    tmp_path: Path, pg_admin_url: str, release_0_1: Path
) -> None:
    url = create_pg_database(pg_admin_url)
    old = make_plane(tmp_path / "old-plane", url, bin_dir=release_0_1)
    new: Plane | None = None
    try:
        old.migrate()
        token = old.create_token("fleet")
        old.start()
        cordoned = start_agent(old, "agent-a", token, bin_dir=release_0_1, queues="default", slots="4")
        _ready(cordoned)
        old.airflow("tether", "agents", "cordon", "agent-a", "--reason", "disk full")
        cordoned.process.stop()
        old.wait_for_dag(DAG)
        run_id = old.trigger(DAG)
        wait_until(
            lambda: old.query("SELECT 1 FROM tether_job WHERE run_id = :r AND state = 'QUEUED'", r=run_id),
            120,
            "a queued job",
        )
        old.stop()

        # The same database and the same signing key for the tasks' tokens, this release's code.
        new = Plane(
            home=tmp_path / "new-plane",
            dags_folder=old.dags_folder,
            sql_alchemy_conn=url,
            extra_env=dict(old.extra_env),
            jwt_secret=old.jwt_secret,
        )
        new.migrate()
        new.start()
        again = start_agent(new, "agent-a", token, queues="default", slots="4")
        _ready(again)
        (listed,) = [agent for agent in agents_list(new) if agent["name"] == "agent-a"]
        assert (listed["cordoned"], listed["cordon_reason"], listed["protocol"]) == (True, "disk full", 2)
        worker = start_agent(new, "agent-b", token, queues="default", slots="4")
        assert new.wait_for_run(DAG, run_id, timeout=180) == "success"
        ran_on = {row[0] for row in new.query("SELECT agent_name FROM tether_job WHERE run_id = :r", r=run_id)}
        assert ran_on == {worker.name}
    finally:
        old.stop()
        if new is not None:
            new.stop()
        drop_pg_database(pg_admin_url, url)
