"""A spare's head start: the Task SDK's own start runs the task in the process forked ahead.

Real forks of the test process; the task process is a stand-in target, so no plane is needed.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import socket
import stat
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from airflow.sdk.execution_time import supervisor

from tests.unit.sdk_probe import probe_supervisor
from tether.agent.headstart import Headstart
from tether.agent.runner import watch_task_exit
from tether.agent.sdk_internals import Feature, check, start_source_unsupported

#: Where the stand-in task process writes what it saw; set before each fork.
_REPORT: Path | None = None


def _report_and_exit() -> None:
    """The stand-in task process: what the SDK's fork would have made of it."""
    assert _REPORT is not None
    _REPORT.write_text(
        json.dumps(
            {
                "pid": os.getpid(),
                "parent": os.getppid(),
                "own_group": os.getpgid(0) == os.getpid(),
                "nice": os.getpriority(os.PRIO_PROCESS, 0),
                "stdin_is_a_socket": stat.S_ISSOCK(os.fstat(0).st_mode),
                "dumpable": _dumpable(),
            }
        )
    )


def _dumpable() -> bool:
    import ctypes

    return bool(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))  # PR_GET_DUMPABLE


def _supervisor_class() -> type[Any]:
    """The SDK's task supervisor, forking the stand-in instead of the task runner."""
    probe = probe_supervisor(_report_and_exit)
    watch_task_exit(probe)
    return probe


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(supervisor, "MIN_HEARTBEAT_INTERVAL", 3600)
    path = tmp_path / "task.json"
    monkeypatch.setattr(f"{__name__}._REPORT", path)
    return path


def test_this_task_sdk_gets_a_head_start() -> None:
    assert check()[Feature.HEAD_START] is None


def _start_source() -> str:
    return textwrap.dedent(inspect.getsource(supervisor.WatchedSubprocess.start))


def _with_line_after(source: str, anchor: str, line: str) -> str:
    (at,) = [row for row in source.splitlines() if anchor in row]
    indent = at[: len(at) - len(at.lstrip())]
    return source.replace(at, f"{at}\n{indent}{line}")


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s.replace("child_stdout, read_stdout = socketpair()", "read_stdout, child_stdout = socketpair()"),
        lambda s: _with_line_after(s, "child_logs, read_logs = socketpair()", "extra, other = socketpair()"),
        lambda s: _with_line_after(s, "pid = os.fork()", "again = os.fork()"),
        lambda s: s.replace("child_logs.fileno(), target)", "child_logs.fileno(), _subprocess_main)"),
    ],
    ids=["pair-ends-swapped", "fifth-pair", "second-fork", "other-target"],
)
def test_a_start_written_otherwise_gets_no_head_start(change: Any) -> None:
    source = _start_source()
    assert start_source_unsupported(source) is None
    changed = change(source)
    assert changed != source
    assert start_source_unsupported(changed) is not None


def test_the_sdks_start_runs_the_task_in_the_process_forked_ahead(report: Path) -> None:
    base = os.getpriority(os.PRIO_PROCESS, 0)
    headstart = Headstart(
        execution_api_url="http://127.0.0.1:9/execution/", task_nice=3, close_in_child=[], target=_report_and_exit
    )
    try:
        waiting = psutil.Process(headstart.pid)
        assert waiting.ppid() == os.getpid()
        time.sleep(0.2)
        assert not report.exists(), "the task process ran before its task came"

        kwargs: dict[str, Any] = {"token": "the-task-token"}
        headstart.take(kwargs)
        assert kwargs["client"] is headstart.client
        assert kwargs["client"].auth.token == "the-task-token"
        assert str(kwargs["client"].base_url) == "http://127.0.0.1:9/execution/"

        process = _supervisor_class().start()
        assert process.pid == headstart.pid
        # Only that one start was served from the head start.
        assert supervisor.socketpair is socket.socketpair
        assert supervisor.os is os
        # The same 0.2 s, once its task came, see the task process run it.
        time.sleep(0.2)
        assert report.exists(), "the task process did not run its task once it came"
        assert process.wait() == 0
    finally:
        headstart.release()
    seen = json.loads(report.read_text())
    assert seen == {
        "pid": headstart.pid,
        "parent": os.getpid(),
        "own_group": True,
        "nice": min(base + 3, 19),
        "stdin_is_a_socket": True,
        "dumpable": False,
    }


def test_a_spare_let_go_leaves_no_waiting_process(report: Path) -> None:
    headstart = Headstart(
        execution_api_url="http://127.0.0.1:9/", task_nice=0, close_in_child=[], target=_report_and_exit
    )
    pid = headstart.pid
    headstart.release()
    assert not psutil.pid_exists(pid)  # exited and reaped
    assert not report.exists()


def test_a_client_that_cannot_be_made_leaves_no_waiting_process(monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow.sdk.api import client

    def refuse(**kwargs: Any) -> None:
        raise ValueError("no client here")

    monkeypatch.setattr(client, "Client", refuse)
    before = {child.pid for child in psutil.Process().children()}
    with pytest.raises(ValueError, match="no client here"):
        Headstart(execution_api_url="http://127.0.0.1:9/", task_nice=0, close_in_child=[], target=_report_and_exit)
    assert {child.pid for child in psutil.Process().children()} == before


def test_a_start_otherwise_than_expected_forks_anew(report: Path) -> None:
    headstart = Headstart(
        execution_api_url="http://127.0.0.1:9/", task_nice=0, close_in_child=[], target=_report_and_exit
    )
    waiting = headstart.pid
    headstart.take({"token": "t"})
    # Three pairs where the SDK makes four: the pre-made ones cannot be what this start expects.
    pairs = [supervisor.socketpair() for _ in range(3)]
    pid = supervisor.os.fork()
    if pid == 0:  # pragma: no cover - the fresh child
        pairs[0][0].sendall(b"from the fresh child")
        os._exit(7)
    assert pid != waiting
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 7
    assert pairs[0][1].recv(64) == b"from the fresh child"  # the pairs given out stay the SDK's
    assert not psutil.pid_exists(waiting)
    assert supervisor.socketpair is socket.socketpair and supervisor.os is os
    assert not report.exists()


def test_a_task_process_killed_while_it_waited_is_forked_anew(report: Path) -> None:
    headstart = Headstart(
        execution_api_url="http://127.0.0.1:9/", task_nice=0, close_in_child=[], target=_report_and_exit
    )
    waiting = headstart.pid
    os.kill(waiting, signal.SIGKILL)
    assert _gone(waiting)
    headstart.take({"token": "t"})
    process = _supervisor_class().start()
    try:
        assert process.pid != waiting
        assert process.wait() == 0
    finally:
        headstart.release()
    assert json.loads(report.read_text())["pid"] == process.pid
    assert not psutil.pid_exists(waiting)  # reaped


def test_the_waiting_process_dies_with_its_spare(report: Path) -> None:
    read, write = os.pipe()
    spare = os.fork()
    if spare == 0:  # pragma: no cover - the stand-in spare
        try:
            os.close(read)
            headstart = Headstart(
                execution_api_url="http://127.0.0.1:9/", task_nice=0, close_in_child=[], target=_report_and_exit
            )
            os.write(write, str(headstart.pid).encode())
            time.sleep(30)
        finally:
            os._exit(0)
    os.close(write)
    waiting = int(os.read(read, 32))
    os.close(read)
    os.kill(spare, signal.SIGKILL)
    os.waitpid(spare, 0)
    assert _gone(waiting)
    assert not report.exists()
