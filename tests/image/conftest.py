"""The agent image, built by scripts/image and run with podman against a real plane on this host.

The image is built once per session. Containers run as the chart runs them: user and group 50000,
a read-only root filesystem with /tmp and the agent's home as empty writable volumes, every
capability dropped, no privilege escalation, the token a 0440 file in a read-only mount. They
use the host's network, so the plane at http://127.0.0.1:PORT is this machine's.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest

import tether
from tests.conftest import running_plane
from tether.embedded import Plane, free_port, wait_until

REPO = Path(__file__).resolve().parents[2]
IMAGE_SCRIPT = REPO / "scripts" / "image"
DAGS = Path(__file__).parent / "dags"
TAG = f"localhost/tether-agent:{tether.__version__}"
#: The chart's paths (templates/_helpers.tpl, _pod.tpl).
TOKEN_DIR = "/var/run/secrets/tether/token"
DAGS_IN_IMAGE = "/opt/tether/dags"
AGENT_UID = 50000

#: What the tier measured, printed at the end of the run.
FACTS: dict[str, str] = {}


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FACTS:
        terminalreporter.section("agent image")
        for key, value in FACTS.items():
            terminalreporter.write_line(f"{key}: {value}")


def podman(*args: str, timeout: float = 180, check: bool = True) -> subprocess.CompletedProcess[str]:
    """podman with the image's storage and settings (scripts/image podman)."""
    result = subprocess.run(
        [str(IMAGE_SCRIPT), "podman", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def chart_flags(tmp: Path) -> list[str]:
    """How the chart runs the agent container (values.yaml: podSecurityContext, containerSecurityContext).

    /tmp and /home/tether are emptyDir volumes there: new host folders of mode 0777 here, as the
    kubelet makes them (a podman tmpfs would take the mode of the image's folder instead).
    """
    volumes = []
    for path in ("/tmp", "/home/tether"):
        folder = tmp / f"empty-dir-{secrets.token_hex(3)}"
        folder.mkdir(parents=True)
        folder.chmod(0o777)
        volumes.append(f"--volume={folder}:{path}")
    return [
        f"--user={AGENT_UID}:{AGENT_UID}",
        "--read-only",
        "--read-only-tmpfs=false",
        *volumes,
        "--cap-drop=ALL",
        "--security-opt=no-new-privileges",
    ]


@pytest.fixture(scope="session")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Build the image with scripts/image (the stand-in base is cached after the first build)."""
    folder = tmp_path_factory.mktemp("image-build")
    log, iidfile = folder / "build.log", folder / "image-id"
    started = time.monotonic()
    with log.open("w") as out:
        result = subprocess.run(
            [str(IMAGE_SCRIPT), "build", "--tag", TAG, "--iidfile", str(iidfile)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=1700,
        )
    output = log.read_text(errors="replace")
    if result.returncode != 0:
        pytest.fail(f"scripts/image build failed ({result.returncode}); its output ends:\n{output[-6000:]}")
    FACTS["build"] = f"{time.monotonic() - started:.0f}s (scripts/image build, log {log})"
    # The image by its ID: another build of the same tag on this machine does not change it.
    return iidfile.read_text().strip()


@pytest.fixture(scope="session")
def plane(tmp_path_factory: pytest.TempPathFactory, pg_admin_url: str) -> Iterator[Plane]:
    """A real plane on PostgreSQL: API server, scheduler and DAG processor on this host."""
    with running_plane(pg_admin_url, tmp_path_factory.mktemp("image-plane") / "plane", DAGS, {}) as plane:
        yield plane


@dataclass
class Container:
    name: str
    health_port: int
    #: Wall-clock time just before ``podman run``.
    started: float
    flags: list[str] = field(default_factory=list)

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return (result.stdout + result.stderr)[-6000:]

    def state(self) -> dict[str, object]:
        info = json.loads(podman("inspect", "--type", "container", self.name).stdout)[0]
        return dict(info["State"])


def token_mount(tmp: Path, token: str) -> list[str]:
    """The token as the chart mounts its Secret: a 0440 file of group 50000 (fsGroup), read-only."""
    folder = tmp / f"secret-{secrets.token_hex(3)}"
    folder.mkdir(parents=True)
    (folder / "token").write_text(token)
    os.chown(folder, 0, AGENT_UID)
    os.chown(folder / "token", 0, AGENT_UID)
    folder.chmod(0o750)
    (folder / "token").chmod(0o440)
    return [f"--volume={folder}:{TOKEN_DIR}:ro"]


def agent_flags(plane: Plane, name: str, tmp: Path, token: str, health_port: int, **settings: str) -> list[str]:
    env = {
        "TETHER_NAME": name,
        "TETHER_PLANE_URL": plane.url,
        "TETHER_TOKEN_FILE": f"{TOKEN_DIR}/token",
        "TETHER_HEALTH_PORT": str(health_port),
        "TETHER_LOG_LEVEL": "INFO",
        "AIRFLOW__CORE__DAGS_FOLDER": DAGS_IN_IMAGE,
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    }
    env.update({f"TETHER_{k.upper()}": v for k, v in settings.items()})
    return [
        *chart_flags(tmp),
        "--network=host",
        *token_mount(tmp, token),
        f"--volume={DAGS}:{DAGS_IN_IMAGE}:ro",
        *(f"--env={k}={v}" for k, v in env.items()),
    ]


def start_container(image: str, plane: Plane, tmp: Path, token: str, **settings: str) -> Container:
    name = f"tether-image-{secrets.token_hex(4)}"
    port = free_port()
    flags = agent_flags(plane, name, tmp, token, port, **settings)
    started = time.time()
    # --timeout: should this session die without removing it, conmon ends it all the same.
    podman("run", "--detach", f"--name={name}", "--timeout=1800", *flags, image)
    return Container(name=name, health_port=port, started=started, flags=flags)


def first_heartbeat(plane: Plane, container: Container, timeout: float = 180) -> tuple[float, float]:
    """Seconds from ``podman run`` to the agent's registration, and to its first heartbeat after it."""

    polls = 0

    def seen() -> tuple[datetime, datetime] | None:
        nonlocal polls
        polls += 1
        rows = plane.query("SELECT registered_at, last_heartbeat FROM tether_agent WHERE name = :n", n=container.name)
        if rows and rows[0][1] > rows[0][0]:
            return rows[0][0], rows[0][1]
        # Now and then (podman is slow to ask): a container that exited will never heartbeat.
        if polls % 20 == 0 and container.state().get("Status") == "exited":
            raise AssertionError(f"the container exited:\n{container.logs()}")
        return None

    registered, heartbeat = wait_until(seen, timeout, f"a heartbeat from {container.name}", interval=0.1)
    return registered.timestamp() - container.started, heartbeat.timestamp() - container.started
