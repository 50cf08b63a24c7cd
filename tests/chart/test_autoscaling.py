"""Worker groups scaled by KEDA on queue demand: what renders, that KEDA's schemas accept it, and what is refused."""

from __future__ import annotations

import copy
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from tests.chart.rendering import RELEASE, by_kind, env_of, render, render_error, render_files, validate, values
from tests.chart.test_bad_values import refusals


def _group(name: str = "etl", **autoscaling: Any) -> dict[str, Any]:
    return {
        "name": name,
        "queues": [name, f"{name}-heavy"],
        "slots": 8,
        "autoscaling": {"enabled": True, **autoscaling},
    }


AUTOSCALED = values(
    workers=[
        _group(maxReplicas=20, pollingInterval=10, cooldownPeriod=120),
        _group("gpu", minReplicas=1, maxReplicas=3, slotsPerReplica=2),
        {"name": "default", "queues": ["default"], "replicas": 2},
    ]
)


def _scaled_objects(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in by_kind(objects, "ScaledObject")}


def test_autoscaled_groups_render_valid_keda_objects_and_others_none() -> None:
    objects = render(AUTOSCALED)
    for obj in objects:
        validate(obj)
    scaled = _scaled_objects(objects)
    assert sorted(scaled) == [f"{RELEASE}-etl", f"{RELEASE}-gpu"]
    [auth] = by_kind(objects, "TriggerAuthentication")
    assert auth["metadata"]["namespace"] == "agents"
    assert auth["spec"] == {"secretTargetRef": [{"parameter": "token", "name": f"{RELEASE}-token", "key": "token"}]}
    assert {s["metadata"]["name"] for s in by_kind(objects, "Secret")} >= {f"{RELEASE}-token"}

    etl = scaled[f"{RELEASE}-etl"]["spec"]
    assert etl["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"{RELEASE}-etl"}
    assert (etl["minReplicaCount"], etl["maxReplicaCount"]) == (0, 20)
    assert (etl["pollingInterval"], etl["cooldownPeriod"]) == (10, 120)
    assert etl["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"] == {
        "stabilizationWindowSeconds": 120
    }
    [trigger] = etl["triggers"]
    assert trigger["type"] == "metrics-api" and trigger["metricType"] == "AverageValue"
    assert trigger["authenticationRef"] == {"name": auth["metadata"]["name"]}
    meta = trigger["metadata"]
    assert (meta["valueLocation"], meta["targetValue"], meta["authMode"]) == ("replicas", "1", "bearer")
    url = urlsplit(meta["url"])
    assert (url.scheme, url.netloc, url.path) == ("https", "airflow.corp.internal", "/tether/v1/demand")
    # The group's own queues, and its agents' slots unless told otherwise.
    assert parse_qs(url.query) == {"queues": ["etl,etl-heavy"], "slots_per_replica": ["8"]}

    gpu = scaled[f"{RELEASE}-gpu"]["spec"]
    assert (gpu["minReplicaCount"], gpu["maxReplicaCount"]) == (1, 3)
    assert (gpu["pollingInterval"], gpu["cooldownPeriod"]) == (15, 300)
    gpu_query = parse_qs(urlsplit(gpu["triggers"][0]["metadata"]["url"]).query)
    assert gpu_query == {"queues": ["gpu,gpu-heavy"], "slots_per_replica": ["2"]}


def test_keda_sets_the_replicas_of_autoscaled_groups_only() -> None:
    deployments = {d["metadata"]["name"]: d["spec"] for d in by_kind(render(AUTOSCALED), "Deployment")}
    assert "replicas" not in deployments[f"{RELEASE}-etl"]
    assert "replicas" not in deployments[f"{RELEASE}-gpu"]
    assert deployments[f"{RELEASE}-default"]["replicas"] == 2
    # Off by default: no KEDA object at all.
    plain = render(values())
    assert not by_kind(plain, "ScaledObject") and not by_kind(plain, "TriggerAuthentication")
    assert by_kind(plain, "Deployment")[0]["spec"]["replicas"] == 1


@pytest.mark.parametrize("grace", [None, 3600])
def test_pods_keda_removes_drain_before_kubernetes_kills_them(grace: int | None) -> None:
    group = _group()
    if grace is not None:
        group["terminationGracePeriodSeconds"] = grace
    [deployment] = by_kind(render(values(workers=[group])), "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    [agent] = spec["containers"]
    # SIGTERM starts the agent's drain (tether-agent run); nothing else stops it first.
    assert agent["command"] == ["tether-agent"] and agent["args"] == ["run"]
    assert "lifecycle" not in agent
    drain = int(env_of(agent)["TETHER_DRAIN_TIMEOUT"])
    assert 0 < drain < spec["terminationGracePeriodSeconds"] == (grace or 600)


def test_a_token_from_an_existing_secret_is_read_from_it() -> None:
    objects = render(values(agentToken=None, agentTokenSecretName="fleet-token", workers=[_group()]))
    [auth] = by_kind(objects, "TriggerAuthentication")
    assert auth["spec"]["secretTargetRef"][0]["name"] == "fleet-token"
    for obj in objects:
        validate(obj)


def test_the_keda_schema_check_refuses_what_keda_would() -> None:
    [scaled] = by_kind(render(values(workers=[_group()])), "ScaledObject")
    validate(scaled)
    misspelt = copy.deepcopy(scaled)
    misspelt["spec"]["minReplicas"] = 0
    with pytest.raises(ValueError, match=r"spec\.minReplicas"):
        validate(misspelt)
    text = copy.deepcopy(scaled)
    text["spec"]["maxReplicaCount"] = "20"
    with pytest.raises(ValueError, match="maxReplicaCount"):
        validate(text)
    untargeted = copy.deepcopy(scaled)
    del untargeted["spec"]["scaleTargetRef"]
    with pytest.raises(ValueError, match="scaleTargetRef"):
        validate(untargeted)


BAD: dict[str, tuple[dict[str, Any], str]] = {
    "min above max": (
        values(workers=[_group(minReplicas=5, maxReplicas=2)]),
        "workers[0].autoscaling.minReplicas (5) is above its maxReplicas (2): lower minReplicas or raise maxReplicas.",
    ),
    "more slots per replica than an agent has": (
        values(workers=[{"name": "etl", "queues": ["etl"], "autoscaling": {"enabled": True, "slotsPerReplica": 16}}]),
        "workers[0].autoscaling.slotsPerReplica (16) is more than the 4 slots of one agent, so the group would get "
        "too few agents to run its work: set it to 4 or less, or leave it null.",
    ),
    "token only in a file": (
        values(agentToken=None, agentTokenFile="/mnt/token", workers=[_group()]),
        "workers[0].autoscaling needs the agent token in a Secret that KEDA can read, but it comes from "
        "agentTokenFile: set agentTokenSecretName (or agentToken) instead.",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_autoscaling_values_are_refused_with_a_sentence(case: str) -> None:
    vals, sentence = BAD[case]
    assert refusals(render_error(vals)) == [sentence]


def test_the_same_values_while_autoscaling_is_off_are_not_refused() -> None:
    group = {"name": "etl", "queues": ["etl"], "autoscaling": {"enabled": False, "minReplicas": 5, "maxReplicas": 2}}
    assert not by_kind(render(values(workers=[group])), "ScaledObject")


SCHEMA_BAD: dict[str, tuple[dict[str, Any], str]] = {
    "negative minReplicas": (values(workers=[_group(minReplicas=-1)]), "minimum: got -1, want 0"),
    "zero maxReplicas": (values(workers=[_group(maxReplicas=0)]), "minimum: got 0, want 1"),
    "zero pollingInterval": (values(workers=[_group(pollingInterval=0)]), "minimum: got 0, want 1"),
    "zero slotsPerReplica": (values(workers=[_group(slotsPerReplica=0)]), "minimum: got 0, want 1"),
    "misspelt autoscaling value": (
        values(workers=[_group(maxReplica=3)]),
        "additional properties 'maxReplica' not allowed",
    ),
    "enabled as text": (values(workers=[_group(enabled="yes")]), "/workers/0/autoscaling/enabled"),
}


@pytest.mark.parametrize("case", sorted(SCHEMA_BAD))
def test_the_schema_refuses_bad_autoscaling_values(case: str) -> None:
    vals, fragment = SCHEMA_BAD[case]
    message = render_error(vals)
    assert "values don't meet the specifications of the schema" in message
    assert "/workers/0/autoscaling" in message and fragment in message


def test_notes_say_which_groups_keda_scales() -> None:
    notes = next(text for path, text in render_files(AUTOSCALED).items() if path.endswith("NOTES.txt"))
    assert "worker etl: 0 to 20 agent(s), scaled by KEDA on the demand of etl, etl-heavy" in notes
    assert "worker gpu: 1 to 3 agent(s), scaled by KEDA" in notes
    assert "worker default: 2 agent(s) serving default" in notes
