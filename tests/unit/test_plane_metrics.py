"""The plane's metrics reach Airflow's pipeline, and a missing pipeline costs no request."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from datetime import timedelta
from types import ModuleType
from typing import Any

import pytest

from tether.plane import metrics


@pytest.fixture(autouse=True)
def fresh_lookup() -> Iterator[None]:
    metrics._stats.cache_clear()
    yield
    metrics._stats.cache_clear()


def test_names_carry_their_tags_and_reach_airflows_stats(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[str, Any]] = []

    class Recording:
        @staticmethod
        def incr(name: str, count: int, tags: Any) -> None:
            sent.append((name, count))

        @staticmethod
        def timing(name: str, took: timedelta, tags: Any) -> None:
            sent.append((name, took))

    module = ModuleType("airflow.observability.stats")
    module.Stats = Recording  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "airflow.observability.stats", module)
    metrics.incr("refusals", reason="scope.missing")
    metrics.timing("lease_wait", timedelta(seconds=-1), queue="etl")
    assert sent == [("tether.refusals.scope__missing", 1), ("tether.lease_wait.etl", timedelta(0))]


def test_without_a_pipeline_metrics_do_nothing_and_say_so_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = importlib.import_module

    def missing(name: str, *args: Any) -> ModuleType:
        if name in ("airflow.observability.stats", "airflow.stats"):
            raise ImportError(name)
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", missing)
    metrics.incr("reports", state="success")
    metrics.gauge("jobs.queued", 3, queue="etl")
    assert [r.message for r in caplog.records if "metrics pipeline" in r.message] == [
        "Airflow's metrics pipeline was not found (airflow.observability.stats): Tether sends no metrics"
    ]
