"""A spare's head start: it forks its task process before its task arrives.

Between a spare receiving its workload and the Task SDK stamping the task's
start, the supervisor makes its Execution API client and forks the task process.
On a busy machine that is the slow part of a start, less for the CPU it takes
(about 8 ms) than for the waits for a CPU on the way. Neither depends on the
task, so a spare does them while it waits. On two cores running 16 tasks,
the median from a spare receiving its workload to the start stamp went from
180 to 127 ms:

- it makes the client, with the plane's URL and no token yet (the workload's
  token is set on it as the SDK itself sets a refreshed one);
- it makes the four socket pairs the SDK's ``WatchedSubprocess.start`` makes,
  in the same order, and forks the task process, which waits on a pipe;
- when the SDK's ``start`` runs, it gets those pairs and that process instead of
  new ones, and the process is told to go on: it runs the SDK's own child
  entry point (``_fork_main``) with the same arguments a fresh fork would have.

The SDK's own code does everything else, in its own order. This leans on how
``WatchedSubprocess.start`` is written, so the agent reads its source first
(``sdk_internals.check``); when it does not look exactly as expected, spares
start tasks as before, without a head start. Every private part of the SDK it
touches is reached through ``tether.agent.sdk_internals``.

The waiting process is the spare's child: niced like a task, non-dumpable like a
task, killed with the spare (``PR_SET_PDEATHSIG``), and gone the moment its
spare is let go without a task (the end of the pipe). Only spares made while
tasks start often get a head start (``Launcher.trim``): an idle agent's spare
goes without, since the waiting process holds about 3 MB of its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterable
from typing import Any

from tether.agent import sdk_internals
from tether.agent.launcher import prctl, set_title

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4


def _nicer(increment: int) -> None:
    if increment > 0:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, min(os.getpriority(os.PRIO_PROCESS, 0) + increment, 19))


class _OsWithOneFork:
    """The ``os`` module as the supervisor sees it while it starts the task: its next fork is made."""

    def __init__(self, fork: Callable[[], int]) -> None:
        self.fork = fork

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


class Headstart:
    """In a spare: the Execution API client and the task process, made before the task comes."""

    def __init__(
        self,
        *,
        execution_api_url: str,
        task_nice: int,
        close_in_child: Iterable[socket.socket],
        target: Callable[[], None] | None = None,
    ) -> None:
        """Make the client and fork the waiting task process. Raises when either cannot be made.

        ``close_in_child``: the spare's sockets the task process must not hold.
        ``target``: what the task process runs; the Task SDK's task runner by default.
        """
        import httpx
        from airflow.sdk.api.client import Client

        target = target or sdk_internals.task_runner_target()
        # As the SDK's own client for a task would be, less the token: it comes with the task.
        # Made first: when it cannot be, no waiting process is left behind.
        self.client = Client(
            base_url=execution_api_url,
            token="",
            limits=httpx.Limits(max_keepalive_connections=1, max_connections=10),
        )
        pairs = [socket.socketpair() for _ in sdk_internals.SUPERVISOR_PAIRS]
        go_read, go_write = os.pipe()
        spare = os.getpid()
        try:
            pid = os.fork()
        except OSError:
            for pair in pairs:
                for end in pair:
                    end.close()
            os.close(go_read)
            os.close(go_write)
            raise
        if pid == 0:  # pragma: no cover - runs in the waiting task process
            os.close(go_write)
            _wait_then_run(go_read, spare, pairs, list(close_in_child), task_nice, target)
        os.close(go_read)
        self.pid = pid
        self._go: int | None = go_write
        self._pairs: list[tuple[socket.socket, socket.socket]] | None = pairs
        self._handed = 0

    def take(self, kwargs: dict[str, Any]) -> None:
        """Start the task in ``kwargs`` (``supervise_task``'s arguments) with the head start."""
        from airflow.sdk.api.client import BearerAuth

        self.client.auth = BearerAuth(kwargs["token"])
        kwargs["client"] = self.client
        sdk_internals.supervisor_starts_with(self._socketpair, _OsWithOneFork(self._fork))

    def release(self) -> None:
        """The spare is let go, or its task starts without the head start: the waiting process exits.

        Socket pairs already given to the SDK stay open: they are the SDK's now.
        """
        self._restore()
        if self._go is not None:
            os.close(self._go)
            self._go = None
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
        for pair in (self._pairs or [])[self._handed :]:
            for end in pair:
                end.close()
        self._pairs = None

    def _socketpair(self, *args: Any, **kwargs: Any) -> tuple[socket.socket, socket.socket]:
        if args or kwargs or self._pairs is None or self._handed >= len(self._pairs):
            return socket.socketpair(*args, **kwargs)
        pair = self._pairs[self._handed]
        self._handed += 1
        return pair

    def _fork(self) -> int:
        assert self._pairs is not None and self._go is not None
        if self._handed != len(self._pairs):
            log.warning("The Task SDK started its task otherwise than expected; forking the task process anew")
            self.release()
            return os.fork()
        self._restore()
        try:
            # Gone already (killed while it waited) and reaped now, or still waiting.
            exited = os.waitpid(self.pid, os.WNOHANG)[0] != 0
            if not exited:
                os.write(self._go, b"g")
        except OSError:
            exited = True
        os.close(self._go)
        self._go = None
        # The supervisor closes the pairs' ends as after a fork of its own; hold no reference to them.
        self._pairs = None
        if exited:
            log.warning("The task process made ahead of the task had exited; forking the task process anew")
            return os.fork()
        return self.pid

    def _restore(self) -> None:
        sdk_internals.restore_supervisor()


def _wait_then_run(  # pragma: no cover - runs in the waiting task process
    go: int,
    spare: int,
    pairs: list[tuple[socket.socket, socket.socket]],
    inherited: list[socket.socket],
    task_nice: int,
    target: Callable[[], None],
) -> None:
    """The task process: wait for the go, then be what the SDK's fork makes."""
    code = 124
    try:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != spare:  # the spare died before we could ask to die with it
            os._exit(0)
        for sock in inherited:
            sock.close()
        _nicer(task_nice)
        # As the supervisor leaves the process it forks: not dumpable, no masked secrets of its own.
        prctl(_PR_SET_DUMPABLE, 0)
        sdk_internals.reset_secrets_masker()
        set_title("tether-agent spare: task process, waiting")
        if not os.read(go, 1):
            os._exit(0)  # let go without a task
        os.close(go)
        # A task outlives a killed supervisor as it would without a head start; the agent kills its tree.
        prctl(_PR_SET_PDEATHSIG, 0)
        # What WatchedSubprocess.start's child does after its fork.
        with contextlib.suppress(OSError):
            os.setpgid(0, 0)
        (out, read_out), (err, read_err), (requests, read_requests), (logs, read_logs) = pairs
        for end in (read_requests, read_out, read_err, read_logs):
            end.close()
        sdk_internals.fork_main(requests, out, err, logs.fileno(), target)
    except BaseException:
        import traceback

        with contextlib.suppress(BaseException):
            traceback.print_exc(file=sys.stderr)
            sys.stderr.flush()
    os._exit(code)
