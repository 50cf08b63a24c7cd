"""Tasks that defer on Airflow's DateTimeTrigger until a known moment, then resume and say when they did.

The run's ``conf`` says how many tasks and when each one's trigger fires:
``fire_at`` (an ISO time) plus ``spacing`` seconds times the task's map index, or,
without ``fire_at``, ``delay`` seconds after the task deferred. The resumed try
returns the moment its trigger was for, when the first try deferred, and when
the resumed try began running the operator's code.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pendulum
from airflow.providers.standard.triggers.temporal import DateTimeTrigger
from airflow.sdk import DAG, BaseOperator, task


class DeferUntil(BaseOperator):
    def __init__(self, *, index: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.index = index

    def execute(self, context: Any) -> None:
        conf = context["dag_run"].conf or {}
        deferred = datetime.now(UTC)
        if conf.get("fire_at"):
            moment = datetime.fromisoformat(conf["fire_at"]) + timedelta(seconds=self.index * float(conf["spacing"]))
        else:
            moment = deferred + timedelta(seconds=float(conf.get("delay", 3600)))
        self.defer(
            trigger=DateTimeTrigger(moment=moment),
            method_name="resume",
            kwargs={"moment": moment.isoformat(), "deferred": deferred.isoformat()},
        )

    def resume(self, context: Any, event: Any = None, moment: str = "", deferred: str = "") -> dict[str, str]:
        return {"moment": moment, "deferred": deferred, "resumed": datetime.now(UTC).isoformat()}


@task
def indexes(**context: Any) -> list[int]:
    return list(range(int((context["dag_run"].conf or {}).get("count", 1))))


with DAG(dag_id="deferred_wait", schedule=None, start_date=pendulum.datetime(2024, 1, 1), catchup=False):
    DeferUntil.partial(task_id="wait").expand(index=indexes())
