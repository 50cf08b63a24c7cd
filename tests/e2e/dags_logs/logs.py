"""DAGs whose tasks write logs for the log tests: many lines, a line a second, too much, a secret."""

from __future__ import annotations

import time

from airflow.sdk import BaseHook, dag, task


@dag(schedule=None, catchup=False)
def logs_thousand():
    @task
    def thousand() -> None:
        for i in range(1000):
            print(f"line {i:04d} of 1000")

    thousand()


@dag(schedule=None, catchup=False)
def logs_live():
    @task
    def tick() -> None:
        for i in range(12):
            print(f"tick {i:02d} at {time.time():.3f}", flush=True)
            time.sleep(1)

    tick()


@dag(schedule=None, catchup=False)
def logs_flood():
    @task
    def flood() -> None:
        chunk = "x" * 1000
        for i in range(20_000):
            print(f"flood {i:05d} {chunk}")

    flood()


@dag(schedule=None, catchup=False)
def logs_secret():
    @task
    def leak() -> None:
        password = BaseHook.get_connection("agent_only_db").password
        print(f"the password is {password}")

    leak()


@dag(schedule=None, catchup=False)
def logs_killed():
    @task(retries=0, queue="victim")
    def linger() -> None:
        for i in range(600):
            print(f"lingering {i:03d}", flush=True)
            time.sleep(0.5)

    linger()


@dag(schedule=None, catchup=False)
def logs_local():
    @task(queue="local")
    def stays() -> None:
        print("this line stays on the agent")

    stays()


logs_thousand()
logs_live()
logs_flood()
logs_secret()
logs_killed()
logs_local()
