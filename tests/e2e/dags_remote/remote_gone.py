"""A DAG whose file the tests delete: it must go stale on the plane."""

from __future__ import annotations

from airflow.sdk import dag, task


@dag(schedule=None, catchup=False)
def remote_gone():
    @task
    def noop() -> None:
        pass

    noop()


remote_gone()
