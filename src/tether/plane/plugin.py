"""The Airflow plugin that mounts Tether's API in the API server under ``/tether``."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from tether.plane.api.app import create_app


class TetherPlugin(AirflowPlugin):
    name = "tether"
    fastapi_apps = [
        {"app": create_app(), "url_prefix": "/tether", "name": "Tether agent API"},
    ]
