"""The plane's metrics reach a StatsD listener through Airflow's own metrics pipeline, while DAGs run.

The plane (API server, scheduler) runs with ``[metrics] statsd_on``; the test
listens on a UDP socket on loopback. A task runs on one agent, a call with an
unknown token is refused, and another agent dies under a running task and is
swept: each shows under the names docs/metrics.md gives.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import running_plane
from tether import protocol
from tether.embedded import Plane, start_agent, wait_until

DAGS = Path(__file__).parent / "dags_metrics"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


class StatsdListener:
    """Every StatsD line sent to a UDP socket on loopback: (name, value, type)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]
        self.lines: list[tuple[str, float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            for line in data.decode(errors="replace").splitlines():
                found = re.match(r"^([^:]+):([-+]?[0-9.]+)\|(c|g|ms)", line)
                if found:
                    self.lines.append((found[1], float(found[2]), found[3]))

    def values(self, name: str, kind: str) -> list[float]:
        return [value for n, value, k in list(self.lines) if n == name and k == kind]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture(scope="module")
def statsd() -> Iterator[StatsdListener]:
    listener = StatsdListener()
    yield listener
    listener.close()


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory, pg_admin_url: str, statsd: StatsdListener) -> Iterator[Plane]:
    with running_plane(
        pg_admin_url,
        tmp_path_factory.mktemp("e2e-metrics") / "plane",
        DAGS,
        {
            "AIRFLOW__METRICS__STATSD_ON": "True",
            "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
            "AIRFLOW__METRICS__STATSD_PORT": str(statsd.port),
            "AIRFLOW__METRICS__STATSD_PREFIX": "airflow",
            "AIRFLOW__TETHER__HEARTBEAT_INTERVAL": "1",
        },
    ) as plane:
        yield plane


def documented() -> set[str]:
    """The metric names docs/metrics.md gives, with their last part as written (``<queue>`` and the like)."""
    return set(re.findall(r"`(tether\.[a-z_.<>]+)`", DOCS.read_text()))


def test_the_documented_metrics_arrive_while_dags_run(plane: Plane, statsd: StatsdListener) -> None:
    token = plane.create_token("metrics")
    worker = start_agent(plane, "metrics-1", token, queues="metricsq", slots="2")
    wait_until(lambda: worker.health("/readyz") == 200, 120, "agent metrics-1 ready")
    plane.wait_for_dag("e2e_metrics")
    run_id = plane.trigger("e2e_metrics")
    assert plane.wait_for_run("e2e_metrics", run_id, timeout=180) == "success"

    # A call with a token the plane does not know (a real one's id, another secret) is refused, and counted.
    forged = token[:-1] + ("a" if token[-1] != "a" else "b")
    refused = httpx.post(
        f"{plane.url}/tether/v1/agents/register",
        json={},
        headers={"Authorization": f"Bearer {forged}", protocol.PROTOCOL_HEADER: "2"},
        timeout=10,
    )
    assert refused.status_code == 401 and refused.json()["reason"] == "token_unknown"

    # An agent dies under a running task: the sweep settles it and says so.
    doomed = start_agent(plane, "metrics-doomed", token, queues="doomedq", slots="1")
    wait_until(lambda: doomed.health("/readyz") == 200, 120, "agent metrics-doomed ready")
    doomed_run = plane.trigger("e2e_metrics_doomed")
    running = "airflow.tether.jobs.running.doomedq"
    wait_until(lambda: statsd.values(running, "g")[-1:] == [1.0], 180, "the gauge shows it running")
    os.killpg(doomed.process.pid, signal.SIGKILL)
    wait_until(lambda: statsd.values("airflow.tether.sweeps.unhealthy_agents", "c"), 120, "the dead agent swept")
    assert plane.wait_for_run("e2e_metrics_doomed", doomed_run, timeout=120) == "failed"
    wait_until(lambda: statsd.values("airflow.tether.agents.unhealthy.worker", "g")[-1:] == [1.0], 60, "one unhealthy")
    wait_until(lambda: statsd.values(running, "g")[-1:] == [0.0], 60, "nothing running")

    expected = {
        "tether.jobs.queued.<queue>": ("airflow.tether.jobs.queued.metricsq", "g"),
        "tether.jobs.leased.<queue>": ("airflow.tether.jobs.leased.metricsq", "g"),
        "tether.jobs.running.<queue>": ("airflow.tether.jobs.running.metricsq", "g"),
        "tether.agents.healthy.<role>": ("airflow.tether.agents.healthy.worker", "g"),
        "tether.agents.unhealthy.<role>": ("airflow.tether.agents.unhealthy.worker", "g"),
        "tether.agents.terminated.<role>": ("airflow.tether.agents.terminated.triggerer", "g"),
        "tether.lease_wait.<queue>": ("airflow.tether.lease_wait.metricsq", "ms"),
        "tether.start_gate.<queue>": ("airflow.tether.start_gate.metricsq", "ms"),
        "tether.reports.<state>": ("airflow.tether.reports.success", "c"),
        "tether.refusals.<reason>": ("airflow.tether.refusals.token_unknown", "c"),
        "tether.sweeps.unhealthy_agents": ("airflow.tether.sweeps.unhealthy_agents", "c"),
    }
    assert set(expected) <= documented()
    missing = [sent for sent, kind in expected.values() if not statsd.values(sent, kind)]
    assert missing == [], sorted({n for n, _, _ in statsd.lines if ".tether." in n})
    # The figures are the fleet's: two healthy workers at first, one task waited for and started.
    assert max(statsd.values("airflow.tether.agents.healthy.worker", "g")) == 2
    assert len(statsd.values("airflow.tether.lease_wait.metricsq", "ms")) == 1
    assert len(statsd.values("airflow.tether.start_gate.metricsq", "ms")) == 1
    assert sum(statsd.values("airflow.tether.reports.success", "c")) == 1
    assert sum(statsd.values("airflow.tether.sweeps.unhealthy_agents", "c")) == 1
