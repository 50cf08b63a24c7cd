"""DAGs for the Remote Agents pages' browser tests: one long enough to see running, one quick."""

from __future__ import annotations

import time

from airflow.sdk import dag, task


def _sleepy(dag_id: str, seconds: int) -> None:
    @dag(dag_id=dag_id, schedule=None, catchup=False)
    def sleepy():
        @task(queue="uiq", retries=0)
        def nap() -> int:
            time.sleep(seconds)
            return seconds

        nap()

    sleepy()


_sleepy("ui_long", 10)
_sleepy("ui_quick", 1)
