"""Provider metadata: how Airflow discovers Tether's executor, plugin, CLI, config and tables."""

from __future__ import annotations

from typing import Any

import tether
from tether.plane.config import OPTIONS, SECTION


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "airflow-tether",
        "name": "Tether",
        "description": "Remote execution agents: run Airflow tasks in networks that accept no inbound "
        "connections, over outbound HTTPS.",
        "versions": [tether.__version__],
        "executors": ["tether.plane.executor.TetherExecutor"],
        # The plugin (agent API) is registered through the "airflow.plugins" entry point
        # instead: Airflow skips provider-declared plugins while providers load lazily.
        "cli": ["tether.plane.cli.get_cli_commands"],
        "db-managers": ["tether.plane.db.TetherDBManager"],
        "config": {
            SECTION: {
                "description": "Tether remote execution agents: the plane side (executor and agent API).\n",
                "options": {key: {"version_added": None, **option} for key, option in OPTIONS.items()},
            }
        },
    }
