"""The Airflow plugin: Tether's API in the API server under ``/tether``, and its pages in Airflow's UI."""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from tether.plane.api.app import create_app
from tether.plane.ui import external_views as remote_agents_views


class TetherPlugin(AirflowPlugin):
    name = "tether"
    fastapi_apps = [
        {"app": create_app(), "url_prefix": "/tether", "name": "Tether agent API"},
    ]
    external_views = remote_agents_views()
