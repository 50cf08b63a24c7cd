"""DAGs the agent image runs: each task reports where it ran, so the test knows it was the container."""

from __future__ import annotations

import os
import time
from pathlib import Path

from airflow.sdk import dag, task


def _where() -> dict[str, object]:
    try:
        Path("/usr/local/tether-write-probe").touch()
        root_writable = True
    except OSError:
        root_writable = False
    return {"uid": os.getuid(), "root_writable": root_writable, "home": os.environ.get("HOME")}


@dag(schedule=None, catchup=False)
def image_hello():
    @task
    def where() -> dict[str, object]:
        return _where()

    where()


@dag(schedule=None, catchup=False)
def image_drain():
    @task
    def slow() -> dict[str, object]:
        # Long enough for the test to stop the container while it runs.
        time.sleep(20)
        return _where()

    slow()


image_hello()
image_drain()
