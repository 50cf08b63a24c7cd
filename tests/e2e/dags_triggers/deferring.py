"""Deferring tasks whose triggers only the agents can run (the plane has neither their code nor this file)."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import tether_e2e_triggers as triggers
from airflow.providers.standard.operators.python import PythonOperator
from airflow.providers.standard.sensors.time_delta import TimeDeltaSensor
from airflow.sdk import DAG, AsyncCallback, BaseOperator, DeadlineAlert, DeadlineReference, SyncCallback


class Waiter(BaseOperator):
    def __init__(self, *, make: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.make = make

    def execute(self, context: Any) -> None:
        self.defer(trigger=self.make(self), method_name="resume")

    def resume(self, context: Any, event: Any = None) -> Any:
        evidence = os.environ.get("TETHER_TEST_EVIDENCE")
        if evidence:
            with Path(evidence, f"{self.task_id}-{context['ti'].map_index}").open("a") as out:
                out.write(f"{os.getpid()}\n")
        if isinstance(event, dict) and "at" in event:
            return {**event, "at": event["at"].isoformat()}
        return event


class FlagWaiter(BaseOperator):
    def __init__(self, *, number: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.number = number

    def execute(self, context: Any) -> None:
        flag = Path(os.environ["TETHER_TEST_EVIDENCE"], f"flag-{context['run_id']}")
        self.defer(trigger=triggers.FlagTrigger(str(flag)), method_name="resume")

    def resume(self, context: Any, event: Any = None) -> Any:
        with Path(os.environ["TETHER_TEST_EVIDENCE"], f"resumed-{context['run_id']}-{self.number}").open("a") as out:
            out.write(f"{os.getpid()}\n")
        return event


with DAG("trigger_secrets", schedule=None, catchup=False):
    Waiter(task_id="wait", make=lambda op: triggers.AgentSecretTrigger("tether_agent_only", "tether_e2e_greeting"))

with DAG("trigger_receipt", schedule=None, catchup=False):
    Waiter(task_id="wait", make=lambda op: triggers.ReceiptTrigger())

with DAG("trigger_broken", schedule=None, catchup=False, default_args={"retries": 0}):
    Waiter(task_id="wait", make=lambda op: triggers.BrokenTrigger())

with DAG("trigger_end", schedule=None, catchup=False):
    Waiter(task_id="wait", make=lambda op: triggers.EndTrigger())

with DAG("trigger_sensor", schedule=None, catchup=False):
    TimeDeltaSensor(task_id="wait", delta=timedelta(seconds=2), deferrable=True)

with DAG("trigger_many", schedule=None, catchup=False):
    for number in range(20):
        FlagWaiter(task_id=f"wait_{number}", number=number)

with DAG("trigger_blocking", schedule=None, catchup=False):
    Waiter(task_id="wait", make=lambda op: triggers.BlockingTrigger())


def _slow() -> None:
    import time

    time.sleep(10)


with DAG(
    "deadline_missed",
    schedule=None,
    catchup=False,
    deadline=[
        DeadlineAlert(
            reference=DeadlineReference.DAGRUN_QUEUED_AT,
            interval=timedelta(seconds=1),
            callback=SyncCallback("tether_e2e_triggers.on_deadline", kwargs={"flavour": "sync"}),
        ),
        DeadlineAlert(
            reference=DeadlineReference.DAGRUN_QUEUED_AT,
            interval=timedelta(seconds=1),
            callback=AsyncCallback("tether_e2e_triggers.on_deadline_async", kwargs={"flavour": "async"}),
        ),
    ],
):
    PythonOperator(task_id="slow", python_callable=_slow)

with DAG("trigger_queued", schedule=None, catchup=False):
    Waiter(task_id="wait", queue="special", make=lambda op: triggers.ReceiptTrigger())
