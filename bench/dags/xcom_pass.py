"""A value passed between two tasks through XCom."""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG, task


@task
def produce() -> dict[str, int]:
    return {"answer": 42}


@task
def consume(value: dict[str, int]) -> None:
    if value != {"answer": 42}:
        raise ValueError(f"unexpected XCom value {value!r}")


with DAG(dag_id="xcom_pass", schedule=None, start_date=pendulum.datetime(2024, 1, 1), catchup=False):
    consume(produce())
