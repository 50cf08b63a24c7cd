"""The task-log benchmark's DAGs: one task writes many lines fast, one writes a line every tenth of a second."""

from __future__ import annotations

import os
import time

from airflow.sdk import dag, task


@dag(dag_id="log_flood", schedule=None, catchup=False)
def log_flood() -> None:
    @task
    def write() -> int:
        lines = int(os.environ.get("BENCH_LOG_LINES", "20000"))
        for i in range(lines):
            print(f"line {i} of a log the benchmark reads back: {'x' * 60}")
        return lines

    write()


log_flood()


@dag(dag_id="log_ticks", schedule=None, catchup=False)
def log_ticks() -> None:
    @task
    def tick() -> int:
        ticks = int(os.environ.get("BENCH_LOG_TICKS", "100"))
        for i in range(ticks):
            print(f"tick {i} {time.time():.6f}", flush=True)
            time.sleep(0.1)
        return ticks

    tick()


log_ticks()
