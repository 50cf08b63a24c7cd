"""Task logs of tasks run on agents, read through Airflow's own log API, with no inbound connection to the agent.

Real API servers (two, on one PostgreSQL database), scheduler, DAG processor and
agents; the REST API reads what the agents shipped.
"""

from __future__ import annotations

import contextlib
import json
import signal
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import create_pg_database, drop_pg_database
from tether.embedded import AgentProcess, ManagedProcess, Plane, free_port, spawn, start_agent, wait_until

DAGS = Path(__file__).parent / "dags_logs"
CAP = 256 * 1024
SECRET = "s3cr3t-only-on-the-agent"


@dataclass
class Logs:
    plane: Plane
    token: str
    second_api: str
    worker: AgentProcess

    def read(
        self,
        dag_id: str,
        run_id: str,
        task_id: str,
        try_number: int = 1,
        *,
        base: str | None = None,
        until_scheduled: bool = False,
    ) -> Any:
        """The log's content; with ``until_scheduled``, none while the scheduler has yet to make the try (a 404)."""
        with self.plane.rest_client(base=base) as api:
            response = api.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}")
            if until_scheduled and response.status_code == 404:
                return []
            response.raise_for_status()
            return response.json()["content"]


def events(content: list[Any]) -> list[str]:
    return [str(item.get("event", "")) for item in content]


def sources(content: list[Any]) -> str:
    """The collapsed "Log message source details" group Airflow puts first."""
    return " ".join(str(item.get("sources", "")) for item in content if "sources" in item) or json.dumps(content[:3])


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory, pg_admin_url: str) -> Iterator[Logs]:
    url = create_pg_database(pg_admin_url)
    plane = Plane(
        home=tmp_path_factory.mktemp("logs") / "plane",
        dags_folder=DAGS,
        sql_alchemy_conn=url,
        extra_env={
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__TETHER__TASK_LOG_MAX_BYTES": str(CAP),
            "AIRFLOW__TETHER__HEARTBEAT_INTERVAL": "2",
            "AIRFLOW__TETHER__MISSED_HEARTBEATS": "3",
        },
    )
    second: ManagedProcess | None = None
    try:
        plane.migrate()
        token = plane.create_token("logs")
        plane.start()
        # A second API server replica on the same database: logs are read there too.
        port = free_port()
        env = {**plane.env, "AIRFLOW__API__PORT": str(port)}
        second = spawn("api-server-2", [str(plane.bin_dir / "airflow"), "api-server"], env, plane.home / "logs")
        second_url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _answers(f"{second_url}/api/v2/monitor/health"), 180, "the second API server")
        worker = start_agent(
            plane,
            "shipper",
            token,
            queues="default",
            slots="4",
            env={"AIRFLOW_CONN_AGENT_ONLY_DB": json.dumps({"conn_type": "postgres", "password": SECRET})},
        )
        wait_until(lambda: worker.health("/readyz") == 200, 120, "the agent ready")
        yield Logs(plane=plane, token=token, second_api=second_url, worker=worker)
    finally:
        if second is not None:
            second.stop()
        plane.stop()
        drop_pg_database(pg_admin_url, url)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _run(logs: Logs, dag_id: str) -> str:
    logs.plane.wait_for_dag(dag_id)
    return logs.plane.trigger(dag_id)


def test_a_thousand_lines_read_back_whole_and_in_order_from_either_api_server(logs: Logs) -> None:
    run_id = _run(logs, "logs_thousand")
    assert logs.plane.wait_for_run("logs_thousand", run_id) == "success"
    expected = [f"line {i:04d} of 1000" for i in range(1000)]

    def printed(base: str) -> list[str]:
        return [e for e in events(logs.read("logs_thousand", run_id, "thousand", base=base)) if e.startswith("line ")]

    wait_until(lambda: printed(logs.plane.url) == expected, 60, "the 1000 lines on the first API server")
    assert printed(logs.second_api) == expected
    content = logs.read("logs_thousand", run_id, "thousand")
    assert "Tether: " in sources(content) and "served logs" not in sources(content).lower()


def test_a_running_tasks_lines_are_readable_while_it_runs(logs: Logs) -> None:
    run_id = _run(logs, "logs_live")
    seen: dict[str, float] = {}
    delays: list[float] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(seen) < 12:
        # Read from the trigger on: the try does not exist until the scheduler makes it.
        for event in events(logs.read("logs_live", run_id, "tick", until_scheduled=True)):
            if event.startswith("tick ") and event not in seen:
                seen[event] = time.time()
                delays.append(seen[event] - float(event.rsplit(" ", 1)[1]))
        state = logs.plane.task_states("logs_live", run_id).get("tick")
        if state == "success":
            break
        time.sleep(0.25)
    while_running = [event for event, at in seen.items() if at < _end_of(logs, "logs_live", run_id, "tick")]
    assert len(while_running) >= 8, f"only {len(while_running)} of 12 lines were readable while the task ran"
    print(f"\nlive log delay over {len(delays)} lines: p50 {statistics.median(delays):.2f}s max {max(delays):.2f}s")


def _end_of(logs: Logs, dag_id: str, run_id: str, task_id: str) -> float:
    rows = logs.plane.query(
        "SELECT end_date FROM task_instance WHERE dag_id = :d AND run_id = :r AND task_id = :t",
        d=dag_id,
        r=run_id,
        t=task_id,
    )
    end = rows[0][0] if rows else None
    return end.timestamp() if end is not None else float("inf")


def test_a_log_past_the_cap_is_cut_with_a_notice_and_the_plane_stays_healthy(logs: Logs) -> None:
    run_id = _run(logs, "logs_flood")
    assert logs.plane.wait_for_run("logs_flood", run_id) == "success"
    assert httpx.get(f"{logs.plane.url}/tether/v1/health", timeout=5).status_code == 200

    def notice() -> str | None:
        found = [e for e in events(logs.read("logs_flood", run_id, "flood")) if "Tether cut this log here" in e]
        return found[0] if found else None

    assert f"task_log_max_bytes ({CAP} bytes)" in (wait_until(notice, 60, "the truncation notice") or "")
    stored = logs.plane.query(
        "SELECT bytes, truncated FROM tether_task_log WHERE dag_id = 'logs_flood' AND run_id = :r", r=run_id
    )
    assert stored[0][0] <= CAP and stored[0][1]


def test_a_connection_password_printed_by_a_task_is_masked_in_what_the_plane_stores(logs: Logs) -> None:
    run_id = _run(logs, "logs_secret")
    assert logs.plane.wait_for_run("logs_secret", run_id) == "success"
    line = wait_until(
        lambda: next((e for e in events(logs.read("logs_secret", run_id, "leak")) if "the password is" in e), None),
        60,
        "the password line",
    )
    assert SECRET not in line and "***" in line
    stored = " ".join(row[0] for row in logs.plane.query("SELECT data FROM tether_task_log_chunk"))
    assert "the password is ***" in stored and SECRET not in stored


def test_lines_written_before_an_agent_is_killed_are_readable_and_the_log_says_where_it_ends(logs: Logs) -> None:
    victim = start_agent(logs.plane, "victim", logs.token, queues="victim", slots="1")
    orphans: list[psutil.Process] = []
    try:
        wait_until(lambda: victim.health("/readyz") == 200, 120, "the victim agent ready")
        run_id = _run(logs, "logs_killed")

        def lingering() -> list[str]:
            content = logs.read("logs_killed", run_id, "linger", until_scheduled=True)
            return [e for e in events(content) if e.startswith("lingering")]

        wait_until(lambda: len(lingering()) >= 10, 120, "ten lines shipped")
        orphans = psutil.Process(victim.process.pid).children(recursive=True)
        victim.process.signal(signal.SIGKILL)
        killed_at = time.time()
        shipped = len(lingering())
        assert logs.plane.wait_for_run("logs_killed", run_id, timeout=180) == "failed"
        content = events(logs.read("logs_killed", run_id, "linger"))
        kept = [e for e in content if e.startswith("lingering")]
        # What was shipped before the kill is all there, in order; the task wrote two lines a second.
        assert kept[:shipped] == [f"lingering {i:03d}" for i in range(shipped)]
        assert len(kept) >= shipped
        assert "Tether: the log ends here. Agent victim sent nothing more" in content[-1]
        print(f"\nkilled at {killed_at:.0f}: {len(kept)} lines readable, {shipped} seen before the kill")
    finally:
        victim.process.stop()
        for process in orphans:
            with contextlib.suppress(psutil.Error):
                process.kill()


def test_an_agent_that_keeps_its_logs_says_where_they_are_and_nothing_waits_on_its_address(logs: Logs) -> None:
    keeper = start_agent(logs.plane, "keeper", logs.token, queues="local", slots="1", task_logs="local")
    try:
        wait_until(lambda: keeper.health("/readyz") == 200, 120, "the keeper agent ready")
        run_id = _run(logs, "logs_local")
        assert logs.plane.wait_for_run("logs_local", run_id) == "success"
        started = time.monotonic()

        def noted() -> list[Any] | None:
            content = logs.read("logs_local", run_id, "stays")
            return content if any("stays on agent keeper" in e for e in events(content)) else None

        content = wait_until(noted, 60, "the note where the log is")
        note = next(e for e in events(content) if "stays on agent keeper" in e)
        assert "--task-logs local" in note and "task-logs" in note and ".log" in note
        assert "this line stays on the agent" not in " ".join(events(content))
        # The view was answered without a fetch from the agent's address (Airflow lists such a fetch as a source).
        assert "served" not in sources(content).lower() and ":8793" not in sources(content)
        print(f"\nthe log view of a try whose log stayed on its agent answered in {time.monotonic() - started:.2f}s")
    finally:
        keeper.process.stop()


def test_a_tries_log_goes_when_airflow_cleans_the_try_away(logs: Logs) -> None:
    from sqlalchemy import create_engine, text
    from sqlalchemy.orm import sessionmaker

    from tether.plane.config import PlaneSettings
    from tether.plane.store import Store

    kept_run, gone_run = _run(logs, "logs_thousand"), _run(logs, "logs_thousand")
    for run_id in (kept_run, gone_run):
        assert logs.plane.wait_for_run("logs_thousand", run_id) == "success"

    def shipped(run_id: str) -> int:
        rows = logs.plane.query("SELECT count(*) FROM tether_task_log WHERE run_id = :r", r=run_id)
        return int(rows[0][0])

    wait_until(lambda: shipped(kept_run) == 1 and shipped(gone_run) == 1, 60, "both logs on the plane")
    engine = create_engine(logs.plane.sql_alchemy_conn)
    try:
        # As `airflow db clean` does: the run's task instances go.
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM task_instance WHERE run_id = :r"), {"r": gone_run})
        store = Store(sessionmaker(bind=engine, expire_on_commit=False), settings=PlaneSettings())
        assert store.purge_task_logs() >= 1
    finally:
        engine.dispose()
    assert (shipped(kept_run), shipped(gone_run)) == (1, 0)
    chunks = logs.plane.query(
        "SELECT count(*) FROM tether_task_log_chunk c JOIN task_instance t ON CAST(t.id AS TEXT) = c.ti_id "
        "WHERE t.run_id = :r",
        r=kept_run,
    )
    assert chunks[0][0] > 0
