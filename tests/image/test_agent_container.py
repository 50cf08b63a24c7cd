"""A container of the image registers with a real plane, runs tasks and drains on ``podman stop``."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.image.conftest import AGENT_UID, FACTS, Container, first_heartbeat, podman, start_container
from tether.embedded import Plane, wait_until

#: The first test builds the image (the session's fixture): on a new machine that installs the
#: tools, makes the stand-in base and installs Airflow, several minutes on two busy cores.
pytestmark = pytest.mark.timeout(1800)

DRAIN_TIMEOUT = 60
#: podman stop's grace period, as the chart's terminationGracePeriodSeconds: SIGKILL after it.
STOP_TIMEOUT = 90


@pytest.fixture(scope="module")
def container(image: str, plane: Plane, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    token = plane.create_token("image-worker", scopes=("worker",))
    tmp = tmp_path_factory.mktemp("image-worker")
    started = start_container(image, plane, tmp, token, queues="default", slots="2", drain_timeout=str(DRAIN_TIMEOUT))
    try:
        registered, heartbeat = first_heartbeat(plane, started)
        FACTS["podman run to registration"] = f"{registered:.1f}s"
        FACTS["podman run to first heartbeat"] = f"{heartbeat:.1f}s"
        print(f"podman run to first heartbeat: {heartbeat:.1f}s (registered after {registered:.1f}s)")
        yield started
    finally:
        podman("rm", "--force", "--time=5", started.name, check=False)


def _xcom(plane: Plane, dag_id: str, run_id: str) -> dict[str, object]:
    rows = plane.query(
        "SELECT value FROM xcom WHERE dag_id = :d AND run_id = :r AND key = 'return_value'", d=dag_id, r=run_id
    )
    assert rows, f"no XCom from {dag_id}/{run_id}"
    value = rows[0][0]
    return dict(json.loads(value) if isinstance(value, str | bytes) else value)


def test_the_container_registers_as_user_50000_on_a_read_only_root(plane: Plane, container: Container) -> None:
    row = plane.query(
        "SELECT roles, queues, slots, python_version, airflow_version, tether_version FROM tether_agent "
        "WHERE name = :n",
        n=container.name,
    )[0]
    assert list(row[0]) == ["worker"]
    assert list(row[1]) == ["default"]
    assert row[2] == 2
    assert str(row[3]).startswith("3.11")
    info = json.loads(podman("inspect", "--type", "container", container.name).stdout)[0]
    assert info["HostConfig"]["ReadonlyRootfs"] is True
    assert podman("exec", container.name, "id", "-u").stdout.strip() == str(AGENT_UID)
    write = podman("exec", container.name, "touch", "/usr/local/probe", check=False)
    assert write.returncode != 0
    assert "Read-only file system" in write.stderr
    # Host network: the agent's health port is this machine's.
    wait_until(lambda: _status(container.health_port, "/readyz") == 200, 60, "the agent's /readyz")


def _status(port: int, path: str) -> int:
    try:
        return httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2).status_code
    except httpx.HTTPError:
        return 0


def test_the_container_runs_a_task(plane: Plane, container: Container) -> None:
    plane.wait_for_dag("image_hello")
    run_id = plane.trigger("image_hello")
    assert plane.wait_for_run("image_hello", run_id, timeout=240) == "success", container.logs()
    agents = plane.query(
        "SELECT agent_name, state FROM tether_job WHERE dag_id = 'image_hello' AND run_id = :r", r=run_id
    )
    assert [(a, s) for a, s in agents] == [(container.name, "SUCCESS")]
    assert _xcom(plane, "image_hello", run_id) == {"uid": AGENT_UID, "root_writable": False, "home": "/home/tether"}


def test_podman_stop_drains_the_running_task(plane: Plane, container: Container) -> None:
    plane.wait_for_dag("image_drain")
    run_id = plane.trigger("image_drain")
    wait_until(
        lambda: plane.query(
            "SELECT 1 FROM tether_job WHERE dag_id = 'image_drain' AND run_id = :r AND state = 'RUNNING' "
            "AND agent_name = :n",
            r=run_id,
            n=container.name,
        ),
        120,
        "the slow task running in the container",
    )
    started = time.monotonic()
    podman("stop", f"--time={STOP_TIMEOUT}", container.name, timeout=STOP_TIMEOUT + 60)
    stopped_after = time.monotonic() - started
    FACTS["podman stop while a 20 s task ran"] = f"{stopped_after:.1f}s"
    state = container.state()
    logs = container.logs()
    assert state["ExitCode"] == 0, logs
    assert f"Draining: waiting up to {DRAIN_TIMEOUT}s for 1 task(s) to finish" in logs
    assert "Drained: every task finished" in logs
    # SIGKILL would have come at STOP_TIMEOUT: the agent ended by itself, after the task.
    assert stopped_after < STOP_TIMEOUT, logs
    assert plane.wait_for_run("image_drain", run_id, timeout=60) == "success", logs
    assert _xcom(plane, "image_drain", run_id)["uid"] == AGENT_UID
    jobs = plane.query(
        "SELECT agent_name, state FROM tether_job WHERE dag_id = 'image_drain' AND run_id = :r", r=run_id
    )
    assert [(a, s) for a, s in jobs] == [(container.name, "SUCCESS")]
