"""Ten trivial tasks in a chain: each task waits for the one before it."""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, chain, task


@task
def step() -> None:
    pass


with DAG(dag_id="chain_10", schedule=None, start_date=pendulum.datetime(2024, 1, 1), catchup=False):
    chain(*[step.override(task_id=f"step_{i:02d}")() for i in range(10)])
