"""Checks every pin of a lock file against known security advisories.

Two sources, each naming the advisory it matched:

* the advisory database that installs as a package (``safety-db``, pinned in the
  lock like every other tool): always read, needs no network;
* the package index's own advisory service (the ``vulnerabilities`` of each
  release in PyPI's JSON API, the source ``pip-audit`` reads), when it answers.
  When it cannot be reached, the report says so on its own line: the check is
  then only as new as the database above.

Exit status: 0 when no pin matches an advisory, 1 when one does (each printed
with its id, aliases and the versions that fix it), 2 for a lock that cannot be
read. ``requirements/audit-ignore.txt`` lists advisory ids to accept, one a line,
each with the reason after a ``#``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import httpx
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LOCK = ROOT / "requirements" / "lock.txt"
DEFAULT_IGNORE = ROOT / "requirements" / "audit-ignore.txt"
DEFAULT_INDEX = "https://pypi.org/pypi"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;#\\]+)")
UPDATE_HINT = (
    "To update a pin: raise its lower bound in pyproject.toml or requirements/dev.in, then run\n"
    "  .venv/bin/uv pip compile --python .venv/bin/python pyproject.toml --extra postgres "
    "requirements/dev.in -o requirements/lock.txt --upgrade-package NAME\n"
    "and scripts/bootstrap (README, 'Dependencies')."
)


@dataclass(frozen=True)
class Pin:
    name: str
    version: str


#: A release with published advisories (CVE-2020-28493 and others).
PROBE = Pin("jinja2", "2.10")


@dataclass(frozen=True)
class Finding:
    pin: Pin
    advisory: str
    aliases: tuple[str, ...]
    summary: str
    fixed_in: tuple[str, ...] = field(default=())
    source: str = ""

    def render(self) -> str:
        names = ", ".join((self.advisory, *self.aliases))
        fixed = f"; fixed in {', '.join(self.fixed_in)}" if self.fixed_in else ""
        summary = " ".join(self.summary.split())
        if len(summary) > 240:
            summary = summary[:237] + "..."
        return f"{self.pin.name}=={self.pin.version}: {names} ({self.source}{fixed})\n    {summary}"


def read_pins(lock: Path) -> list[Pin]:
    pins = []
    for line in lock.read_text().splitlines():
        match = PIN.match(line.strip())
        if match:
            pins.append(Pin(canonicalize_name(match.group(1)), match.group(2)))
    return pins


def read_ignored(path: Path) -> set[str]:
    if not path.exists():
        return set()
    ignored = set()
    for line in path.read_text().splitlines():
        advisory, _, reason = line.partition("#")
        advisory = advisory.strip()
        if not advisory:
            continue
        if not reason.strip():
            raise SystemExit(f"audit: {path}: {advisory} is ignored without a reason after '#'")
        ignored.add(advisory)
    return ignored


class OfflineDatabase:
    """The advisory database shipped by the ``safety-db`` package."""

    def __init__(self) -> None:
        # Read as a data file: the package's own module opens its files relative to the working folder.
        (path,) = [f for f in metadata.files("safety-db") or () if f.name == "insecure_full.json"]
        data = json.loads(path.read_text())
        meta = data.pop("$meta", {})
        self.dated = datetime.datetime.fromtimestamp(meta.get("timestamp", 0), tz=datetime.UTC).date()
        self.advisories: dict[str, list[dict[str, object]]] = {canonicalize_name(k): v for k, v in data.items()}

    def check(self, pins: Iterable[Pin]) -> Iterator[Finding]:
        for pin in pins:
            try:
                version = Version(pin.version)
            except InvalidVersion:
                continue
            for entry in self.advisories.get(pin.name, ()):
                if any(_matches(version, str(spec)) for spec in entry.get("specs") or ()):  # type: ignore[attr-defined]
                    cve = entry.get("cve")
                    yield Finding(
                        pin=pin,
                        advisory=str(entry.get("id")),
                        aliases=(str(cve),) if cve else (),
                        summary=str(entry.get("advisory", "")),
                        source=f"advisory database of {self.dated}",
                    )


def _matches(version: Version, spec: str) -> bool:
    try:
        return SpecifierSet(spec).contains(version, prereleases=True)
    except InvalidSpecifier:
        return False


class IndexAdvisories:
    """The package index's advisory service: each release's ``vulnerabilities`` in its JSON API."""

    def __init__(self, base: str, timeout: float = 10) -> None:
        self.base = base.rstrip("/")
        self.client = httpx.Client(timeout=timeout, follow_redirects=True)

    def reachable(self) -> str | None:
        """None when the service answers as it should, else why not.

        The probe is a release every advisory source lists as vulnerable: a
        service that answers it without advisories would pass every pin.
        """
        try:
            answer = self.client.get(f"{self.base}/{PROBE.name}/{PROBE.version}/json")
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        if answer.status_code != 200:
            return f"HTTP {answer.status_code} for {PROBE.name} {PROBE.version}"
        try:
            listed = answer.json()["vulnerabilities"]
        except (ValueError, KeyError):
            return "its answer is not the JSON API's"
        return None if listed else f"it lists no advisory for {PROBE.name} {PROBE.version}"

    def check(self, pins: Iterable[Pin]) -> Iterator[Finding]:
        with ThreadPoolExecutor(max_workers=8) as pool:
            for found in pool.map(self._check_one, pins):
                yield from found

    def _check_one(self, pin: Pin) -> list[Finding]:
        answer = self.client.get(f"{self.base}/{pin.name}/{pin.version}/json")
        if answer.status_code == 404:
            return []
        answer.raise_for_status()
        findings = []
        for entry in answer.json().get("vulnerabilities") or ():
            if entry.get("withdrawn"):
                continue
            findings.append(
                Finding(
                    pin=pin,
                    advisory=str(entry.get("id")),
                    aliases=tuple(entry.get("aliases") or ()),
                    summary=str(entry.get("summary") or entry.get("details") or ""),
                    fixed_in=tuple(entry.get("fixed_in") or ()),
                    source="package index",
                )
            )
        return findings


def audit(lock: Path, ignore: Path, index: str | None) -> int:
    try:
        pins = read_pins(lock)
    except OSError as exc:
        print(f"audit: cannot read {lock}: {exc}", file=sys.stderr)
        return 2
    if not pins:
        print(f"audit: {lock} pins nothing (expected lines like name==1.2.3)", file=sys.stderr)
        return 2
    ignored = read_ignored(ignore)
    offline = OfflineDatabase()
    findings = list(offline.check(pins))
    print(f"audit: {len(pins)} pins of {lock.name} checked against the advisory database of {offline.dated}")
    if index is not None:
        service = IndexAdvisories(index)
        why_not = service.reachable()
        if why_not is None:
            findings.extend(service.check(pins))
            print(f"audit: and against the package index's advisories ({index})")
        else:
            print(
                f"audit: the package index's advisory service ({index}) cannot be reached from here ({why_not}): "
                f"advisories newer than {offline.dated} were not checked"
            )
    kept = [f for f in findings if f.advisory not in ignored and not ignored.intersection(f.aliases)]
    unique = {(f.pin, f.advisory): f for f in kept}
    if not unique:
        print("audit: no pin matches a known advisory")
        return 0
    print(f"audit: {len(unique)} known advisories match pinned versions:", file=sys.stderr)
    for finding in sorted(unique.values(), key=lambda f: (f.pin.name, f.advisory)):
        print(f"  {finding.render()}", file=sys.stderr)
    print(UPDATE_HINT, file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lock", nargs="?", type=Path, default=DEFAULT_LOCK)
    parser.add_argument("--ignore", type=Path, default=DEFAULT_IGNORE, help="advisory ids accepted, with reasons")
    parser.add_argument("--index", default=DEFAULT_INDEX, help="the package index's JSON API")
    parser.add_argument("--offline", action="store_true", help="read only the advisory database")
    args = parser.parse_args(argv)
    return audit(args.lock, args.ignore, None if args.offline else args.index)


if __name__ == "__main__":
    sys.exit(main())
