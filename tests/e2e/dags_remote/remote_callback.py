"""A DAG whose failure callback leaves evidence of where it ran (TETHER_TEST_EVIDENCE, set on agents only)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from airflow.sdk import dag, task


def leave_evidence(context: dict) -> None:
    folder = os.environ.get("TETHER_TEST_EVIDENCE")
    if not folder:
        return
    Path(folder, "dag_failure_callback.json").write_text(
        json.dumps(
            {"pid": os.getpid(), "parent": os.getppid(), "host": socket.gethostname(), "run_id": context["run_id"]}
        )
    )


@dag(schedule=None, catchup=False, on_failure_callback=leave_evidence)
def remote_callback():
    @task(retries=0)
    def fail() -> None:
        raise RuntimeError("failing on purpose, so the DAG's failure callback runs")

    fail()


remote_callback()
