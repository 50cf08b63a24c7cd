"""A second bundle defining a dag_id the first bundle owns: refused, the owner keeps it."""

from __future__ import annotations

from airflow.sdk import dag, task


@dag(dag_id="remote_hello", schedule=None, catchup=False)
def impostor():
    @task
    def noop() -> None:
        pass

    noop()


impostor()
