"""What the chart runs is what the agent accepts."""

from __future__ import annotations

import base64
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.chart.rendering import (
    ROOT,
    SCHEMA,
    TOKEN,
    by_kind,
    env_of,
    pod_specs,
    render,
    values,
)
from tests.chart.test_render import MATRIX
from tether.agent import cli as agent_cli

AGENT = Path(sys.executable).parent / "tether-agent"
DOCKERFILE = ROOT / "docker" / "agent" / "Dockerfile"
POD_NAME = "tether-etl-6d9f7c5b8-x2x7q"


def _secret_value(objects: list[dict[str, Any]], ref: dict[str, str]) -> str:
    [secret] = [s for s in by_kind(objects, "Secret") if s["metadata"]["name"] == ref["name"]]
    return base64.b64decode(secret["data"][ref["key"]]).decode()


def _container_environment(
    objects: list[dict[str, Any]], spec: dict[str, Any], container: dict[str, Any], root: Path
) -> dict[str, str]:
    """The container's environment, with every mounted path moved under `root`, its files in place."""
    mounts = sorted((m["mountPath"] for m in container["volumeMounts"]), key=len, reverse=True)
    volumes = {v["name"]: v for v in spec["volumes"]}
    environment = {"PATH": os.environ["PATH"], "HOME": str(root / "home" / "tether")}
    for entry in container["env"]:
        name = entry["name"]
        if "value" in entry:
            value = entry["value"]
        elif "fieldRef" in entry["valueFrom"]:
            assert entry["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
            value = POD_NAME
        else:
            value = _secret_value(objects, entry["valueFrom"]["secretKeyRef"])
        mount = next((m for m in mounts if value.startswith(m + "/")), None)
        if name.startswith("TETHER_") and mount is not None:
            # A file the chart points the agent at: it must come from the volume mounted there.
            [volume_mount] = [m for m in container["volumeMounts"] if m["mountPath"] == mount]
            volume = volumes[volume_mount["name"]]
            source = volume.get("secret") or volume.get("configMap") or {}
            relative = value[len(mount) + 1 :]
            if "items" in source:
                assert relative in [item["path"] for item in source["items"]], (name, volume)
            file = root / value.lstrip("/")
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(TOKEN if name == "TETHER_TOKEN_FILE" else "-----BEGIN CERTIFICATE-----\n")
            # As the kubelet writes it: the volume's mode, or Kubernetes' own default (0644); a secrets-store
            # driver writes the mode its provider is given, which docs/chart.md asks to be 0440.
            file.chmod(source.get("defaultMode", 0o440 if "csi" in volume else 0o644))
            value = str(file)
        environment[name] = value
    return environment


CASES = [
    "minimal",
    "three-workers",
    "dag-processor",
    "triggerer",
    "token-file",
    "proxy-and-ca-configmap",
    "ca-secret-and-client-cert",
    "everything-else",
]


@pytest.mark.parametrize("case", CASES)
def test_the_agent_accepts_the_rendered_command_and_environment(case: str, tmp_path: Path) -> None:
    objects = render(MATRIX[case])
    for deployment in by_kind(objects, "Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        [agent] = spec["containers"]
        root = tmp_path / deployment["metadata"]["name"]
        environment = _container_environment(objects, spec, agent, root)
        assert agent["command"] == ["tether-agent"]
        argv = [str(AGENT), *agent["command"][1:], *agent["args"], "--print-settings"]
        result = subprocess.run(argv, env=environment, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"{shlex.join(argv)}: {result.stderr}"
        settings = json.loads(result.stdout)

        rendered = env_of(agent)
        assert settings["plane_url"] == MATRIX[case]["planeURL"]
        assert settings["name"] == POD_NAME
        if agent["args"] == ["dag-processor"]:
            assert settings["share_dag_source"] is (rendered["TETHER_SHARE_DAG_SOURCE"] == "true")
        elif agent["args"] == ["triggerer"]:
            assert settings["trigger_capacity"] == int(rendered["TETHER_TRIGGER_CAPACITY"])
            assert settings["queues"] == rendered["TETHER_QUEUES"].split(",")
            assert settings["task_logs"] == rendered["TETHER_TASK_LOGS"]
        else:
            assert agent["args"] == ["run"]
            assert settings["queues"] == rendered["TETHER_QUEUES"].split(",")
            assert settings["slots"] == int(rendered["TETHER_SLOTS"])
            assert settings["drain_timeout"] == float(rendered["TETHER_DRAIN_TIMEOUT"])
            assert settings["drain_timeout"] < spec["terminationGracePeriodSeconds"]
            assert settings["task_logs"] == rendered["TETHER_TASK_LOGS"]
        assert settings["health_port"] == agent["ports"][0]["containerPort"]
        assert settings["log_level"] == MATRIX[case].get("logLevel", "INFO")
        assert settings["token"].startswith("tether_0123abcd_") and TOKEN not in result.stdout
        assert (settings["ca_bundle"] is not None) == ("TETHER_CA_BUNDLE" in rendered)


def test_the_agent_refuses_what_the_chart_would_never_render(tmp_path: Path) -> None:
    """The check above has teeth: a setting the CLI does not accept exits 2 with its message."""
    objects = render(values())
    [spec] = pod_specs(objects)
    environment = _container_environment(objects, spec, spec["containers"][0], tmp_path)
    environment["TETHER_SLOTS"] = "0"
    result = subprocess.run(
        [str(AGENT), "run", "--print-settings"], env=environment, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert "--slots / TETHER_SLOTS" in result.stderr


def _triggerer_environment(vals: dict[str, Any], root: Path) -> dict[str, str]:
    """The environment of the rendered triggerer container, its files in place under `root`."""
    objects = render(vals)
    [deployment] = [d for d in by_kind(objects, "Deployment") if d["metadata"]["name"].endswith("-triggerer")]
    spec = deployment["spec"]["template"]["spec"]
    [agent] = spec["containers"]
    assert agent["args"] == ["triggerer"]
    return _container_environment(objects, spec, agent, root)


def _triggerer_settings(environment: dict[str, str]) -> subprocess.CompletedProcess[str]:
    argv = [str(AGENT), "triggerer", "--print-settings"]
    return subprocess.run(argv, env=environment, capture_output=True, text=True, timeout=30)


def test_the_triggerer_takes_the_least_capacity_the_schema_allows_and_its_default(tmp_path: Path) -> None:
    capacity = SCHEMA["properties"]["triggerer"]["properties"]["capacity"]
    least = _triggerer_environment(values(triggerer={"enabled": True, "capacity": capacity["minimum"]}), tmp_path)
    result = _triggerer_settings(least)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["trigger_capacity"] == capacity["minimum"]
    # Without the variable the agent runs the chart's default capacity.
    del least["TETHER_TRIGGER_CAPACITY"]
    result = _triggerer_settings(least)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["trigger_capacity"] == capacity["default"]


def test_the_agent_refuses_a_capacity_the_schema_refuses(tmp_path: Path) -> None:
    """The triggerer check has teeth: a capacity below the schema's least exits 2 naming the option."""
    environment = _triggerer_environment(values(triggerer={"enabled": True}), tmp_path)
    least = SCHEMA["properties"]["triggerer"]["properties"]["capacity"]["minimum"]
    for bad in (str(least - 1), "-5", "many"):
        environment["TETHER_TRIGGER_CAPACITY"] = bad
        result = _triggerer_settings(environment)
        assert result.returncode == 2, bad
        assert f"--trigger-capacity / TETHER_TRIGGER_CAPACITY: {bad!r} is invalid" in result.stderr


def test_the_preflight_container_runs_the_check_command() -> None:
    [spec] = pod_specs(render(MATRIX["preflight"]))
    [preflight] = spec["initContainers"]
    parsed = agent_cli._parser().parse_args([*preflight["command"][1:], *preflight["args"]])
    assert parsed.command == "check"


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_the_image_runs_the_agent_as_user_50000() -> None:
    instructions = _dockerfile_instructions()
    final_stage = instructions[max(i for i, (k, _) in enumerate(instructions) if k == "FROM") :]
    args = dict(rest.split("=", 1) for k, rest in instructions if k == "ARG" and "=" in rest)
    assert args["PYTHON_IMAGE"].startswith("python:3.11-slim")
    settings = {k: rest for k, rest in final_stage if k in {"USER", "ENTRYPOINT", "CMD"}}
    assert settings["USER"] == "50000"
    assert json.loads(settings["ENTRYPOINT"]) == ["tether-agent"]
    assert json.loads(settings["CMD"]) == ["run"]
    runs = " ".join(rest for k, rest in final_stage if k == "RUN")
    # The dependencies at the versions the lock pins, in a layer of their own; then the package from
    # the wheel built in the first stage, adding nothing the lock does not pin.
    assert "pip install --no-cache-dir -c /opt/tether/lock.txt -r /opt/tether/requirements.txt" in runs
    assert "pip install --no-cache-dir --no-deps -c /opt/tether/lock.txt /wheels/airflow_tether-" in runs
    assert ("COPY", "requirements/lock.txt /opt/tether/lock.txt") in final_stage
    assert "useradd --uid 50000" in runs


def test_the_chart_runs_the_image_entrypoint() -> None:
    entrypoint = next(json.loads(rest) for k, rest in _dockerfile_instructions() if k == "ENTRYPOINT")
    [spec] = pod_specs(render(values()))
    assert spec["containers"][0]["command"] == entrypoint
    assert spec["securityContext"]["runAsUser"] == 50000


READ_AIRFLOW_SETTINGS = """
import json
from airflow.sdk.configuration import conf
print(json.dumps({
    "secrets_backend": conf.get("workers", "secrets_backend"),
    "secrets_backend_kwargs": json.loads(conf.get("workers", "secrets_backend_kwargs")),
    "xcom_backend": conf.get("core", "xcom_backend"),
    "xcom_objectstorage_path": conf.get("common.io", "xcom_objectstorage_path"),
    "dag_bundle_config_list": json.loads(conf.get("dag_processor", "dag_bundle_config_list")),
}))
"""


def test_the_task_sdk_reads_the_backends_from_the_rendered_environment(tmp_path: Path) -> None:
    # Backends that are installed here: Airflow imports the secrets backend as it loads its settings.
    vals = {
        **MATRIX["everything-else"],
        "secretBackend": "airflow.secrets.local_filesystem.LocalFilesystemBackend",
        "secretBackendKwargs": {"variables_file_path": "/etc/airflow/variables.json"},
        "xcomBackend": "airflow.sdk.execution_time.xcom.BaseXCom",
    }
    objects = render(vals)
    [spec] = pod_specs(objects)
    environment = _container_environment(objects, spec, spec["containers"][0], tmp_path)
    environment["AIRFLOW_HOME"] = str(tmp_path / "airflow")
    result = subprocess.run(
        [sys.executable, "-c", READ_AIRFLOW_SETTINGS], env=environment, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {
        "secrets_backend": vals["secretBackend"],
        "secrets_backend_kwargs": vals["secretBackendKwargs"],
        "xcom_backend": vals["xcomBackend"],
        "xcom_objectstorage_path": vals["xcomBackendSettings"]["common.io"]["xcom_objectstorage_path"],
        "dag_bundle_config_list": vals["dagBundleConfigList"],
    }
