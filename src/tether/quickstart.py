"""The quick start: an embedded SQLite plane, one agent, the example DAG run to success.

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
    dags = copy_example_dags(home / "dags")
    plane = Plane(home=home / "plane", dags_folder=dags, sql_alchemy_conn=f"sqlite:///{home / 'plane' / 'airflow.db'}")
    try:
        _step(f"creating the plane's database in {plane.home}", started)
        plane.migrate()
        token = plane.create_token("quickstart")
        _step("starting the API server, scheduler and DAG processor", started)
        plane.start()
        _step(f"plane up at {plane.url}; starting agent 'quickstart-agent'", started)
        agent = start_agent(plane, "quickstart-agent", token, queues="default", slots="4")
        wait_until(
            lambda: agent.health("/readyz") == 200 or not agent.process.alive(),
            120,
            "the agent did not become ready",
        )
        if not agent.process.alive():
            raise RuntimeError("the agent exited")
        _step("agent registered and ready; waiting for the example DAG to be parsed", started)
        plane.wait_for_dag(DAG_ID)
        run_id = plane.trigger(DAG_ID)
        _step(f"triggered {DAG_ID} (run {run_id})", started)
        state = plane.wait_for_run(DAG_ID, run_id, timeout=300)
        tasks = plane.task_states(DAG_ID, run_id)
        agents = {row[0] for row in plane.query("SELECT DISTINCT agent_name FROM tether_job")}
        _step(f"DAG run finished: {state}", started)
        for task_id, task_state in sorted(tasks.items()):
            print(f"    {task_id:<12} {task_state}")
        print(f"    ran on agent(s): {', '.join(sorted(a for a in agents if a))}")
        if state != "success":
            print(f"FAILED: the example DAG ended {state}; logs are in {plane.home / 'logs'}", file=sys.stderr)
            return 1
        print(f"SUCCESS: {DAG_ID} ran on a Tether agent in {time.monotonic() - started:.1f}s")
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
