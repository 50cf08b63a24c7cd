"""scripts/audit.py: a pin with a published advisory fails, naming it; the lock as it is passes."""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "audit.py"


@pytest.fixture(scope="module")
def audit() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tether_audit", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _lock(tmp_path: Path, *pins: str) -> Path:
    lock = tmp_path / "lock.txt"
    lock.write_text("# a lock\n" + "".join(f"{pin}\n    # via something\n" for pin in pins))
    return lock


def test_the_projects_own_lock_matches_no_advisory(audit: ModuleType, tmp_path: Path) -> None:
    assert audit.main(["--offline", "--ignore", str(tmp_path / "none")]) == 0


def test_a_vulnerable_pin_fails_and_names_the_advisory(
    audit: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lock = _lock(tmp_path, "jinja2==2.10", "packaging==24.0")
    assert audit.main([str(lock), "--offline", "--ignore", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err
    assert "jinja2==2.10: " in err and "CVE-2020-28493" in err
    assert "packaging" not in err.split("To update")[0]
    assert "uv pip compile" in err


def test_an_ignored_advisory_needs_a_reason(audit: ModuleType, tmp_path: Path) -> None:
    lock = _lock(tmp_path, "requests==2.19.0")
    ignore = tmp_path / "ignore.txt"
    ignore.write_text("CVE-2018-18074  # no redirects to http in our use\n")
    assert audit.main([str(lock), "--offline", "--ignore", str(ignore)]) == 0
    ignore.write_text("CVE-2018-18074\n")
    with pytest.raises(SystemExit, match="without a reason"):
        audit.main([str(lock), "--offline", "--ignore", str(ignore)])


def test_a_lock_that_pins_nothing_is_an_error(audit: ModuleType, tmp_path: Path) -> None:
    assert audit.main([str(tmp_path / "missing.txt"), "--offline"]) == 2
    assert audit.main([str(_lock(tmp_path)), "--offline"]) == 2


class _Index:
    """A package index's JSON API on loopback that knows one advisory, or none."""

    def __init__(self, knows_advisories: bool) -> None:
        index = self
        self.knows_advisories = knows_advisories
        self.asked: list[str] = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                """Quiet."""

            def do_GET(self) -> None:
                index.asked.append(self.path)
                _, name, version, _ = self.path.strip("/").split("/")
                vulnerable = index.knows_advisories and (name, version) in {("jinja2", "2.10"), ("idna", "3.6")}
                advisories = [{"id": f"PYSEC-{name}", "aliases": ["CVE-0000-1"], "summary": "bad", "fixed_in": ["9"]}]
                body = json.dumps({"info": {}, "vulnerabilities": advisories if vulnerable else []}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/pypi"


@pytest.fixture
def index() -> Iterator[_Index]:
    served = _Index(knows_advisories=True)
    yield served
    served.server.shutdown()


def test_the_index_advisories_are_checked_when_the_index_answers(
    audit: ModuleType, index: _Index, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lock = _lock(tmp_path, "idna==3.6", "packaging==24.0")
    assert audit.main([str(lock), "--index", index.url, "--ignore", str(tmp_path / "none")]) == 1
    captured = capsys.readouterr()
    assert "idna==3.6: PYSEC-idna, CVE-0000-1 (package index; fixed in 9)" in captured.err
    assert "/pypi/packaging/24.0/json" in index.asked


def test_an_index_that_lists_no_advisory_for_a_known_one_is_said_to_be_unreachable(
    audit: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blind = _Index(knows_advisories=False)
    try:
        lock = _lock(tmp_path, "idna==3.6")
        assert audit.main([str(lock), "--index", blind.url, "--ignore", str(tmp_path / "none")]) == 0
    finally:
        blind.server.shutdown()
    out = capsys.readouterr().out
    assert "cannot be reached from here (it lists no advisory for jinja2 2.10)" in out
    assert blind.asked == ["/pypi/jinja2/2.10/json"]
