"""Every private part of Airflow's Task SDK that the agent relies on, and the check that each is as expected.

The agent runs each task through the SDK's public entry point, ``supervise_task``.
Four features make that faster or tidier by reaching inside the SDK's supervisor;
each has a plain fallback. ``check()`` looks, once at agent start, whether what a
feature relies on is there and shaped as expected; the agent logs each feature
that is off with the reason and the fallback, shows it in ``/metrics``
(``tether_agent_sdk_feature``) and in ``tether-agent check``, and never uses it.

No other module of Tether names a private part of Airflow or the Task SDK; a test
keeps it so (``tests/unit/test_sdk_internals.py``). ADR 5 lists these names.
"""

from __future__ import annotations

import ast
import contextlib
import enum
import importlib
import inspect
import logging
import os
import selectors
import socket
import sys
import textwrap
import time
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

log = logging.getLogger(__name__)


class Feature(enum.StrEnum):
    #: A spare forks its task process before its task comes (``tether.agent.headstart``).
    HEAD_START = "head_start"
    #: The supervisor wakes the moment its task process exits.
    EXIT_WATCH = "exit_watch"
    #: The supervisor runs as nice as its task once the task has started.
    SUPERVISOR_PRIORITY = "supervisor_priority"
    #: What every task's supervisor loads (logging modules, the TLS context) is loaded once in the agent.
    PRELOAD = "preload"


#: What the agent does instead when a feature is off.
FALLBACKS: Mapping[Feature, str] = {
    Feature.HEAD_START: "spares fork the task process when the task comes",
    Feature.EXIT_WATCH: "a supervisor may notice its task's exit only at its next heartbeat (up to 5 s later)",
    Feature.SUPERVISOR_PRIORITY: "only the task process runs nicer; its supervisor keeps the agent's priority",
    Feature.PRELOAD: "each task's supervisor loads them itself",
}

#: Why each feature is off in this process (None: on); filled by ``check()``.
Availability = Mapping[Feature, str | None]

#: The socket pairs ``WatchedSubprocess.start`` makes, in its order, as (child end, supervisor end).
SUPERVISOR_PAIRS = ("stdout", "stderr", "requests", "logs")
#: Modules every task's supervisor imports as it opens the task's log.
_LOGGING_MODULES = ("airflow.sdk._shared.logging.factory", "airflow.sdk._shared.logging.remote")


def check() -> dict[Feature, str | None]:
    """Whether each feature can be used with the installed Task SDK: None, or why not."""
    return {
        Feature.HEAD_START: _head_start_unsupported(),
        Feature.EXIT_WATCH: _start_hook_unsupported() or _selector_unsupported(),
        Feature.SUPERVISOR_PRIORITY: _start_hook_unsupported(),
        Feature.PRELOAD: _preload_unsupported(),
    }


def log_unavailable(availability: Availability) -> None:
    """One line for each feature that is off: why, and what the agent does instead."""
    for feature, reason in availability.items():
        if reason is not None:
            log.warning("Task SDK feature %s is off: %s; %s", feature.value, reason, FALLBACKS[feature])


# -- head start -------------------------------------------------------------------------


def _head_start_unsupported() -> str | None:
    if sys.platform != "linux":
        return f"not on Linux ({sys.platform})"
    try:
        from airflow.sdk.api.client import BearerAuth, Client  # noqa: F401
        from airflow.sdk.execution_time import supervisor

        source = textwrap.dedent(inspect.getsource(supervisor.WatchedSubprocess.start))
    except (ImportError, AttributeError, OSError, TypeError) as exc:
        return f"the Task SDK's supervisor is not as expected ({exc})"
    if getattr(supervisor, "socketpair", None) is not socket.socketpair:
        return "the Task SDK's supervisor does not use socket.socketpair"
    if not callable(getattr(supervisor, "_fork_main", None)):
        return "the Task SDK's supervisor has no _fork_main"
    if not callable(getattr(supervisor, "_subprocess_main", None)):
        return "the Task SDK's supervisor has no _subprocess_main"
    return start_source_unsupported(source)


def start_source_unsupported(source: str) -> str | None:
    """Why ``WatchedSubprocess.start``'s source does not look as the head start expects; None when it does.

    Expected: four ``child_X, read_X = socketpair()`` for stdout, stderr,
    requests and logs, in that order and no other socket pair; one ``os.fork()``;
    the child calling ``_fork_main(child_requests, child_stdout, child_stderr,
    child_logs.fileno(), target)``.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        return f"cannot read WatchedSubprocess.start ({exc})"
    pairs = 0
    forks = 0
    fork_main: list[str] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        if func == "socketpair":
            pairs += 1
        elif func == "os.fork":
            forks += 1
        elif func == "_fork_main":
            fork_main.append(ast.unparse(node))
    assigned = [
        ast.unparse(node.targets[0])
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Call)
        and ast.unparse(node.value) == "socketpair()"
    ]
    wanted = [f"(child_{name}, read_{name})" for name in SUPERVISOR_PAIRS]
    if pairs != len(SUPERVISOR_PAIRS) or assigned != wanted:
        return f"WatchedSubprocess.start makes other socket pairs than expected: {assigned}"
    if forks != 1:
        return f"WatchedSubprocess.start forks {forks} times"
    if fork_main != ["_fork_main(child_requests, child_stdout, child_stderr, child_logs.fileno(), target)"]:
        return f"WatchedSubprocess.start calls _fork_main otherwise: {fork_main}"
    return None


def task_runner_target() -> Callable[[], None]:
    """What the SDK's task process runs: its task runner's entry point."""
    from airflow.sdk.execution_time import supervisor

    target: Callable[[], None] = supervisor._subprocess_main
    return target


def fork_main(
    requests: socket.socket, stdout: socket.socket, stderr: socket.socket, log_fd: int, target: Callable[[], None]
) -> NoReturn:
    """Become what ``WatchedSubprocess.start`` makes of its forked child."""
    from airflow.sdk.execution_time import supervisor

    supervisor._fork_main(requests, stdout, stderr, log_fd, target)
    raise AssertionError("the Task SDK's _fork_main returned")  # pragma: no cover


def supervisor_starts_with(socketpair: Callable[..., Any], os_module: Any) -> None:
    """Make the SDK's supervisor take its socket pairs and its fork from these, until ``restore_supervisor``."""
    from airflow.sdk.execution_time import supervisor

    supervisor.socketpair = socketpair  # type: ignore[attr-defined]
    supervisor.os = os_module  # type: ignore[attr-defined]


def restore_supervisor() -> None:
    from airflow.sdk.execution_time import supervisor

    supervisor.socketpair = socket.socketpair  # type: ignore[attr-defined]
    supervisor.os = os  # type: ignore[attr-defined]


def reset_secrets_masker() -> None:
    """Forget the secrets the forking process had registered, as the SDK does in each task process."""
    with contextlib.suppress(ImportError):
        from airflow.sdk._shared.secrets_masker import reset_secrets_masker as reset

        reset()


# -- the supervisor's start: exit watch, priority ---------------------------------------------


def _start_hook_unsupported() -> str | None:
    try:
        from airflow.sdk.execution_time.supervisor import ActivitySubprocess
    except ImportError as exc:
        return f"the Task SDK has no ActivitySubprocess ({exc})"
    if not isinstance(ActivitySubprocess.__dict__.get("start"), classmethod):
        return "ActivitySubprocess.start is not a classmethod"
    return None


def _selector_unsupported() -> str | None:
    if not hasattr(os, "pidfd_open"):
        return "this kernel or Python has no pidfd_open"
    from airflow.sdk.execution_time import supervisor

    source = inspect.getsource(supervisor.WatchedSubprocess)
    if "self.selector" not in source or "socket_handler, on_close = key.data" not in source:
        return "the Task SDK's supervisor does not wait on a selector of (handler, on_close) pairs"
    return None


def after_task_start(process_class: Any, after: Callable[[Any], None]) -> bool:
    """Run ``after(process)`` each time ``process_class.start`` has started a task; False when it cannot."""
    original = process_class.__dict__.get("start")
    if not isinstance(original, classmethod):
        return False
    start = original.__func__

    def start_then(cls: Any, *args: Any, **kwargs: Any) -> Any:
        process = start(cls, *args, **kwargs)
        after(process)
        return process

    process_class.start = classmethod(start_then)
    return True


class _ExitWatch:
    """A pidfd for the supervisor's selector: it becomes readable when the task process has exited."""

    def __init__(self, pid: int) -> None:
        self._fd: int | None = os.pidfd_open(pid)

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError("closed")
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _exited(watch: _ExitWatch) -> bool:
    """Nothing to read: the supervisor drops the watch and looks at the exit status."""
    return False


def _dropped(watch: _ExitWatch) -> None:
    """The supervisor closes the watch itself after this."""


def watch_exit(process: Any) -> None:
    """Wake ``process``'s supervisor when its task process exits: a pidfd among the files it waits on."""
    selector = getattr(process, "selector", None)
    if isinstance(selector, selectors.BaseSelector):
        try:
            selector.register(_ExitWatch(process.pid), selectors.EVENT_READ, (_exited, _dropped))
        except OSError as exc:
            log.debug("Not watching the task process's exit: %s", exc)


# -- preload ------------------------------------------------------------------------------------


def _preload_unsupported() -> str | None:
    try:
        from airflow.sdk.api.client import Client
    except ImportError as exc:
        return f"the Task SDK has no API client ({exc})"
    if not callable(getattr(Client, "_get_ssl_context_cached", None)):
        return "the Task SDK's client has no _get_ssl_context_cached"
    return None


def preload() -> None:
    """Load once what each task's supervisor would load: its logging modules and the TLS context it caches.

    Also what msgspec learns of the two frame types of the supervisor's socket to its
    task the first time a decoder is made for each, which it keeps for the process:
    each supervisor makes one for requests, each task process one for responses.
    """
    from airflow.sdk.api.client import API_SSL_CA_FILE_PATH, API_SSL_CERT_PATH, Client

    Client._get_ssl_context_cached(API_SSL_CA_FILE_PATH, API_SSL_CERT_PATH)
    for module in _LOGGING_MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    with contextlib.suppress(ImportError, AttributeError, TypeError):
        import msgspec
        from airflow.sdk.execution_time import comms

        for frame in (comms._RequestFrame, comms._ResponseFrame):
            msgspec.msgpack.Decoder(frame)


# -- the trigger runner's watchdog ---------------------------------------------------------


def trigger_runner_silence(supervisor: Any) -> float | None:
    """Seconds since the trigger runner last spoke to its supervisor (``_last_runner_comms``).

    None where Airflow's supervisor keeps no such time: the triggerer role then
    cannot tell a stuck runner by its silence (it says so once), and its triggers
    stay with it while its process lives.
    """
    last = getattr(supervisor, "_last_runner_comms", None)
    if not isinstance(last, int | float) or isinstance(last, bool):
        return None
    return time.monotonic() - last
