"""DAGs of the end-to-end tests: each one exercises one promise of the core path."""

from __future__ import annotations

import time
from datetime import timedelta

from airflow.sdk import chain, dag, get_current_context, task


@dag(schedule=None, catchup=False)
def e2e_chain_fanout():
    @task
    def step(i: int) -> int:
        return i

    chain(*[step.override(task_id=f"chain_{i}")(i) for i in range(10)])
    for i in range(20):
        step.override(task_id=f"fan_{i}")(i)


@dag(schedule=None, catchup=False)
def e2e_queues():
    @task
    def where() -> str:
        return get_current_context()["ti"].queue

    for i in range(4):
        where.override(task_id=f"alpha_{i}", queue="alpha")()
        where.override(task_id=f"beta_{i}", queue="beta")()


@dag(schedule=None, catchup=False)
def e2e_xcom():
    @task
    def produce() -> dict[str, object]:
        return {"answer": 42, "words": ["remote", "agent"]}

    @task
    def consume(value: dict[str, object]) -> None:
        if value != {"answer": 42, "words": ["remote", "agent"]}:
            raise ValueError(f"unexpected XCom value {value!r}")

    consume(produce())


@dag(schedule=None, catchup=False)
def e2e_retry():
    @task(retries=1, retry_delay=timedelta(seconds=1))
    def flaky() -> str:
        if get_current_context()["ti"].try_number == 1:
            raise RuntimeError("first try fails on purpose")
        return "second try"

    flaky()


@dag(schedule=None, catchup=False)
def e2e_pool_slots():
    @task(pool_slots=2)
    def heavy(i: int) -> int:
        time.sleep(2)
        return i

    for i in range(6):
        heavy.override(task_id=f"heavy_{i}")(i)


e2e_chain_fanout()
e2e_queues()
e2e_xcom()
e2e_retry()
e2e_pool_slots()
