"""The quick start: an embedded SQLite plane with no DAG files, three agents, the example DAG run to success.

The plane runs Airflow's API server and scheduler only: no DAG folder, no DAG
processor, no triggerer. One agent parses the example DAG where the file is (the
dag-processor role), another runs its tasks (a worker), a third runs the trigger
of its deferred wait (a triggerer).

python -m tether.quickstart [--keep]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from tether.embedded import Plane, copy_example_dags, start_agent, wait_until

DAG_ID = "tether_example"


def _step(message: str, started: float) -> None:
    print(f"[{time.monotonic() - started:6.1f}s] {message}", flush=True)


def run(home: Path) -> int:
    started = time.monotonic()
    dags = copy_example_dags(home / "agent-dags")
    nothing = home / "plane-dags"
    nothing.mkdir(parents=True, exist_ok=True)
    plane = Plane(
        home=home / "plane", dags_folder=nothing, sql_alchemy_conn=f"sqlite:///{home / 'plane' / 'airflow.db'}"
    )
    # The agents' DAG folder; the plane's stays empty.
    agent_dags = {"AIRFLOW__CORE__DAGS_FOLDER": str(dags)}
    try:
        _step(f"creating the plane's database in {plane.home}", started)
        plane.migrate()
        # One token for the three roles here; in production, give each role a token of its own (--scope).
        token = plane.create_token("quickstart", scopes=("dag-processor", "worker", "triggerer"))
        _step("starting the API server and the scheduler (no DAG files, no DAG processor, no triggerer)", started)
        plane.start(("api-server", "scheduler"))
        _step(f"plane up at {plane.url}; starting agents 'quickstart-parser', '-worker' and '-triggerer'", started)
        agents = [
            start_agent(plane, "quickstart-parser", token, command="dag-processor", env=agent_dags),
            start_agent(plane, "quickstart-worker", token, env=agent_dags, queues="default", slots="4"),
            start_agent(plane, "quickstart-triggerer", token, command="triggerer", env=agent_dags),
        ]
        for agent in agents:
            wait_until(
                lambda agent=agent: agent.health("/readyz") == 200 or not agent.process.alive(),
                120,
                f"agent {agent.name} did not become ready",
            )
            if not agent.process.alive():
                raise RuntimeError(f"agent {agent.name} exited")
        _step(f"agents ready; waiting for the example DAG, parsed on the agent side, in {dags}", started)
        plane.wait_for_dag(DAG_ID)
        run_id = plane.trigger(DAG_ID)
        _step(f"triggered {DAG_ID} (run {run_id})", started)
        state = plane.wait_for_run(DAG_ID, run_id, timeout=300)
        tasks = plane.task_states(DAG_ID, run_id)
        ran_on = {row[0] for row in plane.query("SELECT DISTINCT agent_name FROM tether_job")}
        ran_on |= {
            row[0]
            for row in plane.query(
                "SELECT DISTINCT a.name FROM tether_trigger_outcome o JOIN tether_triggerer r ON r.job_id = o.job_id "
                "JOIN tether_agent a ON a.id = r.agent_id"
            )
        }
        _step(f"DAG run finished: {state}", started)
        for task_id, task_state in sorted(tasks.items()):
            print(f"    {task_id:<12} {task_state}")
        print(f"    ran on agent(s): {', '.join(sorted(a for a in ran_on if a))}")
        if state != "success":
            print(f"FAILED: the example DAG ended {state}; logs are in {plane.home / 'logs'}", file=sys.stderr)
            return 1
        print(
            f"SUCCESS: {DAG_ID}, parsed, run and its wait triggered on Tether agents, with no DAG file on the plane, "
            f"in {time.monotonic() - started:.1f}s"
        )
        return 0
    except Exception as exc:
        print(f"FAILED: {exc}\nlogs are in {plane.home / 'logs'}", file=sys.stderr)
        for proc in plane.processes.values():
            print(f"--- {proc.name} (last lines) ---\n{proc.tail(15)}", file=sys.stderr)
        return 1
    finally:
        plane.stop()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tether.quickstart", description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the deployment's folder (logs, database)")
    args = parser.parse_args()
    if args.keep:
        home = Path(tempfile.mkdtemp(prefix="tether-quickstart-"))
        code = run(home)
        print(f"kept {home}")
        return code
    with tempfile.TemporaryDirectory(prefix="tether-quickstart-") as tmp:
        return run(Path(tmp))


if __name__ == "__main__":
    raise SystemExit(main())
