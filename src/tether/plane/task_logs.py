"""Airflow's log views read the logs of tries that ran on Tether agents from what the agents shipped.

Airflow's task log reader asks its *remote task log* for a try's lines first,
then, for a running try, the executor, and for tries neither has, the worker's
host (``http://<host>:8793``), which no plane can reach. ``TetherRemoteLogIO``
answers for every try that ran on an agent, in every state, on every API server
replica: the lines the agent shipped, read from the metadata database, with a
line saying where they end when the try ended without its last batch. Every
other try goes to the remote log IO it wraps (S3, GCS, ... as configured), so
Tether's can stand in front of an operator's own.

It is installed through ``[logging] logging_config_class`` (``tether.plane.log_config``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from typing import Any

from tether.plane.config import PlaneSettings
from tether.plane.store import Store, airflow_session_factory
from tether.plane.store.logs import TaskLogState, tether_line

log = logging.getLogger(__name__)

#: States of a try that may still add lines to its log.
_UNFINISHED = ("running", "deferred", "queued", "scheduled", "up_for_reschedule", "restarting", None)


@functools.cache
def _store() -> Store:
    return Store(airflow_session_factory(), settings=PlaneSettings.from_airflow())


class TetherRemoteLogIO:
    """Airflow's ``RemoteLogStreamIO`` for the tries agents ran; any other try is read from ``wrapped``."""

    def __init__(self, wrapped: Any = None, *, store: Store | None = None) -> None:
        self.wrapped = wrapped
        self._given_store = store

    @property
    def store(self) -> Store:
        return self._given_store or _store()

    @property
    def processors(self) -> tuple[Any, ...]:
        return tuple(getattr(self.wrapped, "processors", ())) if self.wrapped is not None else ()

    def upload(self, path: Any, ti: Any = None) -> None:
        if self.wrapped is not None:
            self.wrapped.upload(path, ti)

    def stream(self, relative_path: str, ti: Any) -> tuple[list[str], list[Iterator[str]]]:
        state = self.state_of(ti)
        if state is None:
            return self._wrapped_stream(relative_path, ti)
        return [_source(state)], [self._lines(state, ti)]

    def read(self, relative_path: str, ti: Any) -> tuple[list[str], list[str] | None]:
        state = self.state_of(ti)
        if state is None:
            if self.wrapped is None:
                return [], None
            sources, blobs = self.wrapped.read(relative_path, ti)
            return list(sources), blobs
        return [_source(state)], ["\n".join(self._lines(state, ti))]

    def state_of(self, ti: Any) -> TaskLogState | None:
        """What the plane has of the try's log; None for a try that did not run on an agent."""
        try:
            return self.store.task_log_state(str(ti.id), int(ti.try_number))
        except Exception:
            log.exception("Could not look up the Tether log of %s try %s", getattr(ti, "task_id", "?"), ti.try_number)
            return None

    def _lines(self, state: TaskLogState, ti: Any) -> Iterator[str]:
        yield from self.store.task_log_lines(str(ti.id), int(ti.try_number))
        finished = _state_name(ti) not in _UNFINISHED
        if finished and not state.closed and not state.truncated:
            since = f" after {state.last_at:%Y-%m-%d %H:%M:%S} UTC" if state.last_at else ""
            yield tether_line(
                f"Tether: the log ends here. Agent {state.agent_name} sent nothing more{since}: it stopped, or "
                "lost the plane, before the task's last lines went out. The rest, if any, is in the task's log file "
                "on the agent.",
                at=state.last_at,
            )

    def _wrapped_stream(self, relative_path: str, ti: Any) -> tuple[list[str], list[Any]]:
        if self.wrapped is None:
            return [], []
        if hasattr(self.wrapped, "stream"):
            sources, streams = self.wrapped.stream(relative_path, ti)
            return list(sources), list(streams or [])
        sources, blobs = self.wrapped.read(relative_path, ti)
        return list(sources), list(blobs or [])


def _state_name(ti: Any) -> str | None:
    state = getattr(ti, "state", None)
    return None if state is None else str(getattr(state, "value", state))


def _source(state: TaskLogState) -> str:
    if not state.lines:
        return f"Tether: agent {state.agent_name} has sent no lines of this try yet"
    cut = ", cut at [tether] task_log_max_bytes" if state.truncated else ""
    return f"Tether: {state.lines} lines shipped by agent {state.agent_name}{cut}"


def tether_reads_remote_logs() -> bool:
    """Whether this process's Airflow reads remote task logs through Tether (``[logging] logging_config_class``)."""
    try:
        from airflow.logging_config import get_remote_task_log

        return isinstance(get_remote_task_log(), TetherRemoteLogIO)
    except Exception:
        return False
