"""A DAG whose shape comes from a Variable read at parse time: the agent's secrets answer it."""

from __future__ import annotations

from airflow.sdk import Variable, dag, task

WHERE = Variable.get("remote_only_var", default="not found on the agent")


@dag(schedule=None, catchup=False, description=f"parsed with remote_only_var={WHERE}")
def remote_variable():
    @task
    def noop() -> None:
        pass

    noop()


remote_variable()
