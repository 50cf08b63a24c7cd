"""200 tasks on queue ``scale``, each working for 3 seconds: the work of the autoscaling run."""

from __future__ import annotations

import time

from airflow.sdk import dag, task


@task(queue="scale", retries=0)
def work(i: int) -> int:
    time.sleep(3)
    return i


@dag(dag_id="autoscale_200", schedule=None, catchup=False, max_active_tasks=256)
def autoscale() -> None:
    work.expand(i=list(range(200)))


autoscale()
