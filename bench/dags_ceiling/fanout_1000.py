"""One thousand trivial tasks with no dependencies between them: the scheduler's ceiling."""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, task


@task
def leaf() -> None:
    pass


with DAG(dag_id="fanout_1000", schedule=None, start_date=pendulum.datetime(2024, 1, 1), catchup=False):
    for i in range(1000):
        leaf.override(task_id=f"leaf_{i:04d}")()
