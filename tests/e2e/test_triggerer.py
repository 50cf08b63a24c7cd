"""Triggers on agents, end to end: a plane with no triggerer, no DAG files and no trigger code runs deferred tasks.

Real processes on PostgreSQL: Airflow's API server and scheduler only, a
``tether-agent dag-processor``, a worker and ``tether-agent triggerer`` agents.
The triggers' module and the connection they read are on the agents alone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import create_pg_database, drop_pg_database
from tether.embedded import AgentProcess, Plane, start_agent, wait_until

HERE = Path(__file__).parent
pytestmark = pytest.mark.timeout(900)

AGENT_ONLY_CONN = json.dumps({"conn_type": "http", "host": "agent-only.internal"})


@dataclass
class Triggers:
    plane: Plane
    token: str
    evidence: Path
    env: dict[str, str]
    triggerers: dict[str, AgentProcess]

    def start_triggerer(self, name: str, **settings: str) -> AgentProcess:
        agent = start_agent(self.plane, name, self.token, command="triggerer", env=self.env, **settings)
        wait_until(lambda: agent.health("/readyz") == 200, 120, f"triggerer {name} ready")
        self.triggerers[name] = agent
        return agent

    def run(self, dag_id: str, timeout: float = 240) -> tuple[str, str]:
        self.plane.wait_for_dag(dag_id)
        run_id = self.plane.trigger(dag_id)
        return run_id, self.plane.wait_for_run(dag_id, run_id, timeout=timeout)

    def ti(self, dag_id: str, run_id: str, task_id: str = "wait") -> dict[str, Any]:
        rows = self.plane.query(
            "SELECT state, try_number FROM task_instance WHERE dag_id = :d AND run_id = :r AND task_id = :t",
            d=dag_id,
            r=run_id,
            t=task_id,
        )
        return dict(rows[0]._mapping)

    def xcom(self, dag_id: str, run_id: str, key: str = "return_value", task_id: str = "wait") -> Any:
        with self.plane.rest_client() as api:
            answer = api.get(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}")
        assert answer.status_code == 200, answer.text
        return answer.json()["value"]

    def log(self, dag_id: str, run_id: str, task_id: str = "wait", try_number: int = 1) -> str:
        with self.plane.rest_client() as api:
            answer = api.get(
                f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
                headers={"Accept": "application/json"},
            )
        assert answer.status_code == 200, answer.text
        return json.dumps(answer.json())

    def log_with(self, dag_id: str, run_id: str, text: str, timeout: float = 60) -> str:
        """The try's log once it holds ``text``."""
        found: str = wait_until(
            lambda: log if text in (log := self.log(dag_id, run_id)) else None, timeout, f"{text!r} in the log"
        )
        return found

    def holders(self, dag_id: str, run_id: str) -> dict[str, int]:
        """Triggers of the run's deferred tasks, counted by the agent whose triggerer job holds them."""
        rows = self.plane.query(
            "SELECT a.name, count(*) FROM task_instance ti JOIN trigger t ON t.id = ti.trigger_id "
            "JOIN tether_triggerer r ON r.job_id = t.triggerer_id JOIN tether_agent a ON a.id = r.agent_id "
            "WHERE ti.dag_id = :d AND ti.run_id = :r AND ti.state = 'deferred' GROUP BY a.name",
            d=dag_id,
            r=run_id,
        )
        return {name: count for name, count in rows}


@pytest.fixture(scope="module")
def triggers(tmp_path_factory: pytest.TempPathFactory, pg_admin_url: str) -> Iterator[Triggers]:
    root = tmp_path_factory.mktemp("triggers")
    url = create_pg_database(pg_admin_url)
    nothing = root / "plane-dags"
    nothing.mkdir()
    plane = Plane(
        home=root / "plane",
        dags_folder=nothing,
        sql_alchemy_conn=url,
        extra_env={
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
            "AIRFLOW__TETHER__HEARTBEAT_INTERVAL": "1",
            "AIRFLOW__CORE__TEST_CONNECTION": "Enabled",
            "AIRFLOW__TRIGGERER__QUEUES_ENABLED": "True",
        },
    )
    dags = shutil.copytree(HERE / "dags_triggers", root / "agent-dags")
    evidence = root / "evidence"
    evidence.mkdir()
    bundles = [
        {"name": "dags-folder", "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle",
         "kwargs": {"path": str(dags), "refresh_interval": 1}},
    ]  # fmt: skip
    env = {
        "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": json.dumps(bundles),
        "PYTHONPATH": os.pathsep.join([str(HERE / "triggers_agent"), os.environ.get("PYTHONPATH", "")]),
        "AIRFLOW_CONN_TETHER_AGENT_ONLY": AGENT_ONLY_CONN,
        "TETHER_TEST_EVIDENCE": str(evidence),
        "TETHER_HEARTBEAT_INTERVAL": "1",
        # Deferring tasks give their triggers their queue; triggerer agents run their queues' triggers.
        "AIRFLOW__TRIGGERER__QUEUES_ENABLED": "True",
    }
    agents: dict[str, AgentProcess] = {}
    try:
        plane.migrate()
        plane.airflow("variables", "set", "tether_e2e_greeting", "hello from the plane")
        token = plane.create_token("triggers", scopes=("worker", "dag-processor", "triggerer"))
        plane.start(("api-server", "scheduler"))
        agents["parser"] = start_agent(plane, "parser", token, command="dag-processor", env=env)
        agents["worker"] = start_agent(plane, "worker", token, env=env, queues="default,special", slots="8")
        for agent in agents.values():
            wait_until(lambda a=agent: a.health("/readyz") == 200, 120, f"agent {agent.name} ready")
        deployment = Triggers(plane, token, evidence, env, {})
        deployment.start_triggerer("trig-a")
        yield deployment
    finally:
        plane.stop()
        drop_pg_database(pg_admin_url, url)


def test_the_plane_runs_no_triggerer_and_has_no_trigger_code(triggers: Triggers) -> None:
    assert set(triggers.plane.processes) >= {"api-server", "scheduler"}
    assert not {"triggerer", "dag-processor"} & set(triggers.plane.processes)
    assert list(triggers.plane.dags_folder.iterdir()) == []
    probe = subprocess.run(
        [str(triggers.plane.bin_dir / "python"), "-c", "import tether_e2e_triggers"],
        env=triggers.plane.env,
        capture_output=True,
        timeout=60,
    )
    assert probe.returncode != 0, "the plane's processes cannot import the triggers' module"
    jobs = triggers.plane.query("SELECT hostname, state FROM job WHERE job_type = 'TriggererJob'")
    assert [state for _, state in jobs] == ["running"], "the agent's triggerer job is Airflow's only one"


def test_a_trigger_reads_an_agent_only_connection_and_a_plane_variable(triggers: Triggers) -> None:
    run_id, state = triggers.run("trigger_secrets")
    assert state == "success"
    assert triggers.ti("trigger_secrets", run_id) == {"state": "success", "try_number": 1}
    assert triggers.xcom("trigger_secrets", run_id) == {
        "host": "agent-only.internal",
        "variable": "hello from the plane",
        "at": "2026-01-02T00:00:00+00:00",
    }


def test_the_trigger_log_is_in_the_tries_log_on_the_plane(triggers: Triggers) -> None:
    run_id, state = triggers.run("trigger_secrets")
    assert state == "success"
    log = triggers.log_with("trigger_secrets", run_id, "the trigger sees host")
    assert "agent-only.internal" in log


def test_a_payload_of_an_agent_only_class_reaches_the_task_as_airflow_passes_it(triggers: Triggers) -> None:
    run_id, state = triggers.run("trigger_receipt")
    assert state == "success"
    # Airflow's trigger runner hands its supervisor a dataclass's fields; the plane imports nothing of it.
    assert triggers.xcom("trigger_receipt", run_id) == {"host": "trig-a", "note": "agent-only class"}


def test_airflows_own_deferrable_sensor_waits_on_an_agent(triggers: Triggers) -> None:
    run_id, state = triggers.run("trigger_sensor")
    assert state == "success"
    assert triggers.ti("trigger_sensor", run_id)["try_number"] == 1


def test_a_task_can_end_on_the_triggerer(triggers: Triggers) -> None:
    run_id, state = triggers.run("trigger_end")
    assert state == "success"
    # Pushed by Airflow's own code on the plane, which stores the value JSON-encoded.
    assert json.loads(triggers.xcom("trigger_end", run_id, key="ended")) == "on the triggerer"
    # It did not run again on a worker: its only job is the one that deferred.
    ran = triggers.plane.query("SELECT count(*) FROM tether_job WHERE run_id = :r", r=run_id)
    assert ran[0][0] == 1


def test_a_failing_trigger_fails_its_task_with_the_error(triggers: Triggers) -> None:
    run_id, state = triggers.run("trigger_broken")
    assert state == "failed"
    assert triggers.ti("trigger_broken", run_id)["state"] == "failed"
    log = triggers.log_with("trigger_broken", run_id, "the trigger broke")
    assert "RuntimeError" in log


def test_deadline_callbacks_run_on_agents(triggers: Triggers) -> None:
    run_id, state = triggers.run("deadline_missed")
    assert state == "success"
    sync = json.loads(
        wait_until(lambda: _read(triggers.evidence / f"deadline-sync-{run_id}"), 60, "the synchronous callback")
    )
    # Airflow hands it to the executor: a worker agent ran it, and it could read a Variable of the plane.
    assert sync == {"agent": "worker", "variable": "hello from the plane", "flavour": "sync"}
    late = json.loads(
        wait_until(lambda: _read(triggers.evidence / f"deadline-async-{run_id}"), 60, "the asynchronous callback")
    )
    assert late["agent"].startswith("trig-") and late["flavour"] == "async"
    states = wait_until(
        lambda: (
            (rows := triggers.plane.query("SELECT type, state FROM callback"))
            and all(r.state == "success" for r in rows)
            and rows
        ),
        60,
        "the callbacks recorded as successful",
    )
    assert {row.type for row in states} == {"executor", "triggerer"}
    jobs = triggers.plane.query("SELECT kind, agent_name, state FROM tether_job WHERE kind = 'callback'")
    assert [tuple(row) for row in jobs] == [("callback", "worker", "SUCCESS")]


def test_the_uis_connection_test_runs_on_an_agent(triggers: Triggers) -> None:
    there = triggers.evidence / "only-on-the-agents"
    there.mkdir(exist_ok=True)
    with triggers.plane.rest_client() as api:
        queued = api.post(
            "/connections/enqueue-test",
            json={"connection_id": "tether_fs", "conn_type": "fs", "extra": json.dumps({"path": str(there)})},
        )
        assert queued.status_code == 202, queued.text
        token = queued.json()["token"]

        def result() -> dict[str, Any] | None:
            answer = api.get("/connections/enqueue-test", headers={"Airflow-Connection-Test-Token": token}).json()
            return answer if answer["state"] in ("success", "failed") else None

        outcome = wait_until(result, 120, "the connection test's result")
    assert outcome["state"] == "success"
    assert outcome["result_message"] == f"Path {there} is existing."
    jobs = triggers.plane.query("SELECT agent_name FROM tether_job WHERE kind = 'connection_test'")
    assert [row[0] for row in jobs] == ["worker"]


def _read(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


def test_a_trigger_waits_for_a_triggerer_of_its_queue(triggers: Triggers) -> None:
    plane = triggers.plane
    plane.wait_for_dag("trigger_queued")
    run_id = plane.trigger("trigger_queued")

    def trigger() -> Any:
        rows = plane.query(
            "SELECT t.queue, t.triggerer_id FROM trigger t JOIN task_instance ti ON ti.trigger_id = t.id "
            "WHERE ti.dag_id = 'trigger_queued' AND ti.run_id = :r",
            r=run_id,
        )
        return rows[0] if rows else None

    assert wait_until(trigger, 120, "the deferred task's trigger").queue == "special"
    # trig-a runs the default queue only: in a few of its loads it does not take the trigger ...
    time.sleep(5)
    assert trigger().triggerer_id is None
    # ... which a triggerer of the queue takes at once.
    triggers.start_triggerer("trig-special", queues="special")
    assert plane.wait_for_run("trigger_queued", run_id) == "success"
    assert triggers.xcom("trigger_queued", run_id) == {"host": "trig-special", "note": "agent-only class"}


def _metric(agent: AgentProcess, name: str) -> float:
    for line in agent.metrics().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_the_agent_counts_triggers_outcomes_and_blocked_loop_warnings(triggers: Triggers) -> None:
    agent = triggers.triggerers["trig-a"]
    fired = _metric(agent, 'tether_agent_trigger_outcomes_total{outcome="fired"}')
    blocked = _metric(agent, "tether_agent_trigger_loop_blocked_total")
    _, state = triggers.run("trigger_blocking")
    assert state == "success"
    assert _metric(agent, "tether_agent_trigger_loop_blocked_total") >= blocked + 1
    assert _metric(agent, 'tether_agent_trigger_outcomes_total{outcome="fired"}') == fired + 1
    assert "tether_agent_triggers_running " in agent.metrics()


def test_killed_triggerer_s_triggers_move_to_another_and_fire_once(triggers: Triggers) -> None:
    plane = triggers.plane
    plane.wait_for_dag("trigger_many")
    run_id = plane.trigger("trigger_many")
    wait_until(lambda: triggers.holders("trigger_many", run_id) == {"trig-a": 20}, 180, "20 triggers on trig-a")
    triggers.start_triggerer("trig-b")
    killed = psutil.Process(triggers.triggerers["trig-a"].process.pid)
    runner = killed.children()
    assert runner, "trig-a runs its triggers in a trigger runner process"
    killed.kill()
    # Its trigger runner, orphaned, stops too: nothing of trig-a runs its triggers any more.
    _, alive = psutil.wait_procs(runner, timeout=30)
    assert alive == []
    # The positive control: the triggers move, all of them, to the agent still alive.
    wait_until(lambda: triggers.holders("trigger_many", run_id) == {"trig-b": 20}, 120, "20 triggers on trig-b")
    (triggers.evidence / f"flag-{run_id}").touch()
    assert plane.wait_for_run("trigger_many", run_id, timeout=240) == "success"
    resumed = {n: (triggers.evidence / f"resumed-{run_id}-{n}").read_text().split() for n in range(20)}
    assert all(len(pids) == 1 for pids in resumed.values()), resumed
    tries = plane.query("SELECT DISTINCT try_number FROM task_instance WHERE run_id = :r", r=run_id)
    assert [row[0] for row in tries] == [1]
    fired = plane.query(
        "SELECT count(*) FROM tether_trigger_outcome o JOIN tether_triggerer r ON r.job_id = o.job_id "
        "JOIN tether_agent a ON a.id = r.agent_id WHERE a.name = 'trig-b'"
    )
    assert fired[0][0] >= 20


def _stop(agent: AgentProcess) -> datetime:
    """SIGTERM, and the time the process had exited by."""
    agent.process.signal(signal.SIGTERM)
    assert agent.process.popen.wait(60) == 0
    return datetime.now(UTC)


def _job_of(plane: Plane, agent: str) -> int:
    rows = plane.query(
        "SELECT r.job_id FROM tether_triggerer r JOIN tether_agent a ON a.id = r.agent_id WHERE a.name = :n", n=agent
    )
    return int(rows[0][0])


def test_a_stopped_triggerer_hands_its_triggers_over_before_it_exits(triggers: Triggers) -> None:
    plane = triggers.plane
    for name in [n for n, a in triggers.triggerers.items() if a.process.alive()]:
        _stop(triggers.triggerers.pop(name))
    triggers.start_triggerer("trig-c")
    run_id = plane.trigger("trigger_many")
    wait_until(lambda: triggers.holders("trigger_many", run_id) == {"trig-c": 20}, 180, "20 triggers on trig-c")
    job_id = _job_of(plane, "trig-c")
    triggers.start_triggerer("trig-d")
    exited = _stop(triggers.triggerers["trig-c"])
    # Its job ended, and its triggers went back, before the process exited: the agent said so, no sweep
    # (which waits for the agent's silence) did it.
    ended = plane.query("SELECT state, end_date FROM job WHERE id = :j", j=job_id)[0]
    assert ended.state == "success"
    assert ended.end_date <= exited
    wait_until(lambda: triggers.holders("trigger_many", run_id) == {"trig-d": 20}, 60, "20 triggers on trig-d")
    (triggers.evidence / f"flag-{run_id}").touch()
    assert plane.wait_for_run("trigger_many", run_id, timeout=240) == "success"
