"""DAGs for the plane's metrics: a short task, and one long enough for its agent to die under it."""

from __future__ import annotations

import time

from airflow.sdk import dag, task


@dag(dag_id="e2e_metrics", schedule=None, catchup=False)
def quick() -> None:
    @task(queue="metricsq", retries=0)
    def hello() -> str:
        # Longer than the executor's 5 s between gauges, so that one of them sees the queue busy.
        time.sleep(7)
        return "hello"

    hello()


@dag(dag_id="e2e_metrics_doomed", schedule=None, catchup=False)
def doomed() -> None:
    @task(queue="doomedq", retries=0)
    def long_nap() -> None:
        time.sleep(300)

    long_nap()


quick()
doomed()
