"""DAGs for the operator scenarios: tasks long enough to act on while they run."""

from __future__ import annotations

import time

from airflow.sdk import dag, task


def _sleepy(dag_id: str, queue: str, seconds: int) -> None:
    @dag(dag_id=dag_id, schedule=None, catchup=False)
    def sleepy():
        @task(queue=queue, retries=0)
        def nap() -> int:
            time.sleep(seconds)
            return seconds

        nap()

    sleepy()


_sleepy("e2e_cordon_long", "cordonq", 12)
_sleepy("e2e_cordon_next", "cordonq", 1)
_sleepy("e2e_revoke", "revokeq", 120)
_sleepy("e2e_expire", "expireq", 120)
_sleepy("e2e_ranges", "rangeq", 1)
