"""The Task SDK's private parts the agent relies on: checked at start, named in one module only."""

from __future__ import annotations

import ast
import logging
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.api.client import Client
from airflow.sdk.execution_time import supervisor

import tether
from tether.agent import sdk_internals
from tether.agent.sdk_internals import Feature, check, log_unavailable

PACKAGE = Path(tether.__file__).parent
#: The one module allowed to name private parts of Airflow and the Task SDK.
INTERNALS = PACKAGE / "agent" / "sdk_internals.py"


def test_every_feature_is_available_with_the_task_sdk_in_the_lock() -> None:
    assert check() == dict.fromkeys(Feature)


@pytest.mark.parametrize(
    ("break_it", "off"),
    [
        (lambda mp: mp.delattr(supervisor, "_fork_main"), {Feature.HEAD_START}),
        (lambda mp: mp.setattr(supervisor, "socketpair", lambda: None), {Feature.HEAD_START}),
        (
            lambda mp: mp.setattr(supervisor.ActivitySubprocess, "start", staticmethod(lambda: None)),
            {Feature.EXIT_WATCH, Feature.SUPERVISOR_PRIORITY},
        ),
        (lambda mp: mp.delattr(Client, "_get_ssl_context_cached"), {Feature.PRELOAD}),
    ],
    ids=["no-fork-main", "other-socketpair", "start-not-a-classmethod", "no-ssl-context-cache"],
)
def test_an_sdk_shaped_otherwise_turns_off_what_relies_on_it(
    monkeypatch: pytest.MonkeyPatch, break_it: Any, off: set[Feature]
) -> None:
    break_it(monkeypatch)
    found = check()
    assert {feature for feature, reason in found.items() if reason is not None} == off
    assert all(isinstance(found[feature], str) and found[feature] for feature in off)


def test_each_feature_that_is_off_is_logged_once_with_its_fallback(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=sdk_internals.__name__):
        log_unavailable({**dict.fromkeys(Feature), Feature.HEAD_START: "the Task SDK's supervisor has no _fork_main"})
    assert caplog.messages == [
        "Task SDK feature head_start is off: the Task SDK's supervisor has no _fork_main; "
        "spares fork the task process when the task comes"
    ]


def _private_names(path: Path) -> list[str]:
    """Private parts of Airflow that ``path`` names: modules, imported names and attributes of imports."""
    tree = ast.parse(path.read_text())
    airflow_names: set[str] = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "airflow":
            if any(part.startswith("_") for part in node.module.split(".")):
                found.append(node.module)
            for alias in node.names:
                if alias.name.startswith("_"):
                    found.append(f"{node.module}.{alias.name}")
                airflow_names.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "airflow":
                    if any(part.startswith("_") for part in alias.name.split(".")):
                        found.append(alias.name)
                    airflow_names.add((alias.asname or alias.name).split(".")[0])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("airflow."):
            if any(part.startswith("_") for part in node.value.split(".")):
                found.append(node.value)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and isinstance(node.value, ast.Name)
            and node.value.id in airflow_names
        ):
            found.append(f"{node.value.id}.{node.attr}")
    return found


def test_no_other_module_names_a_private_part_of_airflow() -> None:
    offenders = {
        str(path.relative_to(PACKAGE)): names
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != INTERNALS and (names := _private_names(path))
    }
    assert offenders == {}


def test_the_check_sees_what_the_internals_module_uses() -> None:
    # The scan finds private names where they are: a positive control for the test above.
    assert {"supervisor._fork_main", "supervisor._subprocess_main", "Client._get_ssl_context_cached"} <= set(
        _private_names(INTERNALS)
    )
