"""The launcher and its spares as real processes: parenthood, failures, clean-up.

Each scenario runs in a fresh interpreter: the agent's side becomes a child
subreaper, which the test process itself must not become.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import psutil
import pytest

_SCENARIOS = textwrap.dedent(
    """
    import asyncio, json, os, signal, sys, tempfile, time

    import psutil

    from tether.agent import launcher as launcher_module
    from tether.agent.launcher import Launcher, reap_strays
    from tether.agent.runner import ForkedTask


    def run(message):
        # In a spare: "exit N", or "orphan N" (leave a grandchild behind that exits after N ms).
        verb, value = message.decode().split()
        if verb == "orphan" and os.fork() == 0:
            time.sleep(int(value) / 1000)
            os._exit(0)
        os._exit(int(value) if verb == "exit" else 0)


    async def until(predicate, timeout=10):
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.01)


    def zombies():
        return [c.pid for c in psutil.Process().children() if c.status() == psutil.STATUS_ZOMBIE]


    async def spare_runs_as_the_launchers_child(launcher):
        spare = await launcher.take(10)
        parent = psutil.Process(spare.pid).ppid()
        spare.hand(b"exit 7")
        code = await ForkedTask(pid=spare.pid, _pidfd=spare.pidfd, _exit_status=launcher.exit_status).wait()
        title = " ".join(psutil.Process(launcher.pid).cmdline()).strip()
        return {"parent_is_launcher": parent == launcher.pid, "exit_code": code, "title": title}


    async def launcher_holds_status_back(launcher):
        # A launcher that stops answering while a spare it made exits: stopped, so the spare becomes ours.
        launcher_module._STATUS_WAIT = 1.0
        spare = await launcher.take(10)
        os.kill(launcher.pid, signal.SIGSTOP)
        spare.hand(b"exit 5")
        code = await ForkedTask(pid=spare.pid, _pidfd=spare.pidfd, _exit_status=launcher.exit_status).wait()
        gone = not psutil.pid_exists(launcher.pid)
        return {"exit_code": code, "launcher_usable": launcher.usable, "launcher_gone": gone}


    async def launcher_killed(launcher):
        spare = await launcher.take(10)
        os.kill(launcher.pid, signal.SIGKILL)
        await until(lambda: not launcher.usable)
        spare.hand(b"exit 3")
        code = await ForkedTask(pid=spare.pid, _pidfd=spare.pidfd, _exit_status=launcher.exit_status).wait()
        # Spares made before still serve; then the agent is told to fork for itself.
        left = 0
        while (more := await launcher.take(1)) is not None:
            more.hand(b"exit 0")
            await ForkedTask(pid=more.pid, _pidfd=more.pidfd, _exit_status=launcher.exit_status).wait()
            left += 1
        reap_strays(launcher.pids())
        return {"handed_out_spare_ran": code == 3, "spares_left": left <= 4, "zombies": zombies()}


    async def idle_spare_killed(launcher):
        await launcher.take(10)  # attaches, and asks for the spares kept ready
        await until(lambda: launcher.ready == 2)
        victim = next(iter(launcher.pids() - {launcher.pid}))
        os.kill(victim, signal.SIGKILL)
        await until(lambda: victim not in launcher.pids() and launcher.ready == 2)
        return {"replaced": True, "victim_reaped": not psutil.pid_exists(victim)}


    async def close_reaps_everything(launcher):
        await launcher.take(10)
        await until(lambda: launcher.ready == 2)
        launcher.close()
        reap_strays(())
        return {"children": [c.pid for c in psutil.Process().children()]}


    async def strays_are_reaped(launcher):
        spare = await launcher.take(10)
        spare.hand(b"orphan 300")
        code = await ForkedTask(pid=spare.pid, _pidfd=spare.pidfd, _exit_status=launcher.exit_status).wait()
        await until(lambda: zombies())  # the grandchild, adopted, exited
        reaped = reap_strays(launcher.pids())
        return {"exit_code": code, "reaped": len(reaped), "zombies": zombies()}


    async def a_fork_holds_no_spare(launcher):
        # A task forked from the agent itself (no spare was ready) must not keep a spare it let go alive.
        await launcher.take(10)
        await until(lambda: launcher.ready == 2)
        spare = next(iter(launcher.pids() - {launcher.pid}))
        child = os.fork()
        if child == 0:
            launcher_module.leave_agents_descriptors()
            time.sleep(5)
            os._exit(0)
        launcher.close(wait=2)
        let_go = not psutil.pid_exists(spare)
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        return {"spare_gone": let_go}


    MARKS = tempfile.mkdtemp()


    def prepare(channel):
        # In a new spare, before it says it is up: mark it ready, and say how it is let go.
        mark = os.path.join(MARKS, str(os.getpid()))
        open(mark + ".ready", "w").close()
        return lambda: open(mark + ".released", "w").close()


    def marks(pid):
        return [m.split(".")[1] for m in sorted(os.listdir(MARKS)) if m.startswith(f"{pid}.")]


    async def prepared_spares(launcher):
        # The first two spares are an idle agent's: no head start. Those asked once starts came have one,
        # so at least one of three starts gets a head start, and at least two of the three left ready have one.
        handed = []
        for _ in range(3):
            spare = await launcher.take(10)
            spare.hand(b"exit 0")
            assert await ForkedTask(pid=spare.pid, _pidfd=spare.pidfd, _exit_status=launcher.exit_status).wait() == 0
            handed.append(marks(spare.pid))
        await until(lambda: launcher.ready == 3)
        idle = launcher.pids() - {launcher.pid}
        launcher.close(wait=5)
        let_go = [marks(pid) for pid in idle]
        # Which spare serves which start depends on which comes up first: count, do not order.
        return {
            "without_head_start": sum(m == [] for m in handed + let_go),
            "handed_out": sorted({tuple(m) for m in handed if m}),
            "let_go": sorted({tuple(m) for m in let_go if m}),
        }


    #: A descriptor of the agent's, open before the launcher is forked: a pipe's ends.
    AGENTS_READ, AGENTS_WRITE = os.pipe()


    async def agents_descriptors_stay_the_agents(launcher):
        spare = await launcher.take(10)
        os.close(AGENTS_WRITE)  # the agent closes its end: the reader sees the end unless another process holds it
        os.set_blocking(AGENTS_READ, False)

        def ended():
            try:
                return os.read(AGENTS_READ, 1) == b""
            except BlockingIOError:
                return False

        await until(ended)
        spare.hand(b"exit 0")
        code = await ForkedTask(pid=spare.pid, _pidfd=spare.pidfd, _exit_status=launcher.exit_status).wait()
        return {"end_seen": True, "exit_code": code}


    async def main(name):
        launcher = Launcher.fork(
            min_spares=2, max_spares=4, run=run, prepare=prepare if name.startswith("prepared") else None
        )
        assert launcher is not None, "not a subreaper"
        try:
            return await globals()[name](launcher)
        finally:
            launcher.close()


    print(json.dumps(asyncio.run(asyncio.wait_for(main(sys.argv[1]), 60))))
    """
)


def _scenario(name: str) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-c", _SCENARIOS, name], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_a_spare_is_the_launchers_child_and_its_exit_code_is_the_outcome() -> None:
    assert _scenario("spare_runs_as_the_launchers_child") == {
        "parent_is_launcher": True,
        "exit_code": 7,
        "title": "tether-agent launcher",
    }


def test_a_launcher_that_holds_an_exit_status_back_is_stopped_and_the_agent_reaps_the_spare() -> None:
    assert _scenario("launcher_holds_status_back") == {"exit_code": 5, "launcher_usable": False, "launcher_gone": True}


def test_the_launcher_and_its_spares_hold_none_of_the_agents_descriptors() -> None:
    assert _scenario("agents_descriptors_stay_the_agents") == {"end_seen": True, "exit_code": 0}


def test_a_killed_launcher_takes_no_task_with_it() -> None:
    assert _scenario("launcher_killed") == {"handed_out_spare_ran": True, "spares_left": True, "zombies": []}


def test_a_ready_spare_that_dies_is_reaped_and_replaced() -> None:
    assert _scenario("idle_spare_killed") == {"replaced": True, "victim_reaped": True}


def test_closing_stops_the_launcher_and_its_spares() -> None:
    assert _scenario("close_reaps_everything") == {"children": []}


def test_a_task_forked_from_the_agent_keeps_no_spare_alive() -> None:
    assert _scenario("a_fork_holds_no_spare") == {"spare_gone": True}


def test_what_a_task_leaves_behind_is_adopted_and_reaped() -> None:
    assert _scenario("strays_are_reaped") == {"exit_code": 0, "reaped": 1, "zombies": []}


def test_a_spare_gets_ready_before_it_is_up_and_is_released_if_let_go() -> None:
    assert _scenario("prepared_spares") == {
        "without_head_start": 2,
        "handed_out": [["ready"]],
        "let_go": [["ready", "released"]],
    }


def test_children_are_read_from_proc_and_from_a_scan_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    from tether.agent import launcher

    started: list[subprocess.Popen[bytes]] = []
    try:
        # One child started from a thread that has ended since: the kernel lists it under another thread.
        thread = threading.Thread(target=lambda: started.append(subprocess.Popen(["sleep", "30"])))
        thread.start()
        thread.join()
        started.append(subprocess.Popen(["sleep", "30"]))
        exited = subprocess.Popen(["true"])
        started.append(exited)
        deadline = time.monotonic() + 10
        while psutil.Process(exited.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "a child of `true` did not exit within 10 s"
            time.sleep(0.01)
        mine = {p.pid for p in started}
        scanned = {c.pid for c in psutil.Process().children()}

        def refused(*args: Any) -> Any:
            raise AssertionError("the scan was used")

        with monkeypatch.context() as patched:
            patched.setattr(launcher.psutil.Process, "children", refused)
            from_proc = set(launcher.children())
        assert mine <= from_proc  # the zombie too: reap_strays finds what to reap in this list
        assert from_proc == scanned

        def no_proc(path: str) -> Any:
            raise FileNotFoundError(path)

        monkeypatch.setattr(launcher.os, "scandir", no_proc)
        assert set(launcher.children()) == scanned
    finally:
        for process in started:
            process.kill()
            process.wait()
