"""The Airflow plugin: Tether's API in the API server under ``/tether``, and its pages in Airflow's UI.

Every Airflow process loads every plugin: the scheduler, the DAG processor, the
triggerer, the CLI, and each task's own process (for the plugins' listeners),
on the plane and on agents alike. Only the API server reads ``fastapi_apps`` and
``external_views``, so both are built when first read: importing this module
costs no more than Airflow's plugin base, where building the API at import cost
every one of those processes about a quarter of a CPU-second and FastAPI's
modules.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from airflow.plugins_manager import AirflowPlugin


class TetherPlugin(AirflowPlugin):
    name = "tether"

    # Airflow reads both from the plugin instance it makes, never from the class. A
    # cached property can be set on an instance like the attribute it replaces, which
    # mypy does not know.
    @cached_property
    def fastapi_apps(self) -> list[dict[str, Any]]:  # type: ignore[override]
        from tether.plane.api.app import create_app

        return [{"app": create_app(), "url_prefix": "/tether", "name": "Tether agent API"}]

    @cached_property
    def external_views(self) -> list[dict[str, Any]]:  # type: ignore[override]
        from tether.plane.ui import external_views

        return external_views()
