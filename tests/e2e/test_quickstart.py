"""The README's first command: the quick start runs the example DAG on agents, the plane without DAG files."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(600)


def test_the_quick_start_runs_the_example_on_agents() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tether.quickstart"],
        capture_output=True,
        text=True,
        timeout=540,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "no DAG files, no DAG processor, no triggerer" in done.stdout
    assert "SUCCESS: tether_example" in done.stdout
    ran_on = next(line for line in done.stdout.splitlines() if "ran on agent(s):" in line)
    assert {"quickstart-triggerer", "quickstart-worker"} <= {n.strip() for n in ran_on.split(":", 1)[1].split(",")}
