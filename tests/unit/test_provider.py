"""How Airflow discovers Tether, and the helpers of the admin CLI that need no database."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tether.plane.config import OPTIONS, PlaneSettings
from tether.plane.provider import get_provider_info
from tether.plane.values import agent_values


def test_provider_declares_executor_cli_db_manager_and_every_option() -> None:
    info = get_provider_info()
    assert info["executors"] == ["tether.plane.executor.TetherExecutor"]
    assert info["db-managers"] == ["tether.plane.db.TetherDBManager"]
    options = info["config"]["tether"]["options"]
    assert set(options) == set(OPTIONS)
    for name, option in options.items():
        assert option["description"].strip(), name
        assert option["type"] in {"string", "integer", "float", "boolean"}, name
        assert "default" in option, name


def test_declared_defaults_are_the_settings_defaults() -> None:
    defaults = PlaneSettings()
    for name, option in OPTIONS.items():
        value = getattr(defaults, name)
        declared = option["default"]
        if hasattr(value, "total_seconds"):
            assert value.total_seconds() == float(declared), name
        elif isinstance(value, tuple):
            assert value == () and declared == "", name
        elif isinstance(value, bool):
            assert value is (declared.lower() == "true"), name
        else:
            assert value == type(value)(declared), name


def test_values_file_is_valid_yaml_prefilled_for_the_namespace() -> None:
    values = agent_values(plane_url="https://airflow.corp.internal", namespace="data-eu", queues=["default", " etl"])
    loaded = yaml.safe_load(values.text)
    assert loaded["namespace"] == "data-eu"
    assert loaded["planeURL"] == "https://airflow.corp.internal"
    assert loaded["agentTokenSecretName"]
    assert loaded["workers"][0]["queues"] == ["default", "etl"]
    assert loaded["secretBackend"] == loaded["xcomBackend"] == ""
    assert [m.name for m in values.missing] == ["secretBackend", "xcomBackend"]
    assert values.warnings == ()


def test_values_file_reads_back_any_queue_name_and_url() -> None:
    queues = ["a: b", "#etl", "'quoted'", 'say "hi"']
    url = "https://airflow.corp.internal/prefix?x=1#frag"
    loaded = yaml.safe_load(agent_values(plane_url=url, namespace="data-eu", queues=queues).text)
    assert loaded["workers"][0]["queues"] == queues
    assert loaded["planeURL"] == url


def test_loading_example_dags_finds_the_providers_package_without_an_error(caplog: pytest.LogCaptureFixture) -> None:
    from airflow.dag_processing.bundles.manager import _add_provider_example_dags_to_bundle
    from airflow.providers_manager import ProvidersManager

    assert "airflow-tether" in ProvidersManager().providers
    bundles: list[object] = []
    with caplog.at_level(logging.ERROR, logger="airflow.dag_processing.bundles.manager"):
        _add_provider_example_dags_to_bundle(bundles)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert not [b for b in bundles if "tether" in getattr(b, "name", "")]


PLUGIN_PROBE = """
import json, sys
from airflow.sdk.listener import get_listener_manager

get_listener_manager()  # what each task's process does with the installed plugins
loaded = {m: m in sys.modules for m in ("tether.plane.plugin", "tether.plane.api.app", "fastapi")}

from airflow.plugins_manager import get_fastapi_plugins

apps = [a for a in get_fastapi_plugins()[0] if a.get("url_prefix") == "/tether"]
paths = sorted({getattr(r, "path", "") for r in apps[0]["app"].routes}) if apps else []
print(json.dumps({"loaded": loaded, "apps": len(apps), "agent_api": "/v1/agents/register" in paths}))
"""


def test_loading_the_plugin_builds_the_api_only_for_the_api_server(tmp_path: Path) -> None:
    """A task's process loads every plugin for its listeners; only the API server reads the API app.

    Built at import, the app cost every Airflow process (each task's too) FastAPI's
    modules and about a quarter of a CPU-second.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update(AIRFLOW_HOME=str(tmp_path), AIRFLOW__CORE__LOAD_EXAMPLES="False")
    probe = subprocess.run([sys.executable, "-c", PLUGIN_PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr[-3000:]
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    # The plugin is loaded, without the API or FastAPI...
    assert found["loaded"] == {"tether.plane.plugin": True, "tether.plane.api.app": False, "fastapi": False}
    # ...and the API server, reading the plugin's apps, gets the agent API under /tether.
    assert found["apps"] == 1
    assert found["agent_api"] is True
