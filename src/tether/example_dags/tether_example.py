"""Tether's example: a small pipeline whose tasks run on a remote agent."""

from __future__ import annotations

import socket

from airflow.sdk import dag, task


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

    load(transform(extract()))


tether_example()
