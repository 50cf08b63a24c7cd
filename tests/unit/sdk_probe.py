"""The Task SDK's task supervisor, forking a stand-in instead of the task runner: no plane, no task."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from airflow.sdk.execution_time import supervisor


class _Heartbeats:
    def heartbeat(self, *args: Any, **kwargs: Any) -> None:
        """The supervisor heartbeats while the task runs; nobody needs to hear it here."""


class _Client:
    task_instances = _Heartbeats()


def probe_supervisor(target: Callable[[], None]) -> type[Any]:
    """A subclass of the SDK's ``ActivitySubprocess`` whose ``start()`` forks ``target`` as the task process."""

    class Probe(supervisor.ActivitySubprocess):  # type: ignore[misc]
        @classmethod
        def start(cls, **kwargs: Any) -> Any:
            process = supervisor.WatchedSubprocess.start.__func__(  # type: ignore[attr-defined]
                cls, target=target, id=uuid.uuid4(), client=_Client()
            )
            # As ActivitySubprocess.start does once the task has started. Left at 0, the
            # supervisor counts the machine's whole uptime as time since its last heartbeat
            # and, past a few minutes of uptime, polls without sleeping: it would notice the
            # task's exit at once whatever the test is about, depending on the machine's uptime.
            process._last_successful_heartbeat = time.monotonic()
            return process

        def wait(self) -> int:
            self._monitor_subprocess()
            return self._exit_code  # type: ignore[no-any-return]

    return Probe
