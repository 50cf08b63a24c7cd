"""A DAG only the agents have: the plane parses nothing and runs it all the same."""

from __future__ import annotations

from airflow.sdk import dag, task


@dag(schedule=None, catchup=False)
def remote_hello():
    @task
    def greet() -> str:
        return "hello from an agent"

    greet()


remote_hello()
