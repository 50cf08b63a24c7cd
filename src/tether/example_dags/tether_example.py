"""Tether's example: a small pipeline whose tasks run on a remote agent, after a wait on a triggerer agent."""

from __future__ import annotations

import socket
from datetime import timedelta
from typing import Any

from airflow.providers.standard.triggers.temporal import TimeDeltaTrigger
from airflow.sdk import BaseOperator, dag, task


class Pause(BaseOperator):
    """Waits without holding a worker slot: the wait is a trigger, run by a triggerer."""

    def __init__(self, *, seconds: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seconds = seconds

    def execute(self, context: Any) -> None:
        self.defer(trigger=TimeDeltaTrigger(timedelta(seconds=self.seconds)), method_name="resume")

    def resume(self, context: Any, event: Any = None) -> None:
        self.log.info("resumed after a wait of %ss on a triggerer", self.seconds)


@dag(schedule=None, catchup=False, tags=["tether", "example"])
def tether_example():
    @task
    def extract() -> list[int]:
        return [1, 2, 3, 4]

    @task
    def transform(values: list[int]) -> int:
        return sum(v * v for v in values)

    @task
    def load(total: int) -> str:
        message = f"sum of squares = {total}, computed on {socket.gethostname()}"
        print(message)
        if total != 30:
            raise ValueError(f"expected 30, got {total}")
        return message

    Pause(task_id="wait", seconds=2) >> load(transform(extract()))


tether_example()
