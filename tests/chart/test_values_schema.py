"""values.yaml and values.schema.json describe the same values with the same defaults."""

from __future__ import annotations

from typing import Any

import yaml

from tests.chart.rendering import CHART_DIR, SCHEMA, schema_entry

VALUES = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
JSON_TYPES = {
    "string": str,
    "integer": int,
    "boolean": bool,
    "object": dict,
    "array": list,
    "null": type(None),
}


def _has_type(value: Any, types: str | list[str]) -> bool:
    names = [types] if isinstance(types, str) else types
    return any(type(value) is JSON_TYPES[name] for name in names)


def _walk(schema: dict[str, Any], defaults: dict[str, Any], where: str) -> list[str]:
    """Problems between a schema's properties and the defaults that should match them."""
    problems = []
    properties = schema["properties"]
    if schema.get("additionalProperties") is not False:
        problems.append(f"{where or 'values'}: the schema allows unknown keys")
    for key in sorted(set(defaults) - set(properties)):
        problems.append(f"{where}{key}: in values.yaml, not in the schema")
    for key in sorted(set(properties) - set(defaults)):
        problems.append(f"{where}{key}: in the schema, not in values.yaml")
    for key in sorted(set(defaults) & set(properties)):
        entry, value, name = schema_entry(properties[key]), defaults[key], f"{where}{key}"
        for field in ("description", "type", "default"):
            if field not in entry:
                problems.append(f"{name}: the schema gives no {field}")
        if not str(entry.get("description", "")).strip():
            problems.append(f"{name}: empty description")
        if "default" in entry and entry["default"] != value:
            problems.append(f"{name}: schema default {entry['default']!r} != values.yaml {value!r}")
        if "type" in entry and not _has_type(value, entry["type"]):
            problems.append(f"{name}: {value!r} is not of type {entry['type']}")
        if "properties" in entry:
            problems.extend(_walk(entry, value, f"{name}."))
    return problems


def test_every_value_has_a_schema_entry_with_its_default_and_back() -> None:
    assert _walk(SCHEMA, VALUES, "") == []


def test_the_default_worker_is_the_schema_defaults_of_a_worker() -> None:
    item = SCHEMA["properties"]["workers"]["items"]
    [worker] = VALUES["workers"]
    assert _walk(item, worker, "workers[].") == []


def _documented_paths(schema: dict[str, Any], path: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Paths of the mappings whose keys are chart values (not free-form Kubernetes objects)."""
    paths = {path}
    for key, entry in schema["properties"].items():
        entry = schema_entry(entry)
        if "properties" in entry:
            paths |= _documented_paths(entry, (*path, key))
        items = schema_entry(entry.get("items", {}))
        if "properties" in items:
            paths |= _documented_paths(items, (*path, key))
    return paths


# Their keys are Kubernetes probe fields, commented once at the probe.
KUBERNETES_FIELDS = {
    (group, "probes", probe)
    for group in ("workers", "dagProcessor", "triggerer")
    for probe in ("liveness", "readiness")
}


def test_every_value_has_a_comment_above_it() -> None:
    documented = _documented_paths(SCHEMA) - KUBERNETES_FIELDS
    assert {
        ("workers",),
        ("image",),
        ("dagProcessor",),
        ("triggerer",),
        ("workers", "probes"),
        ("triggerer", "probes"),
    } <= documented
    stack: list[tuple[int, str]] = []
    previous = ""
    uncommented = []
    for line in (CHART_DIR / "values.yaml").read_text().splitlines():
        text = line.strip()
        if not text:
            continue
        content = text.removeprefix("- ").strip()
        if not content.startswith("#") and ":" in content:
            indent = len(line) - len(line.lstrip(" -"))
            while stack and stack[-1][0] >= indent:
                stack.pop()
            parent = tuple(key for _, key in stack)
            key = content.split(":", 1)[0]
            if parent in documented and not previous.removeprefix("- ").startswith("#"):
                uncommented.append(".".join((*parent, key)))
            stack.append((indent, key))
        previous = text
    assert uncommented == []
