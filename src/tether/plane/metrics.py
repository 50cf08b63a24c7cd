"""The plane's metrics, sent through Airflow's own metrics pipeline: wherever the deployment's StatsD,
Datadog or OpenTelemetry metrics go (``[metrics]``), under its prefix. docs/metrics.md names each one.

Airflow's scheduler and API server set that pipeline up (``airflow.observability.stats``); in a process
where nothing did, as in unit tests, every call here does nothing. A name carries its queue, state or
reason as its last part (StatsD has no tags), and the same as a tag for backends that take tags.
"""

from __future__ import annotations

import functools
import importlib
import logging
import re
from datetime import timedelta
from typing import Any

log = logging.getLogger(__name__)

PREFIX = "tether"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def part(text: str) -> str:
    """``text`` as one part of a metric name: a dot would start another part, other characters are refused."""
    return _UNSAFE.sub("_", text.replace(".", "__"))[:100] or "_"


class _NoStats:
    """What metrics go to when this Airflow has no metrics pipeline where it is looked for."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


@functools.cache
def _stats() -> Any:
    # Where Airflow 3.3's scheduler and API server set their pipeline up; ``airflow.stats`` before that.
    for module in ("airflow.observability.stats", "airflow.stats"):
        try:
            return importlib.import_module(module).Stats
        except (ImportError, AttributeError):
            continue
    log.warning("Airflow's metrics pipeline was not found (airflow.observability.stats): Tether sends no metrics")
    return _NoStats()


def incr(name: str, count: int = 1, **tags: str) -> None:
    _stats().incr(_name(name, tags), count, tags=tags or None)


def gauge(name: str, value: float, **tags: str) -> None:
    _stats().gauge(_name(name, tags), value, tags=tags or None)


def timing(name: str, took: timedelta, **tags: str) -> None:
    _stats().timing(_name(name, tags), max(took, timedelta(0)), tags=tags or None)


def _name(name: str, tags: dict[str, str]) -> str:
    return ".".join([PREFIX, name, *(part(value) for value in tags.values())])
