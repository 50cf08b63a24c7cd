"""Tasks run nicer than the agent; their supervisors too, once the task has started.

In a fresh interpreter: niceness, once raised, cannot be lowered again, and the
fork handler stays registered for the life of the process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

_PROBE = textwrap.dedent(
    """
    import json, os, sys

    from tether.agent.runner import run_started_tasks_nicer

    def nice():
        return os.getpriority(os.PRIO_PROCESS, 0)

    def nice_of_a_fork():
        pid = os.fork()
        if pid == 0:
            os._exit(nice())
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)

    class Supervisor:
        seen = {}

        @classmethod
        def start(cls):
            cls.seen["supervisor while starting"] = nice()
            # The task process, which forks a process of its own in turn (a subprocess of the task).
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.write(write, f"{nice()} {nice_of_a_fork()}".encode())
                os._exit(0)
            os.close(write)
            task, forked = os.read(read, 64).split()
            os.waitpid(pid, 0)
            cls.seen["task"], cls.seen["what the task forks"] = int(task), int(forked)
            return cls

    base = nice()
    applied = run_started_tasks_nicer(Supervisor, int(sys.argv[1]))
    Supervisor.start()
    Supervisor.seen["supervisor once started"] = nice()
    print(json.dumps({"applied": applied, **{k: v - base for k, v in Supervisor.seen.items()}}))
    """
)


def _probe(increment: int) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, str(increment)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("increment", "applied", "after_start"),
    [(5, True, 5), (0, False, 0)],
    ids=["the task and then its supervisor run nicer", "zero leaves every priority alone"],
)
def test_task_priority(increment: int, applied: bool, after_start: int) -> None:
    assert _probe(increment) == {
        "applied": applied,
        "supervisor while starting": 0,
        "task": after_start,
        "what the task forks": after_start,
        "supervisor once started": after_start,
    }
