"""The embedded plane's harness: what a timeout says about the plane's processes."""

from __future__ import annotations

import sys
from pathlib import Path

from tether.embedded import Plane, spawn, wait_until


def test_a_timeout_names_the_plane_processes_that_exited_with_their_logs_end(tmp_path: Path) -> None:
    plane = Plane(home=tmp_path, dags_folder=tmp_path, sql_alchemy_conn="sqlite://")
    logs = tmp_path / "logs"
    plane.processes["scheduler"] = spawn(
        "scheduler", [sys.executable, "-c", "print('loop failed: deadlock detected'); raise SystemExit(1)"], {}, logs
    )
    plane.processes["api-server"] = spawn("api-server", [sys.executable, "-c", "import time; time.sleep(60)"], {}, logs)
    try:
        wait_until(lambda: not plane.processes["scheduler"].alive(), 30, "the scheduler to exit")
        said = plane.exited()
    finally:
        plane.stop()
    assert "scheduler exited (1)" in said
    assert "loop failed: deadlock detected" in said
    assert "api-server" not in said, "a process still running is not named"
