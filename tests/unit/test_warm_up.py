"""A task's supervisor, forked from a warmed-up agent, imports nothing the agent did not.

Every module a forked child imports costs each task its load time and a private
copy of its objects. The check runs in a fresh interpreter (what this test
process happened to import must not hide a missing warm-up): it forks a task's
supervisor as the agent does and, when the supervisor is about to tell the
Execution API the task started, records which modules it loaded after the fork.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

_PROBE = textwrap.dedent(
    """
    import asyncio, json, os, signal, sys, uuid

    from airflow.executors.workloads import BundleInfo, ExecuteTask
    from airflow.executors.workloads.task import TaskInstanceDTO
    from airflow.sdk.execution_time import supervisor

    from tether.agent.runner import ForkRunner

    out = sys.argv[1]
    runner = ForkRunner(execution_api_url="http://127.0.0.1:9/execution/")
    before = set(sys.modules)

    def report_imports(self, **kwargs):
        # Instead of telling the Execution API: write down what the fork had to import.
        with open(out, "w") as f:
            json.dump(sorted(set(sys.modules) - before), f)
        self.kill(signal.SIGKILL)
        os._exit(0)

    supervisor.ActivitySubprocess._on_child_started = report_imports
    ti = TaskInstanceDTO(
        id=uuid.uuid4(), task_id="t", dag_id="d", run_id="r", try_number=1, map_index=-1,
        dag_version_id=uuid.uuid4(), queue="default", pool_slots=1, priority_weight=1,
    )
    workload = ExecuteTask(
        ti=ti, dag_rel_path="d.py", token="jwt", bundle_info=BundleInfo(name="dags-folder"),
        log_path="dag_id=d/run_id=r/task_id=t/attempt=1.log",
    )
    process = runner.spawn(workload.model_dump(mode="json"))
    sys.exit(asyncio.run(asyncio.wait_for(process.wait(), 60)))
    """
)


def test_a_forked_supervisor_imports_nothing_new(tmp_path: Path) -> None:
    out = tmp_path / "imports.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(AIRFLOW_HOME=str(tmp_path), AIRFLOW__LOGGING__BASE_LOG_FOLDER=str(tmp_path / "logs"))
    probe = subprocess.run(
        [sys.executable, "-c", _PROBE, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert json.loads(out.read_text()) == []
