"""A DAG for autoscaling demand: 50 tasks on queue demand_a and 5 on demand_b, each held at a gate.

A task waits until the file named by its run id exists in ``TETHER_E2E_GATES`` (set
in the agents' environment), then works for a second: a test sees the work held,
then opens the gate and watches it drain.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from airflow.sdk import dag, get_current_context, task


@task(retries=0)
def hold(i: int) -> int:
    gate = Path(os.environ.get("TETHER_E2E_GATES", "/nonexistent")) / get_current_context()["run_id"]
    deadline = time.monotonic() + 600
    while not gate.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1)
    return i


@dag(dag_id="e2e_demand", schedule=None, catchup=False, max_active_tasks=128)
def demand() -> None:
    hold.override(task_id="a", queue="demand_a").expand(i=list(range(50)))
    hold.override(task_id="b", queue="demand_b").expand(i=list(range(5)))


demand()
