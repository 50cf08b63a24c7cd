"""Triggers only the agents have: the plane has neither this module nor the connection they read."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from airflow.triggers.base import BaseTrigger, TaskSuccessEvent, TriggerEvent

HERE = "tether_e2e_triggers"


@dataclasses.dataclass
class Receipt:
    """A payload of a class only the agents can import."""

    host: str
    note: str


class AgentSecretTrigger(BaseTrigger):
    """Reads a connection only the triggerer agent has, and a Variable the plane has; fires both."""

    def __init__(self, conn_id: str, variable: str) -> None:
        super().__init__()
        self.conn_id = conn_id
        self.variable = variable

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return f"{HERE}.AgentSecretTrigger", {"conn_id": self.conn_id, "variable": self.variable}

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from airflow.sdk import Connection, Variable

        conn = Connection.get(self.conn_id)
        value = Variable.get(self.variable)
        self.log.info("tether-e2e: the trigger sees host %s and variable %s", conn.host, value)
        yield TriggerEvent({"host": conn.host, "variable": value, "at": datetime(2026, 1, 2, tzinfo=UTC)})


class ReceiptTrigger(BaseTrigger):
    def serialize(self) -> tuple[str, dict[str, Any]]:
        return f"{HERE}.ReceiptTrigger", {}

    async def run(self) -> AsyncIterator[TriggerEvent]:
        yield TriggerEvent(Receipt(host=os.environ.get("TETHER_NAME", "?"), note="agent-only class"))


class FlagTrigger(BaseTrigger):
    """Fires once ``flag`` exists."""

    def __init__(self, flag: str) -> None:
        super().__init__()
        self.flag = flag

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return f"{HERE}.FlagTrigger", {"flag": self.flag}

    async def run(self) -> AsyncIterator[TriggerEvent]:
        while not Path(self.flag).exists():
            await asyncio.sleep(0.5)
        yield TriggerEvent({"agent": os.environ.get("TETHER_NAME", "?")})


class BrokenTrigger(BaseTrigger):
    def serialize(self) -> tuple[str, dict[str, Any]]:
        return f"{HERE}.BrokenTrigger", {}

    async def run(self) -> AsyncIterator[TriggerEvent]:
        raise RuntimeError("tether-e2e: the trigger broke")
        yield  # pragma: no cover - makes this an async generator


class EndTrigger(BaseTrigger):
    """Ends its task from the triggerer: the task does not run again."""

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return f"{HERE}.EndTrigger", {}

    async def run(self) -> AsyncIterator[TriggerEvent]:
        yield TaskSuccessEvent(xcoms={"ended": "on the triggerer"})


class BlockingTrigger(BaseTrigger):
    """Blocks the trigger runner's event loop for a while: what Airflow warns of."""

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return f"{HERE}.BlockingTrigger", {}

    async def run(self) -> AsyncIterator[TriggerEvent]:
        import time

        time.sleep(1.5)
        yield TriggerEvent({"blocked": True})


def _evidence(name: str, content: dict[str, Any]) -> None:
    import json

    Path(os.environ["TETHER_TEST_EVIDENCE"], name).write_text(json.dumps(content))


def on_deadline(context: dict[str, Any] | None = None, **kwargs: Any) -> None:
    """A deadline alert's synchronous callback: the executor's, so a worker agent's."""
    from airflow.sdk import Variable

    run_id = ((context or {}).get("dag_run") or {}).get("dag_run_id", "?")
    # A Variable only the plane has: the callback's token must let it ask.
    greeting = Variable.get("tether_e2e_greeting")
    _evidence(f"deadline-sync-{run_id}", {"agent": os.environ.get("TETHER_NAME"), "variable": greeting, **kwargs})


async def on_deadline_async(context: dict[str, Any] | None = None, **kwargs: Any) -> None:
    """A deadline alert's asynchronous callback: the triggerer's, so a triggerer agent's."""
    run_id = ((context or {}).get("dag_run") or {}).get("dag_run_id", "?")
    _evidence(f"deadline-async-{run_id}", {"agent": os.environ.get("TETHER_NAME"), **kwargs})
