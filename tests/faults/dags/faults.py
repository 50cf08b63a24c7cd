"""DAGs of the fault scenarios: each scenario has a queue of its own, so agents of one never take another's work."""

from __future__ import annotations

import os
import time
from datetime import timedelta

from airflow.sdk import dag, get_current_context, task


def _sleeper(dag_id: str, queue: str, seconds: float, *, retries: int = 0, copies: int = 1) -> None:
    @dag(dag_id=dag_id, schedule=None, catchup=False, max_active_tasks=256)
    def sleeper():
        @task(queue=queue, retries=retries, retry_delay=timedelta(seconds=1))
        def nap() -> float:
            # Only the first try is long: a retry exists to prove the task ran again, not to wait again.
            pause = seconds if get_current_context()["ti"].try_number == 1 else 1
            time.sleep(pause)
            return pause

        for i in range(copies):
            nap.override(task_id=f"nap_{i}" if copies > 1 else "nap")()

    sleeper()


def _held(dag_id: str, queue: str) -> None:
    """A task that finishes when the test says so: once the file named by FAULTS_RELEASE exists."""

    @dag(dag_id=dag_id, schedule=None, catchup=False)
    def held():
        @task(queue=queue, retries=0)
        def wait_for_release() -> str:
            release = os.environ["FAULTS_RELEASE"]
            deadline = time.monotonic() + 120
            while not os.path.exists(release) and time.monotonic() < deadline:
                time.sleep(0.1)
            return "released"

        wait_for_release()

    held()


# 1. kill -9: one long task to fail over, and short ones to be leased but never started.
_sleeper("faults_kill_long", "killq", 60, retries=1)
_sleeper("faults_kill_short", "killq", 1, copies=3)
# 2. SIGTERM: a task drained to completion once the test releases it, then one that outlives the drain timeout.
_held("faults_drain", "drainq")
_sleeper("faults_drain_cut", "drainq2", 30, retries=1)
# 3. API server restart; 4. scheduler restart.
_sleeper("faults_api_restart", "apiq", 45)
_sleeper("faults_sched_running", "schedq", 25)
_sleeper("faults_sched_waiting", "schedq", 1, copies=4)
# 5. partitions: a short one the task outlives (it finishes while the agent is cut off), a long one the plane acts on.
_held("faults_partition_short", "partq")
_sleeper("faults_partition_long", "partq2", 40, retries=1)
# 7. a lease never confirmed.
_sleeper("faults_unconfirmed", "leaseq", 1)
# 8. a frozen agent.
_sleeper("faults_frozen", "frozenq", 25, retries=1)
# 9. a frozen plane.
_sleeper("faults_plane_pause", "pauseq", 35)


@dag(dag_id="faults_many", schedule=None, catchup=False, max_active_tasks=256)
def faults_many():
    """6. 200 trivial jobs for two agents on one queue."""

    @task(queue="manyq", retries=0)
    def tick(i: int) -> int:
        return i

    tick.expand(i=list(range(200)))


faults_many()


_sleeper("faults_bad_input", "badq", 1)

_sleeper("faults_listener", "listenq", 0.5)

_sleeper("faults_fenced", "fenceq", 120)

_sleeper("faults_attacks", "attackq", 0.5)

_sleeper("faults_fuzz", "fuzzq", 0.1, copies=20)
