"""The sentinel's objects: one pod that may only read pods and events of its namespace, and what is refused."""

from __future__ import annotations

from typing import Any

import pytest

from tests.chart.rendering import NAMESPACE, RELEASE, by_kind, env_of, render, render_error, validate, values
from tests.chart.test_bad_values import refusals

SENTINEL = values(sentinel={"enabled": True, "tokenSecretName": "sentinel-token"})


def _named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [obj] = [o for o in by_kind(objects, kind) if o["metadata"]["name"] == name]
    return obj


def test_the_sentinel_reads_pods_and_events_of_its_namespace_and_nothing_else() -> None:
    objects = render(SENTINEL)
    for obj in objects:
        validate(obj)
    name = f"{RELEASE}-sentinel"
    [role] = by_kind(objects, "Role")
    assert role["metadata"] == role["metadata"] | {"name": name, "namespace": NAMESPACE}
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods", "events"], "verbs": ["get", "list", "watch"]}]
    assert not by_kind(objects, "ClusterRole") and not by_kind(objects, "ClusterRoleBinding")
    [binding] = by_kind(objects, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": name, "namespace": NAMESPACE}]

    spec = _named(objects, "Deployment", name)["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == name and spec["automountServiceAccountToken"] is True
    [container] = spec["containers"]
    assert container["command"] == ["tether-agent"] and container["args"] == ["sentinel"]
    env = env_of(container)
    assert env["TETHER_SENTINEL_NAMESPACE"] == NAMESPACE
    assert env["TETHER_SENTINEL_SELECTOR"] == f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/component=agent"
    assert env["TETHER_TOKEN_FILE"] == "/var/run/secrets/tether/sentinel-token/token"
    assert env["AIRFLOW__CORE__XCOM_BACKEND"] == values()["xcomBackend"]  # it checks the agents' backends
    [token] = [v for v in spec["volumes"] if v["name"] == "sentinel-token"]
    assert token["secret"]["secretName"] == "sentinel-token"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["sentinel-token"] == "/var/run/secrets/tether/sentinel-token"
    # Its own pod is not one of the agents it reports, nor behind the agents' metrics Service.
    labels = _named(objects, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "sentinel"
    # The agents still read no Kubernetes API.
    for deployment in by_kind(objects, "Deployment"):
        if deployment["metadata"]["name"] != name:
            assert deployment["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_no_sentinel_and_no_rbac_unless_enabled() -> None:
    objects = render(values())
    assert not by_kind(objects, "Role") and not by_kind(objects, "RoleBinding")
    assert all(d["metadata"]["name"] != f"{RELEASE}-sentinel" for d in by_kind(objects, "Deployment"))


BAD: dict[str, tuple[dict[str, Any], str]] = {
    "no token": (
        values(sentinel={"enabled": True}),
        "sentinel.enabled is true but sentinel.tokenSecretName is empty: create a token with airflow tether tokens "
        "create --scope sentinel, store it in a Secret under the key token and name that Secret.",
    ),
    "a worker with the sentinel's name": (
        values(
            sentinel={"enabled": True, "tokenSecretName": "s"}, workers=[{"name": "sentinel", "queues": ["default"]}]
        ),
        'workers[0].name "sentinel" is the name of the sentinel\'s Deployment while sentinel.enabled is true: '
        "give the worker another name.",
    ),
    "metadata database in the sentinel's env": (
        values(
            sentinel={
                "enabled": True,
                "tokenSecretName": "s",
                "env": [{"name": "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "value": "x"}],
            }
        ),
        "sentinel.env sets AIRFLOW__DATABASE__SQL_ALCHEMY_CONN, but agents never connect to the metadata database: "
        "remove it.",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_sentinel_values_are_refused_with_a_sentence(case: str) -> None:
    vals, sentence = BAD[case]
    assert refusals(render_error(vals)) == [sentence]


def test_the_schema_refuses_unknown_sentinel_values() -> None:
    message = render_error(values(sentinel={"enabled": True, "tokenSecret": "s"}))
    assert "additional properties 'tokenSecret' not allowed" in message
