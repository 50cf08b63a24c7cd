"""Bad values fail `helm install` with one sentence naming the value and the fix."""

from __future__ import annotations

from typing import Any

import pytest

from tests.chart.rendering import render, render_error, values


def _worker(**fields: Any) -> dict[str, Any]:
    return {"name": "etl", "queues": ["etl"], **fields}


BAD_VALUES: dict[str, tuple[dict[str, Any], str]] = {
    "no token source": (
        values(agentToken=None),
        "No agent token is set: set exactly one of agentToken, agentTokenSecretName or agentTokenFile.",
    ),
    "two token sources": (
        values(agentTokenSecretName="agent-token"),
        "agentToken, agentTokenSecretName are set together, but the agents take one token: "
        "keep exactly one of agentToken, agentTokenSecretName or agentTokenFile.",
    ),
    "three token sources": (
        values(agentTokenSecretName="agent-token", agentTokenFile="/mnt/token"),
        "agentToken, agentTokenSecretName, agentTokenFile are set together, but the agents take one token: "
        "keep exactly one of agentToken, agentTokenSecretName or agentTokenFile.",
    ),
    "relative token file": (
        values(agentToken=None, agentTokenFile="token"),
        'agentTokenFile "token" is not an absolute path: set it to where the token file is mounted in the container',
    ),
    "missing secretBackend": (
        values(secretBackend=None),
        "secretBackend is required because secrets stay on the agent side: set it to a secrets backend class",
    ),
    "empty xcomBackend": (
        values(xcomBackend=""),
        "xcomBackend is required because XCom values stay on the agent side: set it to an XCom backend class",
    ),
    "missing planeURL": (
        values(planeURL=None),
        "planeURL is required: set it to the URL of the Airflow API server the agents connect to",
    ),
    "planeURL an example host": (
        values(planeURL="https://airflow.example.com"),
        'planeURL "https://airflow.example.com" is an example address, not your plane: set it to the URL at which '
        "the agents reach your Airflow API server (its [api] base_url).",
    ),
    "placeholder secretBackend of an older values file": (
        values(secretBackend="<secrets backend class, e.g. airflow.providers.hashicorp.secrets.vault.VaultBackend>"),
        'secretBackend "<secrets backend class, e.g. airflow.providers.hashicorp.secrets.vault.VaultBackend>" is not '
        "a dotted Python path: set it to the module and class of a secrets backend, "
        "e.g. airflow.providers.hashicorp.secrets.vault.VaultBackend.",
    ),
    "planeURL without scheme": (
        values(planeURL="airflow.example.com"),
        'planeURL "airflow.example.com" is not an http(s) URL: set it to the URL of the Airflow API server, '
        "starting with https://.",
    ),
    "planeURL over plain HTTP": (
        values(planeURL="http://airflow.internal.test"),
        'planeURL "http://airflow.internal.test" is plain HTTP, which would send the agent token across the network '
        "in the clear: serve the Airflow API server over HTTPS and set planeURL to its https:// URL.",
    ),
    "insecure HTTP turned on through env": (
        values(commonEnv=[{"name": "TETHER_ALLOW_INSECURE_HTTP", "value": "true"}]),
        "commonEnv sets TETHER_ALLOW_INSECURE_HTTP, but the chart's agents reach the plane over HTTPS only: remove it.",
    ),
    "duplicate worker names": (
        values(workers=[_worker(), {"name": "default", "queues": ["default"]}, _worker(queues=["other"])]),
        'workers[2].name "etl" is already the name of workers[0]: give every worker a unique name.',
    ),
    "slots below one": (
        values(workers=[_worker(), _worker(name="small", slots=0)]),
        "workers[1].slots is 0: set it to 1 or more, the number of tasks an agent runs at once.",
    ),
    "grace period not above the drain timeout": (
        values(workers=[_worker(terminationGracePeriodSeconds=300, drainTimeoutSeconds=300)]),
        "workers[0].terminationGracePeriodSeconds (300) is not longer than its drainTimeoutSeconds (300): "
        "raise terminationGracePeriodSeconds or lower drainTimeoutSeconds so Kubernetes waits for the drain.",
    ),
    "grace period too short for the default drain": (
        values(workers=[_worker(terminationGracePeriodSeconds=20)]),
        "workers[0].terminationGracePeriodSeconds (20) leaves no time to drain running tasks: "
        "set it above 30 or set a drainTimeoutSeconds below it.",
    ),
    "zero drain timeout": (
        values(workers=[_worker(drainTimeoutSeconds=0)]),
        "workers[0].drainTimeoutSeconds is 0: set it to 1 or more so running tasks get time to finish.",
    ),
    "a worker with the DAG processor's name": (
        values(dagProcessor={"enabled": True}, workers=[_worker(), _worker(name="dag-processor")]),
        'workers[1].name "dag-processor" is the name of the DAG processor\'s Deployment while dagProcessor.enabled '
        "is true: give the worker another name.",
    ),
    "metadata database in the DAG processor's env": (
        values(dagProcessor={"enabled": True, "env": [{"name": "AIRFLOW__CORE__SQL_ALCHEMY_CONN", "value": "x"}]}),
        "dagProcessor.env sets AIRFLOW__CORE__SQL_ALCHEMY_CONN, but agents never connect to the metadata database: "
        "remove it.",
    ),
    "a worker with the triggerer's name": (
        values(triggerer={"enabled": True}, workers=[_worker(name="triggerer")]),
        'workers[0].name "triggerer" is the name of the triggerer\'s Deployment while triggerer.enabled is true: '
        "give the worker another name.",
    ),
    "metadata database in the triggerer's env": (
        values(triggerer={"enabled": True, "env": [{"name": "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "value": "x"}]}),
        "triggerer.env sets AIRFLOW__DATABASE__SQL_ALCHEMY_CONN, but agents never connect to the metadata database: "
        "remove it.",
    ),
    "two pull secret sources": (
        values(imagePullSecretName="registry", imagePullSecretData="{}"),
        "imagePullSecretName and imagePullSecretData are both set: keep the name of an existing Secret "
        "or the data for the chart to store, not both.",
    ),
    "two CA bundle sources": (
        values(caBundle={"configMapName": "ca", "secretName": "ca"}),
        "caBundle.configMapName and caBundle.secretName are both set: take the CA bundle from one of them.",
    ),
    "metadata database in commonEnv": (
        values(commonEnv=[{"name": "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "value": "postgresql://db/airflow"}]),
        "commonEnv sets AIRFLOW__DATABASE__SQL_ALCHEMY_CONN, but agents never connect to the metadata database: "
        "remove it.",
    ),
    "metadata database in a worker's env": (
        values(workers=[_worker(env=[{"name": "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_CMD", "value": "cat /db"}])]),
        "workers[0].env sets AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_CMD, but agents never connect to the metadata "
        "database: remove it.",
    ),
}


def refusals(message: str) -> list[str]:
    """The chart's refusals in a Helm error, one a line, each checked to be one sentence."""
    # The template's message is the whole error after Helm's location prefix.
    lines = message.split("): ", 1)[-1].strip().splitlines()
    for line in lines:
        assert line.endswith("."), line
        assert line.replace("e.g. ", "").count(". ") == 0, line
    return lines


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_values_fail_with_one_sentence(case: str) -> None:
    vals, sentence = BAD_VALUES[case]
    [refusal] = refusals(render_error(vals))
    assert refusal.startswith(sentence)


def test_every_problem_is_refused_at_once_one_line_each() -> None:
    vals = values(planeURL=None, secretBackend=None, xcomBackend="", workers=[_worker(slots=0), _worker()])
    expected = [
        BAD_VALUES["missing planeURL"][1],
        BAD_VALUES["missing secretBackend"][1],
        BAD_VALUES["empty xcomBackend"][1],
        "workers[0].slots is 0: set it to 1 or more, the number of tasks an agent runs at once.",
        'workers[1].name "etl" is already the name of workers[0]: give every worker a unique name.',
    ]
    lines = refusals(render_error(vals))
    assert len(lines) == len(expected)
    for line, sentence in zip(lines, expected, strict=True):
        assert line.startswith(sentence)


@pytest.mark.parametrize(
    ("value", "refused"),
    [
        ("https://AIRFLOW.Example:8080/", True),
        ("https://user@example.org/airflow", True),
        ("https://example.net.", True),
        ("https://myexample.com", False),
        ("https://example.company.net", False),
        ("https://airflow.examples.org:8443/x", False),
    ],
)
def test_planeurl_in_an_example_domain_is_refused(value: str, refused: bool) -> None:
    vals = values(planeURL=value)
    if refused:
        [refusal] = refusals(render_error(vals))
        assert refusal.startswith(f'planeURL "{value}" is an example address, not your plane: set it to the URL')
    else:
        assert render(vals)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("secretBackend", "VaultBackend"),
        ("secretBackend", "airflow.providers.hashicorp.secrets.vault VaultBackend"),
        ("xcomBackend", "airflow.providers.common.io.xcom.backend."),
        ("xcomBackend", "airflow..XComObjectStorageBackend"),
        ("xcomBackend", "3rdparty.XComBackend"),
    ],
)
def test_a_backend_that_is_not_a_dotted_python_path_is_refused(name: str, value: str) -> None:
    [refusal] = refusals(render_error(values(**{name: value})))
    assert refusal.startswith(f'{name} "{value}" is not a dotted Python path: set it to the module and class of ')


SCHEMA_ERRORS: dict[str, tuple[dict[str, Any], str]] = {
    "misspelt top-level value": (values(planeUrl="https://x"), "additional properties 'planeUrl' not allowed"),
    "misspelt worker value": (values(workers=[_worker(slot=3)]), "additional properties 'slot' not allowed"),
    "worker without queues": (values(workers=[{"name": "etl"}]), "/workers/0"),
    "worker name not a DNS label": (values(workers=[_worker(name="ETL_jobs")]), "/workers/0/name"),
    "slots as text": (values(workers=[_worker(slots="four")]), "/workers/0/slots"),
    "unknown log level": (values(logLevel="verbose"), "/logLevel"),
    "unknown task log mode": (
        values(workers=[{"name": "default", "queues": ["default"], "taskLogs": "s3"}]),
        "/workers/0/taskLogs",
    ),
    "no workers": (values(workers=[]), "/workers"),
    "negative DAG processor replicas": (
        values(dagProcessor={"enabled": True, "replicas": -1}),
        "at '/dagProcessor/replicas': minimum: got -1, want 0",
    ),
    "misspelt DAG processor value": (
        values(dagProcessor={"enabled": True, "shareSource": True}),
        "additional properties 'shareSource' not allowed",
    ),
    "shareDagSource as text": (values(dagProcessor={"shareDagSource": "yes"}), "/dagProcessor/shareDagSource"),
    "zero trigger capacity": (
        values(triggerer={"enabled": True, "capacity": 0}),
        "at '/triggerer/capacity': minimum: got 0, want 1",
    ),
    "negative trigger capacity": (
        values(triggerer={"enabled": True, "capacity": -5}),
        "at '/triggerer/capacity': minimum: got -5, want 1",
    ),
    "trigger capacity as text": (
        values(triggerer={"enabled": True, "capacity": "1000"}),
        "at '/triggerer/capacity': got string, want integer",
    ),
    "fractional trigger capacity": (
        values(triggerer={"enabled": True, "capacity": 2.5}),
        "at '/triggerer/capacity': got number, want integer",
    ),
    "a bad capacity while the triggerer is off": (
        values(triggerer={"capacity": 0}),
        "at '/triggerer/capacity': minimum: got 0, want 1",
    ),
    "negative triggerer replicas": (
        values(triggerer={"enabled": True, "replicas": -1}),
        "at '/triggerer/replicas': minimum: got -1, want 0",
    ),
    "triggerer without queues": (
        values(triggerer={"enabled": True, "queues": []}),
        "at '/triggerer/queues': minItems: got 0, want 1",
    ),
    "unknown trigger log mode": (
        values(triggerer={"enabled": True, "taskLogs": "s3"}),
        "at '/triggerer/taskLogs': value must be one of 'ship', 'local'",
    ),
    "misspelt triggerer value": (
        values(triggerer={"enabled": True, "triggerCapacity": 10}),
        "additional properties 'triggerCapacity' not allowed",
    ),
}


@pytest.mark.parametrize("case", sorted(SCHEMA_ERRORS))
def test_the_schema_names_the_value_it_refuses(case: str) -> None:
    vals, fragment = SCHEMA_ERRORS[case]
    message = render_error(vals)
    assert "values don't meet the specifications of the schema" in message
    assert fragment in message
