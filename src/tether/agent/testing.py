"""In-memory stand-ins for the agent's I/O, for tests: a runner whose tasks end on command.

Real runs use ``tether.agent.runner.ForkRunner``; this fake keeps the same
interface so the agent's loop can be tested without forking Airflow tasks.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any


@dataclass
class FakeTask:
    pid: int
    workload: dict[str, Any]
    exit_code: int | None = None
    terminated: bool = False
    killed: bool = False
    #: Exit code used when terminated (a task that handles SIGTERM); None ignores SIGTERM.
    on_terminate: int | None = 143
    _done: asyncio.Event = field(default_factory=asyncio.Event)

    def finish(self, exit_code: int) -> None:
        if self.exit_code is None:
            self.exit_code = exit_code
            self._done.set()

    async def wait(self) -> int:
        await self._done.wait()
        assert self.exit_code is not None
        return self.exit_code

    def terminate(self) -> None:
        self.terminated = True
        if self.on_terminate is not None:
            self.finish(self.on_terminate)

    def kill(self) -> None:
        self.killed = True
        self.finish(-9)


@dataclass
class FakeRunner:
    tasks: list[FakeTask] = field(default_factory=list)
    ignore_sigterm: bool = False
    spawned: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False

    def start(self) -> None:
        """Nothing is made ahead of the tasks."""

    async def spawn(self, workload: dict[str, Any]) -> FakeTask:
        task = FakeTask(pid=10_000 + len(self.tasks), workload=workload)
        if self.ignore_sigterm:
            task.on_terminate = None
        self.tasks.append(task)
        self.spawned.set()
        return task

    def close(self) -> None:
        self.closed = True
