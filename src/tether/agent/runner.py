"""Runs one Airflow workload in a child process with the Task SDK supervisor.

The child is a warm copy of the agent, which has already imported the Task SDK,
so a task does not pay interpreter start-up: a spare made ahead of time by the
launcher (``tether.agent.launcher``), or a fork of the agent when none is
ready: the launcher's child or the agent's, watched by the agent either way,
with its own process group and default signal handlers; its outcome is its exit
code, nothing else. The task
process under the supervisor runs ``task_nice`` steps below the agent's CPU
priority, so the processes that start, watch and report tasks stay responsive
while tasks use every CPU.

Stopping: ``terminate`` sends SIGTERM to the supervisor, which forwards it to the
task so ``on_kill`` hooks run; ``kill`` sends SIGKILL to every process of the
tree, because the task runner lives in a process group of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import json
import logging
import os
import signal
import socket
import sys
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol

import psutil

from tether.agent import sdk_internals
from tether.agent.headstart import Headstart
from tether.agent.launcher import (
    MAX_WORKLOAD_BYTES,
    Launcher,
    leave_agents_descriptors,
    leave_agents_signals,
    reap_strays,
    set_title,
)

log = logging.getLogger(__name__)

#: Exit code the child uses when the supervisor could not even be started.
EXIT_SETUP_FAILED = 125
#: Exit code given to a supervisor whose exit status died with the task launcher before it was passed on
#: (``ForkedTask.status_lost`` says so; a process may exit 255 itself).
EXIT_STATUS_LOST = 255
#: Spares an idle agent keeps ready; a busy one keeps more (see ``tether.agent.launcher``).
MIN_SPARES = 1
#: Longest wait for a spare before the agent forks the task itself.
SPARE_WAIT = 2.0
#: How often exited orphans the agent adopted are reaped, and spares beyond demand let go.
HOUSEKEEPING_EVERY = 5.0


class TaskProcess(Protocol):
    pid: int

    async def wait(self) -> int: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...


class Runner(Protocol):
    def start(self) -> None:
        """Called once the agent has registered, before its first lease; safe to call twice."""

    async def spawn(self, workload: dict[str, Any]) -> TaskProcess: ...

    def close(self) -> None: ...


@dataclass
class ForkedTask:
    """A task's supervisor, watched through its pidfd.

    The agent's own child is reaped here; a spare, the launcher's child, is given
    ``_exit_status``, which learns its status from the launcher (``Launcher.exit_status``).
    """

    pid: int
    _pidfd: int
    _exit_code: int | None = None
    _on_reaped: Callable[[int], None] | None = None
    _exit_status: Callable[[int], Awaitable[int | None]] | None = None
    #: The exit status was lost with the task launcher: the exit code is ``EXIT_STATUS_LOST``.
    status_lost: bool = False

    async def wait(self) -> int:
        if self._exit_code is not None:
            return self._exit_code
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[None] = loop.create_future()

        def on_exit() -> None:
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(self._pidfd, on_exit)
        try:
            await exited
        finally:
            loop.remove_reader(self._pidfd)
        if self._exit_status is None:
            _, status = os.waitpid(self.pid, 0)
            known: int | None = status
        else:
            known = await self._exit_status(self.pid)
        os.close(self._pidfd)
        self.status_lost = known is None
        self._exit_code = EXIT_STATUS_LOST if known is None else os.waitstatus_to_exitcode(known)
        if self._on_reaped is not None:
            self._on_reaped(self.pid)
        return self._exit_code

    def terminate(self) -> None:
        if self._exit_code is None:
            _signal(self.pid, signal.SIGTERM)

    def kill(self) -> None:
        if self._exit_code is not None:
            return
        try:
            tree = psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            tree = []
        _signal(self.pid, signal.SIGKILL)
        for child in tree:
            _signal(child.pid, signal.SIGKILL)


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def task_sdk_tls_environment(
    *, ca_bundle: Path | None, client_cert: Path | None, client_key: Path | None
) -> dict[str, str]:
    """The agent's TLS options, as the Task SDK's Execution API client reads them.

    One setting serves both connections to the plane: the agent's own and its tasks'.
    The SDK reads these when it is first imported, so they are set before that.
    """
    env = {}
    if ca_bundle:
        env["AIRFLOW__API__SSL_CA_FILE"] = str(ca_bundle)
    if client_cert and client_key:
        env["AIRFLOW__API__CLIENT_SSL_CERT"] = str(client_cert)
        env["AIRFLOW__API__CLIENT_SSL_KEY"] = str(client_key)
    return env


def warm_up(availability: sdk_internals.Availability) -> None:
    """Load, once in the agent, what every task would otherwise load after the fork.

    A forked child inherits its parent's modules, and their pages stay shared.
    Past the supervisor, the task runner imports Airflow's DagBag (with the
    serialization and ORM modules behind it) to parse the DAG file, and loads
    every installed Airflow plugin for its listeners. Done in each child, that
    cost about a CPU-second per task - more than a trivial task itself - and a
    private copy of those modules per running task. Anything that fails here is
    left for the child to do (and report) as before.
    """
    from airflow.sdk.execution_time import supervisor, task_runner  # noqa: F401

    try:
        import airflow.dag_processing.dagbag
        import airflow.executors.workloads
        import airflow.sdk
        from airflow.dag_processing.bundles.manager import DagBundlesManager
        from airflow.sdk.listener import get_listener_manager

        DagBundlesManager()  # type: ignore[no-untyped-call]
        get_listener_manager()
        # Nearly every DAG file imports from the Task SDK (`from airflow.sdk import
        # DAG, task`); its public names load lazily, `task` pulling in the standard
        # provider's operators. About 50 ms of CPU per task, for 1 MiB here.
        for name in airflow.sdk.__all__:
            with contextlib.suppress(Exception):
                getattr(airflow.sdk, name)
        # The process title every supervisor sets: a few milliseconds of CPU per task.
        with contextlib.suppress(ImportError):
            importlib.import_module("setproctitle")
        # Which coordinator runs a task, read from the configuration once per process and
        # cached: 1-5 ms of each supervisor's start, on the way to the task's start stamp.
        # A configuration the SDK refuses is left for each task to report, as before.
        with contextlib.suppress(Exception):
            from airflow.sdk.execution_time.coordinator import get_coordinator_manager

            get_coordinator_manager()
        if availability[sdk_internals.Feature.PRELOAD] is None:
            sdk_internals.preload()
    except Exception as exc:
        log.warning("Could not pre-load the task runner's modules; each task will load them: %s", exc)
    drop_metadata_engine()
    # Objects made so far are never collected: the collector then leaves their
    # pages alone, so children do not copy them on write.
    gc.freeze()


def drop_metadata_engine() -> None:
    """Drop the metadata-database engine that importing Airflow configured; an agent has no such database.

    Airflow's own workers do the same before they supervise a task. Kept, the
    engine is disposed again by an Airflow at-fork hook in every process forked
    from the agent - the launcher, each spare, each task's supervisor and task
    process - which costs each of them about 1.5 MiB of private memory.
    """
    settings = sys.modules.get("airflow.settings")
    if settings is None:
        return
    try:
        settings.dispose_orm(do_log=False)
    except Exception as exc:  # the engine stays; forks only cost more
        log.debug("Could not drop the metadata-database engine: %s", exc)


class ForkRunner:
    """Runs a supervisor per workload in a warm copy of the agent: a spare, or a fork when none is ready."""

    def __init__(
        self,
        *,
        execution_api_url: str,
        ca_bundle: Path | None = None,
        client_cert: Path | None = None,
        client_key: Path | None = None,
        task_nice: int = 10,
        min_spares: int = MIN_SPARES,
        max_spares: int = MIN_SPARES,
        availability: sdk_internals.Availability | None = None,
    ) -> None:
        """``availability``: the Task SDK features this agent may use (``sdk_internals.check()`` by default)."""
        self.execution_api_url = execution_api_url
        self.task_nice = task_nice
        os.environ.update(task_sdk_tls_environment(ca_bundle=ca_bundle, client_cert=client_cert, client_key=client_key))
        self.availability = dict(availability) if availability is not None else sdk_internals.check()
        sdk_internals.log_unavailable(self.availability)
        warm_up(self.availability)
        self._headstart: Headstart | None = None
        self._no_headstart = self.availability[sdk_internals.Feature.HEAD_START] if max_spares > 0 else None
        self._spares = (min_spares, max_spares)
        self._launcher: Launcher | None = None
        self._started = False
        self._children: set[int] = set()
        self._housekeeping: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Fork the task launcher (``tether.agent.launcher``), unless warm start is off.

        Called once the agent has registered: what registering made (the plane's
        connection, its TLS session, the answers' models) is then in the image
        the launcher and its spares share, rather than copied by the agent alone
        - some 5 MiB of the agent tree's memory. The launcher closes the agent's
        descriptors it inherits.
        """
        if self._started:
            return
        self._started = True
        min_spares, max_spares = self._spares
        if max_spares > 0:
            self._launcher = Launcher.fork(
                min_spares=min_spares,
                max_spares=max_spares,
                run=self._run_in_spare,
                prepare=self._prepare_spare if self._no_headstart is None else None,
            )

    def supervisor_arguments(self, workload: dict[str, Any]) -> dict[str, Any]:
        """``supervise_task``'s arguments for a task's workload, as Airflow's own executors give them.

        Another workload (a callback, a connection test) is given as ``workload``, for Airflow's
        ``BaseExecutor.run_workload``. Raises if the workload is malformed. Fields a newer plane's
        Airflow added are ignored.
        """
        from airflow.executors.workloads import ExecuteCallback, ExecuteTask, TestConnection

        kind = workload.get("type", "ExecuteTask")
        if kind == "ExecuteCallback":
            return {"workload": ExecuteCallback.model_validate(workload), "server": self.execution_api_url}
        if kind == "TestConnection":
            return {"workload": TestConnection.model_validate(workload), "server": self.execution_api_url}
        if kind != "ExecuteTask":
            raise ValueError(f"this agent does not run {kind} workloads")
        task = ExecuteTask.model_validate(workload)
        return {
            "ti": task.ti,
            "bundle_info": task.bundle_info,
            "dag_rel_path": task.dag_rel_path,
            "token": task.token,
            "server": self.execution_api_url,
            "log_path": task.log_path,
            "sentry_integration": getattr(task, "sentry_integration", "") or "",
        }

    async def spawn(self, workload: dict[str, Any]) -> ForkedTask:
        # Parsed in the agent: a malformed workload fails here, visibly, not in a child.
        kwargs = self.supervisor_arguments(workload)
        self._start_housekeeping()
        message = json.dumps(workload).encode()
        # Spares are made for tasks (their head start is a task's); other workloads are rare: a fork each.
        if self._launcher is not None and len(message) <= MAX_WORKLOAD_BYTES and "ti" in kwargs:
            spare = await self._launcher.take(SPARE_WAIT)
            if spare is not None:
                try:
                    spare.hand(message)
                except OSError as exc:
                    log.warning("Spare process %d could not take its task (%s); forking instead", spare.pid, exc)
                    spare.discard()
                    self._launcher.forget(spare.pid)
                else:
                    return self._track(
                        ForkedTask(pid=spare.pid, _pidfd=spare.pidfd, _exit_status=self._launcher.exit_status)
                    )
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            try:
                leave_agents_signals()  # first: the wake-up byte of a signal goes to a descriptor of the agent's
                leave_agents_descriptors()
            finally:
                _child_main(kwargs, self.task_nice, self.availability)
        try:
            os.setpgid(pid, pid)
        except OSError:
            pass  # the child already did it, or already exited
        return self._track(ForkedTask(pid=pid, _pidfd=os.pidfd_open(pid)))

    def close(self) -> None:
        """Stop the launcher and its spares; tasks already started run on. Safe to call twice."""
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            self._housekeeping = None
        if self._launcher is not None:
            self._launcher.close()
        self._reap()

    def _track(self, task: ForkedTask) -> ForkedTask:
        self._children.add(task.pid)
        task._on_reaped = self._children.discard
        return task

    def _prepare_spare(self, channel: socket.socket) -> Callable[[], None] | None:  # pragma: no cover - in a spare
        try:
            self._headstart = Headstart(
                execution_api_url=self.execution_api_url, task_nice=self.task_nice, close_in_child=[channel]
            )
        except Exception:
            # The spare still serves, as it would without a head start.
            traceback.print_exc(file=sys.stderr)
            sys.stderr.flush()
            return None
        return self._headstart.release

    def _run_in_spare(self, message: bytes) -> NoReturn:  # pragma: no cover - runs in a spare
        try:
            kwargs = self.supervisor_arguments(json.loads(message))
            if self._headstart is not None:
                self._headstart.take(kwargs)
        except BaseException:
            traceback.print_exc(file=sys.stderr)
            sys.stderr.flush()
            if self._headstart is not None:
                self._headstart.release()
            os._exit(EXIT_SETUP_FAILED)
        _child_main(kwargs, self.task_nice, self.availability)

    def _start_housekeeping(self) -> None:
        if self._housekeeping is None:
            self._housekeeping = asyncio.get_running_loop().call_later(HOUSEKEEPING_EVERY, self._keep_house)

    def _keep_house(self) -> None:
        self._reap()
        if self._launcher is not None:
            self._launcher.trim()
        self._housekeeping = asyncio.get_running_loop().call_later(HOUSEKEEPING_EVERY, self._keep_house)

    def _reap(self) -> None:
        keep = self._children | (self._launcher.pids() if self._launcher is not None else set())
        for pid in reap_strays(keep):
            log.debug("Reaped process %d, left behind by a task", pid)


def watch_task_exit(process_class: Any) -> bool:
    """Make the Task SDK's supervisor notice the task process's exit the moment it happens.

    The supervisor sleeps in ``select`` on the task's sockets and checks for the
    exit after each wake-up. When the last socket closes a moment before the
    process can be reaped, nothing wakes it again until its next heartbeat, up to
    ``[workers] min_heartbeat_interval`` (5 s) later: on a busy machine one task in
    ten finished that late. A pidfd among the watched files wakes it at the exit.

    Only ever called in a forked child that exists to run one task. Returns whether
    the watch is in place.
    """
    if not hasattr(os, "pidfd_open"):
        return False
    return sdk_internals.after_task_start(process_class, sdk_internals.watch_exit)


def run_started_tasks_nicer(process_class: Any | None, increment: int) -> bool:
    """Run the task, and its supervisor once the task has started, ``increment`` steps nicer than now.

    Called in a task's supervisor. Its only fork is the task process, which gets
    the lower priority at once; the supervisor itself keeps the agent's priority
    until the task has started, so starting a task is served before running
    them. The target is absolute, so what the task forks keeps the task's
    priority instead of dropping another ``increment``. Raising niceness needs no
    privilege. Returns whether the supervisor's own priority follows; without a
    ``process_class`` to hook (the SDK is not as expected), only the task process runs nicer.
    """
    if increment <= 0:
        return False
    target = min(os.getpriority(os.PRIO_PROCESS, 0) + increment, 19)

    def lower() -> None:
        with contextlib.suppress(OSError):
            if os.getpriority(os.PRIO_PROCESS, 0) < target:
                os.setpriority(os.PRIO_PROCESS, 0, target)

    os.register_at_fork(after_in_child=lower)
    if process_class is None:
        return False
    return sdk_internals.after_task_start(process_class, lambda _process: lower())


def _child_main(
    kwargs: dict[str, Any], task_nice: int, availability: sdk_internals.Availability
) -> NoReturn:  # pragma: no cover - runs in the child
    code = EXIT_SETUP_FAILED
    try:
        leave_agents_signals()
        from airflow.sdk.execution_time.supervisor import ActivitySubprocess, supervise_task

        if availability[sdk_internals.Feature.EXIT_WATCH] is None:
            watch_task_exit(ActivitySubprocess)
        hooked = availability[sdk_internals.Feature.SUPERVISOR_PRIORITY] is None
        run_started_tasks_nicer(ActivitySubprocess if hooked else None, task_nice)

        if "workload" in kwargs:
            from airflow.executors.base_executor import BaseExecutor

            workload = kwargs["workload"]
            title = f"tether-agent {workload.type}: {workload.display_name}"
            set_title(title)
            code = BaseExecutor.run_workload(workload, server=kwargs["server"], proctitle=title)
        else:
            ti = kwargs["ti"]
            set_title(f"tether-agent task: {ti.dag_id}.{ti.task_id} run={ti.run_id} try={ti.try_number}")
            code = supervise_task(**kwargs)
    except BaseException:
        traceback.print_exc(file=sys.stderr)
    finally:
        sys.stderr.flush()
        os._exit(code)
