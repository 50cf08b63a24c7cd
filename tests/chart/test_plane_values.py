"""The values file the plane prints never installs half-configured, and installs once filled in."""

from __future__ import annotations

import argparse
import base64
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import helm_python as helm
import pytest

from tests.chart.rendering import TOKEN, by_kind, env_of, pod_specs, render, render_error, validate
from tests.chart.test_bad_values import refusals
from tether.plane.cli import AGENT_COMMANDS
from tether.plane.commands import agents_values

PLANE_URL = "https://airflow.corp.internal"
NAMESPACE = "data-agents"

# What a user fills in, value by value.
FILLED_IN = {
    "planeURL": PLANE_URL,
    "secretBackend": "airflow.providers.hashicorp.secrets.vault.VaultBackend",
    "xcomBackend": "airflow.providers.common.io.xcom.backend.XComObjectStorageBackend",
}


@dataclass(frozen=True)
class Printed:
    """What `airflow tether agents values` wrote: the file on stdout, the notes on stderr."""

    out: str
    err: str

    def values(self) -> dict[str, Any]:
        """The file as `helm install -f` reads it."""
        return helm.values_from_yaml(self.out)

    def missing(self) -> list[str]:
        """The values stderr says the user still has to fill in."""
        return re.findall(r"^  (\w+): ", self.err, flags=re.MULTILINE)

    def filled_in(self) -> dict[str, Any]:
        """The file with every value stderr names filled in, as a user edits it."""
        text = self.out
        for name in self.missing():
            assert text.count(f'\n{name}: ""\n') == 1, name
            text = text.replace(f'\n{name}: ""\n', f'\n{name}: "{FILLED_IN[name]}"\n')
        return helm.values_from_yaml(text)


def _parse(argv: list[str]) -> argparse.Namespace:
    """The arguments of `airflow tether agents values`, parsed as Airflow parses them."""
    [command] = [c for c in AGENT_COMMANDS if c.name == "values"]
    parser = argparse.ArgumentParser()
    for arg in command.args:
        arg.add_to_parser(parser)
    return parser.parse_args(argv)


class PrintValues(Protocol):
    def __call__(self, *argv: str, base_url: str = PLANE_URL) -> Printed: ...


@pytest.fixture
def print_values(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Iterator[PrintValues]:
    """Run the command on a plane whose [api] base_url is `base_url` (empty: not set)."""

    def run(*argv: str, base_url: str = PLANE_URL) -> Printed:
        monkeypatch.setenv("AIRFLOW__API__BASE_URL", base_url)
        capsys.readouterr()
        agents_values(_parse(list(argv)))
        captured = capsys.readouterr()
        return Printed(captured.out, captured.err)

    yield run


@pytest.mark.parametrize(
    ("base_url", "to_fill"),
    [
        (PLANE_URL, ["secretBackend", "xcomBackend"]),
        ("", ["planeURL", "secretBackend", "xcomBackend"]),
    ],
    ids=["base-url-set", "no-base-url"],
)
def test_the_file_as_printed_is_refused_naming_each_value_to_fill(
    print_values: PrintValues, base_url: str, to_fill: list[str]
) -> None:
    printed = print_values("--namespace", NAMESPACE, "--queues", "etl", base_url=base_url)
    assert printed.missing() == to_fill
    lines = refusals(render_error(printed.values()))
    # One sentence a value, naming it and what to put there, and nothing else refused.
    assert [line.split(" ", 1)[0] for line in lines] == to_fill
    for line in lines:
        assert ": set it to " in line
    if base_url:
        assert "warning" not in printed.err
    else:
        assert "warning: [api] base_url is not set on this plane, so planeURL is left empty" in printed.err


@pytest.mark.parametrize("base_url", [PLANE_URL, ""], ids=["base-url-set", "no-base-url"])
def test_the_file_filled_in_installs_and_validates(print_values: PrintValues, base_url: str) -> None:
    printed = print_values("--namespace", NAMESPACE, "--queues", "default, etl", base_url=base_url)
    objects = render(printed.filled_in(), namespace=NAMESPACE)
    for obj in objects:
        validate(obj)
        assert obj["metadata"]["namespace"] == NAMESPACE
    [spec] = pod_specs(objects)
    env = env_of(spec["containers"][0])
    assert env["TETHER_PLANE_URL"] == PLANE_URL
    assert env["TETHER_QUEUES"] == "default,etl"
    assert env["TETHER_SLOTS"] == "4"
    assert env["AIRFLOW__WORKERS__SECRETS_BACKEND"] == FILLED_IN["secretBackend"]
    assert env["AIRFLOW__CORE__XCOM_BACKEND"] == FILLED_IN["xcomBackend"]
    [token] = [v for v in spec["volumes"] if v["name"] == "token"]
    assert token["secret"]["secretName"] == "tether-agent-token"


def test_the_plane_fills_in_what_it_knows(print_values: PrintValues) -> None:
    printed = print_values(
        "--namespace",
        NAMESPACE,
        "--queues",
        "etl, ,gpu-heavy",
        "--slots",
        "8",
        "--agent-token-secret-name",
        "data-agents-token",
        base_url=PLANE_URL + "/",
    )
    values = printed.values()
    assert values["planeURL"] == PLANE_URL
    assert values["namespace"] == NAMESPACE
    assert values["agentTokenSecretName"] == "data-agents-token"
    assert values["workers"] == [{"name": "default", "queues": ["etl", "gpu-heavy"], "replicas": 1, "slots": 8}]
    # What only the user knows is empty, under a comment saying what to put there.
    for name in ("secretBackend", "xcomBackend"):
        assert values[name] == ""
        assert re.search(rf"# Fill in: .*\n(# .*\n)*{name}: \"\"\n", printed.out), name
    assert "<" not in printed.out.replace("<chart>", "").replace("<the token>", "")
    assert "kubectl -n data-agents create secret generic data-agents-token" in printed.out


def test_backends_and_prefix_given_on_the_plane_install_as_printed(print_values: PrintValues) -> None:
    printed = print_values(
        "--namespace",
        NAMESPACE,
        "--resource-name-prefix",
        "eu",
        "--secret-backend",
        FILLED_IN["secretBackend"],
        "--xcom-backend",
        FILLED_IN["xcomBackend"],
    )
    assert printed.missing() == []
    objects = render(printed.values(), namespace=NAMESPACE)
    for obj in objects:
        validate(obj)
    [spec] = pod_specs(objects)
    env = env_of(spec["containers"][0])
    assert env["AIRFLOW__WORKERS__SECRETS_BACKEND"] == FILLED_IN["secretBackend"]
    assert env["AIRFLOW__CORE__XCOM_BACKEND"] == FILLED_IN["xcomBackend"]
    assert all(obj["metadata"]["name"].startswith("eu") for obj in objects if obj["kind"] != "Namespace")


def test_a_loopback_base_url_is_used_with_a_warning(print_values: PrintValues) -> None:
    printed = print_values("--namespace", NAMESPACE, base_url="http://localhost:8080")
    assert printed.values()["planeURL"] == "http://localhost:8080"
    assert "warning: [api] base_url is http://localhost:8080, a loopback address" in printed.err


def test_the_file_takes_a_token_instead_of_a_secret(print_values: PrintValues) -> None:
    vals = print_values("--namespace", NAMESPACE).filled_in()
    del vals["agentTokenSecretName"]
    vals["agentToken"] = TOKEN
    objects = render(vals, namespace=NAMESPACE)
    [secret] = [s for s in by_kind(objects, "Secret") if "token" in s["data"]]
    assert base64.b64decode(secret["data"]["token"]).decode() == TOKEN


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--namespace", "Data_Agents"], "error: namespace 'Data_Agents' is not a Kubernetes namespace name"),
        (["--queues", " , "], "error: queues is empty: name at least one queue the agents serve"),
        (["--slots", "0"], "error: slots is 0: set it to 1 or more"),
        (["--agent-token-secret-name", "Token!"], "error: agentTokenSecretName 'Token!' is not a Kubernetes Secret"),
        (["--resource-name-prefix", "EU_"], "error: resourceNamePrefix 'EU_' is not a name prefix the chart takes"),
        (["--secret-backend", "vault backend"], "error: secretBackend 'vault backend' is not a dotted Python path"),
    ],
)
def test_values_the_chart_would_refuse_are_refused_first(
    print_values: PrintValues, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        print_values(*argv)
    assert exited.value.code == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(message) and captured.err.count("\n") == 1
