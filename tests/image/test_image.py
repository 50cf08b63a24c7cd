"""The agent image itself: what it holds, and its commands inside it, run as the chart runs them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import tether
from tests.image.conftest import FACTS, REPO, TAG, agent_flags, chart_flags, podman
from tether.embedded import Plane, free_port

#: The first test builds the image (the session's fixture): on a new machine that installs the
#: tools, makes the stand-in base and installs Airflow, several minutes on two busy cores.
pytestmark = pytest.mark.timeout(1800)

#: Tools that have no place in the agent image.
BUILD_AND_TEST_TOOLS = ("gcc", "cc", "c++", "make", "ld", "pytest", "mypy", "ruff", "hypothesis")


def _locked(package: str) -> str:
    lock = (REPO / "requirements" / "lock.txt").read_text()
    match = re.search(rf"^{re.escape(package)}==(\S+)", lock, re.MULTILINE)
    assert match, package
    return match.group(1)


def _inside(image: str, tmp: Path, *command: str, entrypoint: str | None = None) -> str:
    flags = [*chart_flags(tmp), "--network=none"]
    if entrypoint:
        flags.append(f"--entrypoint={entrypoint}")
    return podman("run", "--rm", *flags, image, *command).stdout


def test_the_image_runs_the_agent_as_user_50000(image: str, tmp_path: Path) -> None:
    info = json.loads(podman("image", "inspect", image).stdout)[0]
    config = info["Config"]
    assert config["User"] == "50000"
    assert config["Entrypoint"] == ["tether-agent"]
    assert config["Cmd"] == ["run"]
    assert "8790/tcp" in config.get("ExposedPorts", {})
    layers = len(info["RootFS"]["Layers"])
    size = int(info["Size"])
    FACTS["image"] = f"{TAG} ({image.removeprefix('sha256:')[:12]}): {size / 1e6:.0f} MB, {layers} layers"
    assert layers >= 2
    assert _inside(image, tmp_path, "--version").strip() == f"tether-agent {tether.__version__}"


def test_python_and_airflow_are_the_locked_versions(image: str, tmp_path: Path) -> None:
    probe = (
        "import json, sys, importlib.metadata as m; print(json.dumps({"
        "'python': sys.version.split()[0], 'airflow': m.version('apache-airflow-core'), "
        "'task_sdk': m.version('apache-airflow-task-sdk'), 'tether': m.version('airflow-tether')}))"
    )
    versions = json.loads(_inside(image, tmp_path, "-c", probe, entrypoint="python"))
    FACTS["versions"] = ", ".join(f"{k} {v}" for k, v in versions.items())
    assert versions["python"].startswith("3.11.")
    assert versions["airflow"] == _locked("apache-airflow-core")
    assert versions["task_sdk"] == _locked("apache-airflow-task-sdk")
    assert versions["tether"] == tether.__version__


def test_the_image_holds_no_compilers_and_no_test_tools(image: str, tmp_path: Path) -> None:
    found = _inside(
        image,
        tmp_path,
        "-c",
        " ".join(f"command -v {tool};" for tool in BUILD_AND_TEST_TOOLS) + " true",
        entrypoint="sh",
    )
    assert found.strip() == ""
    probe = (
        "import json, importlib.metadata as m; "
        "print(json.dumps(sorted(d.metadata['Name'].lower() for d in m.distributions())))"
    )
    installed = set(json.loads(_inside(image, tmp_path, "-c", probe, entrypoint="python")))
    assert "apache-airflow-core" in installed
    assert not {name for name in installed if name.startswith(("pytest", "mypy", "ruff", "hypothesis"))}
    # git stays: Git DAG bundles need it.
    assert _inside(image, tmp_path, "--version", entrypoint="git").startswith("git version")


def test_check_passes_inside_the_image_against_the_plane(image: str, plane: Plane, tmp_path: Path) -> None:
    token = plane.create_token("image-check", scopes=("worker",))
    flags = agent_flags(plane, "image-check", tmp_path, token, free_port())
    result = podman("run", "--rm", *flags, image, "check", check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for name in ("plane reachable", "agent token accepted", "secrets backend", "XCom backend"):
        assert re.search(rf"^✓ {name}", output, re.MULTILINE), (name, output)
    assert re.search(r"^✓ DAG bundle 'dags-folder'", output, re.MULTILINE), output
    assert "✗" not in output
