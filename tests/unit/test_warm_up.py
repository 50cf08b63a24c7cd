"""A task's supervisor, a spare or a fork of a warmed-up agent, imports nothing the agent did not.

Every module a forked child imports costs each task its load time and a private
copy of its objects; so does what the SDK works out once per process and keeps
(msgspec's view of a frame type, the coordinators read from the configuration),
and so does an Airflow at-fork hook while the metadata-database engine that
importing Airflow configures is kept: it disposes the engine in every child.
The check runs in a fresh interpreter (what this test process happened to import
must not hide a missing warm-up): it starts a task's supervisor as the agent
does and, when the supervisor is about to tell the Execution API the task
started, records which modules it loaded after the fork and which of that
once-per-process work it did.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

_PROBE = textwrap.dedent(
    """
    import asyncio, json, os, signal, sys, uuid

    from airflow.executors.workloads import BundleInfo, ExecuteTask
    from airflow.executors.workloads.task import TaskInstanceDTO
    from airflow.sdk.execution_time import supervisor

    from tether.agent import runner as runner_module

    out, spares = sys.argv[1], int(sys.argv[2])
    before = set()
    real_warm_up = runner_module.warm_up

    #: Work a supervisor would otherwise redo in every task: (pid, what), as it happens.
    LOOKED_FOR = {
        "get_class_annotations": "msgspec learning a type",
        "from_config": "coordinators read",
        "dispose": "metadata engine disposed",
    }
    redone = []

    def watch(frame, event, arg):
        if event == "call" and frame.f_code.co_name in LOOKED_FOR:
            redone.append((os.getpid(), LOOKED_FOR[frame.f_code.co_name]))

    def warm_up_then_look(availability):
        # A spare is a copy of the agent as it was at the end of its warm-up.
        real_warm_up(availability)
        before.update(sys.modules)
        sys.setprofile(watch)

    runner_module.warm_up = warm_up_then_look

    def report_imports(self, **kwargs):
        # Instead of telling the Execution API: write down what the fork had to import or redo,
        # then do each of them once more to show that the watch sees them.
        import msgspec
        import sqlalchemy
        from airflow.sdk.execution_time.coordinator import CoordinatorManager

        redid = [what for pid, what in redone if pid == os.getpid()]
        msgspec.msgpack.Decoder(type("Control", (msgspec.Struct,), {"__annotations__": {"n": int}}))
        CoordinatorManager.from_config()
        sqlalchemy.create_engine("sqlite://").dispose(close=False)
        control = [what for pid, what in redone if pid == os.getpid()][len(redid):]
        with open(out, "w") as f:
            json.dump({"imported": sorted(set(sys.modules) - before), "redone": redid, "control": control}, f)
        self.kill(signal.SIGKILL)
        os._exit(0)

    supervisor.ActivitySubprocess._on_child_started = report_imports
    runner = runner_module.ForkRunner(execution_api_url="http://127.0.0.1:9/execution/", max_spares=spares)
    runner.start()
    if not spares:
        # A fork is a copy of the agent as it is when the task starts.
        before.update(sys.modules)
        sys.setprofile(watch)
    ti = TaskInstanceDTO(
        id=uuid.uuid4(), task_id="t", dag_id="d", run_id="r", try_number=1, map_index=-1,
        dag_version_id=uuid.uuid4(), queue="default", pool_slots=1, priority_weight=1,
    )
    workload = ExecuteTask(
        ti=ti, dag_rel_path="d.py", token="jwt", bundle_info=BundleInfo(name="dags-folder"),
        log_path="dag_id=d/run_id=r/task_id=t/attempt=1.log",
    )

    async def start_and_wait():
        process = await runner.spawn(workload.model_dump(mode="json"))
        return await asyncio.wait_for(process.wait(), 60)

    code = asyncio.run(start_and_wait())
    runner.close()
    sys.exit(code)
    """
)


@pytest.mark.parametrize("spares", [2, 0], ids=["spare", "fork"])
def test_a_forked_supervisor_imports_nothing_new(tmp_path: Path, spares: int) -> None:
    out = tmp_path / "imports.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(AIRFLOW_HOME=str(tmp_path), AIRFLOW__LOGGING__BASE_LOG_FOLDER=str(tmp_path / "logs"))
    probe = subprocess.run(
        [sys.executable, "-c", _PROBE, str(out), str(spares)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert json.loads(out.read_text()) == {
        "imported": [],
        "redone": [],
        "control": ["msgspec learning a type", "coordinators read", "metadata engine disposed"],
    }


def test_a_coordinator_configuration_the_sdk_refuses_leaves_the_rest_of_the_warm_up(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import json, sys
        from tether.agent import runner, sdk_internals

        preloaded = []
        sdk_internals.preload = lambda: preloaded.append(True)
        runner.warm_up(sdk_internals.check())
        from airflow.sdk.execution_time.coordinator import get_coordinator_manager
        try:
            get_coordinator_manager()
            refused = False
        except ValueError:
            refused = True
        print(json.dumps({"refused": refused, "preloaded": preloaded}))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(AIRFLOW_HOME=str(tmp_path), AIRFLOW__SDK__QUEUE_TO_COORDINATOR='{"default": "nowhere"}')
    probe = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr[-3000:]
    # The SDK still refuses it (each task reports that), and the preload after it ran.
    assert json.loads(probe.stdout.strip().splitlines()[-1]) == {"refused": True, "preloaded": [True]}
