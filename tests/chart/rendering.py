"""Render the tether-agent chart offline and validate what comes out."""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "chart" / "tether-agent"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion); newer ones accept these objects too.
KUBERNETES_VERSION = "1.30.0"
# The KEDA whose CRD schemas the chart's ScaledObject and TriggerAuthentication are checked against:
# the models of cloudcoil-models-keda, pinned in requirements/dev.in. Bearer auth of metrics-api needs 2.13+.
KEDA_VERSION = "2.16.1"
RELEASE = "tether"
NAMESPACE = "agents"

TOKEN = "tether_0123abcd_" + "s" * 43

SCHEMA: dict[str, Any] = json.loads((CHART_DIR / "values.schema.json").read_text())

# The least a user must give: where the plane is, a token and both backends.
MINIMAL: dict[str, Any] = {
    "planeURL": "https://airflow.corp.internal",
    "agentToken": TOKEN,
    "secretBackend": "airflow.providers.hashicorp.secrets.vault.VaultBackend",
    "xcomBackend": "airflow.providers.common.io.xcom.backend.XComObjectStorageBackend",
}


def values(**overrides: Any) -> dict[str, Any]:
    """MINIMAL with overrides; a value of None removes the key."""
    out = copy.deepcopy(MINIMAL)
    for key, value in overrides.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def schema_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """A schema entry with its `$ref` resolved: the definition, under the entry's own keys."""
    ref = entry.get("$ref")
    if ref is None:
        return entry
    definition = SCHEMA["definitions"][ref.removeprefix("#/definitions/")]
    return {**schema_entry(definition), **{k: v for k, v in entry.items() if k != "$ref"}}


@cache
def _chart() -> helm.Chart:
    return helm.Chart.load(CHART_DIR)


def render_files(vals: dict[str, Any], *, namespace: str = NAMESPACE) -> dict[str, str]:
    """Template path -> rendered text, as `helm template` would write them."""
    return _chart().render(values=vals, name=RELEASE, namespace=namespace, is_install=True)


def render(vals: dict[str, Any], *, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    """Every Kubernetes object a `helm install` with these values would create."""
    objects: list[dict[str, Any]] = []
    for path, text in sorted(render_files(vals, namespace=namespace).items()):
        if not path.endswith((".yaml", ".yml")):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def render_error(vals: dict[str, Any]) -> str:
    """The message with which rendering these values fails."""
    try:
        render_files(vals)
    except helm.HelmError as exc:
        return str(exc)
    raise AssertionError("the chart rendered values that should have been refused")


def validate(obj: dict[str, Any]) -> None:
    """Raise unless the object is valid for KUBERNETES_VERSION (KEDA's for its kinds), unknown fields included."""
    if obj.get("apiVersion", "").startswith("keda.sh/"):
        validate_keda(obj)
    else:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def validate_keda(obj: dict[str, Any]) -> None:
    """Raise unless the object is valid by KEDA's own CRD schema, unknown fields included."""
    from cloudcoil.models.keda import v1alpha1

    if obj.get("apiVersion") != "keda.sh/v1alpha1":
        raise ValueError(f"KEDA {KEDA_VERSION} serves keda.sh/v1alpha1, not {obj.get('apiVersion')}")
    model = getattr(v1alpha1, obj["kind"], None)
    if model is None:
        raise ValueError(f"KEDA {KEDA_VERSION} has no kind {obj['kind']}")
    parsed = model.model_validate(obj, strict=True)
    unknown = _unknown_fields(obj, parsed.model_dump(mode="json", by_alias=True, exclude_unset=True), "")
    if unknown:
        raise ValueError(f"fields unknown to KEDA {KEDA_VERSION}'s {obj['kind']}: {', '.join(unknown)}")


def _unknown_fields(given: Any, kept: Any, where: str) -> list[str]:
    """The paths of ``given`` that validation dropped: fields the schema does not have."""
    if isinstance(given, dict) and isinstance(kept, dict):
        out = []
        for key, value in given.items():
            if key not in kept:
                out.append(f"{where}{key}")
            else:
                out.extend(_unknown_fields(value, kept[key], f"{where}{key}."))
        return out
    if isinstance(given, list) and isinstance(kept, list):
        pairs = enumerate(zip(given, kept, strict=False))
        return [path for i, (g, k) in pairs for path in _unknown_fields(g, k, f"{where}{i}.")]
    return []


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def pod_specs(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d["spec"]["template"]["spec"] for d in by_kind(objects, "Deployment")]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    """name -> value, or the valueFrom mapping when the value comes from elsewhere."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}
