"""The DAG the compatibility tests run: a few quick tasks that pass a value along."""

from __future__ import annotations

from airflow.sdk import dag, task


@dag(schedule=None, catchup=False)
def compat_chain():
    @task
    def first() -> int:
        return 20

    @task
    def then(value: int) -> int:
        return value + 1

    @task
    def last(value: int) -> None:
        assert value == 22, value

    last(then(then(first())))


compat_chain()
