"""Warm processes made ahead of time, so starting a task costs the agent a message, not a fork.

Forking the agent for each task stops its event loop for the fork (a warm agent
maps some 150 MB: 5-15 ms of page tables, several times that on a busy
machine), and while the child lives every page the agent writes is copied
first. With many tasks starting at once the forks queue up on the loop, and the
start-gate answers of the other jobs wait behind them.

So the agent forks one **launcher** once it has registered, before it leases
its first job; the launcher closes the agent's descriptors it inherited (the
connection to the plane, the health server's socket). The launcher makes
**spares**: processes with the warm image, each waiting on a socket for one
workload. Like a pre-fork server's spare servers, the agent keeps one ready
when idle and as many as it started tasks in the last ``DEMAND_WINDOW`` when
busy (at most its slots), so a burst of starts finds them made; spares beyond
that are let go once the burst is over.

A spare is the launcher's own child, made with one fork. The agent watches it
through a pidfd, which tells any process of another's exit, and the launcher,
its parent, reaps it and passes its exit status on. The agent is a child
subreaper: a launcher that dies takes no running task with it, for its children
become the agent's, and the agent then waits for them itself (``waitpid``).
Being a subreaper, the agent also adopts what tasks leave behind (daemons whose
parent exited); ``reap_strays`` collects them once they exit.

Wire format, over ``SOCK_SEQPACKET`` socketpairs (one message per packet):

- agent -> launcher: one byte per spare wanted: ``b"h"`` for a spare with a head
  start (``tether.agent.headstart``), ``b"+"`` for one without;
- launcher -> agent: ``b"H"`` or ``b"S"`` (with a head start or not) carrying one
  file descriptor, the agent's end of the new spare's socket;
- launcher -> agent: ``b"X"``, a spare's pid and its wait status (4 bytes each,
  native order), once the launcher has reaped it;
- spare -> agent: its pid (4 bytes, native order), once the spare is ready (see
  ``tether.agent.headstart``);
- agent -> spare: the workload (JSON), once the plane's start gate confirmed
  the lease. The end of the socket instead (the agent let the spare go, or
  exited) ends the spare.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NoReturn

import psutil

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36

#: Largest workload a spare accepts; a larger one is started with a fork of the agent.
MAX_WORKLOAD_BYTES = 1024 * 1024
#: Starts within this window are how many spares a busy agent keeps ready.
DEMAND_WINDOW = 10.0
#: How long after a ready spare is taken its replacement is asked for. Asked for at once,
#: the launcher's fork and the new spare's head start took the CPU from the start the
#: taken spare was making: on two cores they delayed a chain's task starts by about 5 ms.
#: A start that finds no spare ready asks at once, so a burst is not held back.
REPLACE_AFTER = 0.2
#: Spares in a row that never came up before the agent stops asking the launcher.
_MAX_FAILED_SPARES = 3
#: Starts in a row that waited in vain for a spare before the agent stops asking the launcher.
_MAX_MISSED_TAKES = 3
#: How long the agent waits for the launcher to pass on the exit status of a spare that exited.
_STATUS_WAIT = 10.0
_PID = struct.Struct("=i")
_EXIT = struct.Struct("=cii")  # b"X", pid, wait status
_HEADSTART, _PLAIN = b"h"[0], b"+"[0]

#: What a spare does with its workload; it never returns.
SpareRun = Callable[[bytes], NoReturn]
#: What a new spare does before it says it is up, given its socket to the agent; returns
#: what to do if it is let go without a workload, or None.
SparePrepare = Callable[[socket.socket], Callable[[], None] | None]


def prctl(option: int, value: int) -> bool:
    """Linux ``prctl(2)`` with one argument; whether it succeeded."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def become_subreaper() -> bool:
    """Make orphaned descendants of this process its children (Linux ``PR_SET_CHILD_SUBREAPER``)."""
    return prctl(_PR_SET_CHILD_SUBREAPER, 1)


def set_title(title: str) -> None:
    """Name this process in ``ps`` and ``top``, where ``setproctitle`` is installed."""
    try:
        from setproctitle import setproctitle
    except ImportError:
        return
    setproctitle(title)


def leave_agents_signals() -> None:
    """In a process forked from the agent: a process group of its own, and default signal handling.

    A terminal's Ctrl-C is then not this process's, nor are the agent's handlers,
    which write to the agent's event loop.
    """
    os.setpgid(0, 0)
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)


def leave_agents_descriptors(*keep: int) -> None:
    """In a process forked from the agent: close every descriptor but the standard streams and ``keep``.

    Held open in the launcher, in spares or in tasks' supervisors, the agent's
    sockets would outlive their use: a connection the agent closed would stay
    open at the plane, a spare the agent let go would wait on, and the health
    port would stay taken after the agent exited.

    The agent's objects, which may hold those descriptors, are frozen first: the
    collector then never finalizes one here, which would close a descriptor
    number this process may have reused.
    """
    gc.freeze()
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


# -- in the launcher and the spares ---------------------------------------------------


def _launcher_main(channel: socket.socket, agent_pid: int, run: SpareRun, prepare: SparePrepare | None) -> NoReturn:
    """Make the spares the agent asks for and pass on their exits; exit when the agent closes the channel or dies."""
    try:
        leave_agents_signals()
        leave_agents_descriptors(channel.fileno())
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != agent_pid:  # the agent died before we could ask to die with it
            os._exit(0)
        set_title("tether-agent launcher")
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # its spares' exits are waited for, and passed on
        _serve(_Spares(channel), run, prepare)
    except (BrokenPipeError, ConnectionResetError):
        pass
    except BaseException:
        traceback.print_exc(file=sys.stderr)
    finally:
        sys.stderr.flush()
        os._exit(0)


def _serve(spares: _Spares, run: SpareRun, prepare: SparePrepare | None) -> None:
    """Until the agent closes the channel: make the spares it asks for, pass on the exits of those that end."""
    while True:
        for key, _ in spares.selector.select():
            if key.data is not None:
                spares.pass_on_exits()
                continue
            wanted = spares.channel.recv(64)
            if not wanted:
                return
            for kind in wanted:
                _make_spare(spares, run, prepare if kind == _HEADSTART else None)


class _Spares:
    """In the launcher: its children, the spares, each watched by a pidfd, and the channel to the agent."""

    def __init__(self, channel: socket.socket) -> None:
        self.channel = channel
        self.selector = selectors.DefaultSelector()
        self.selector.register(channel, selectors.EVENT_READ, None)
        self._pidfds: dict[int, int] = {}

    def add(self, pid: int) -> None:
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return  # reaped at the next exit or request that wakes the launcher
        self._pidfds[pid] = pidfd
        self.selector.register(pidfd, selectors.EVENT_READ, pid)

    def pass_on_exits(self) -> None:
        """Reap every spare that exited and tell the agent its wait status."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            pidfd = self._pidfds.pop(pid, None)
            if pidfd is not None:
                self.selector.unregister(pidfd)
                os.close(pidfd)
            self.channel.send(_EXIT.pack(b"X", pid, status))

    def close_in_spare(self) -> None:
        """In a new spare: let go of the launcher's descriptors."""
        for pidfd in self._pidfds.values():
            os.close(pidfd)
        self.selector.close()
        self.channel.close()


def _make_spare(spares: _Spares, run: SpareRun, prepare: SparePrepare | None) -> None:
    agents_end, spares_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        pid = os.fork()
        if pid == 0:
            agents_end.close()
            spares.close_in_spare()
            _spare_main(spares_end, run, prepare)
        spares.add(pid)
        socket.send_fds(spares.channel, [b"H" if prepare is not None else b"S"], [agents_end.fileno()])
    finally:
        agents_end.close()
        spares_end.close()


def _spare_main(channel: socket.socket, run: SpareRun, prepare: SparePrepare | None) -> NoReturn:
    release: Callable[[], None] | None = None
    workload = b""
    try:
        set_title("tether-agent spare")
        if prepare is not None:
            release = prepare(channel)
        channel.send(_PID.pack(os.getpid()))
        workload = channel.recv(MAX_WORKLOAD_BYTES)
        channel.close()
    except BaseException:
        workload = b""
    if not workload:
        if release is not None:
            with contextlib.suppress(BaseException):
                release()
        os._exit(0)
    run(workload)


# -- in the agent ---------------------------------------------------------------------


@dataclass
class Spare:
    """A warm copy of the agent, the launcher's child, waiting for one workload."""

    pid: int
    pidfd: int
    channel: socket.socket
    headstart: bool = False

    def hand(self, workload: bytes) -> None:
        """Give the spare its workload: it is the task's supervisor from now on. Raises ``OSError``."""
        try:
            self.channel.send(workload)
        finally:
            self.channel.close()

    def discard(self) -> None:
        """Let the spare go without starting anything; it exits, and is reaped as a stray."""
        self.channel.close()
        os.close(self.pidfd)


class Launcher:
    """The agent's side of the launcher: asks for spares, keeps the ready ones, hands them out.

    Everything but ``fork`` runs on the agent's event loop; its readers are
    attached at the first ``take``.
    """

    def __init__(
        self,
        *,
        pid: int,
        pidfd: int,
        channel: socket.socket,
        min_spares: int,
        max_spares: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pid = pid
        self._pidfd: int | None = pidfd
        self._channel: socket.socket | None = channel
        self.min_spares = min_spares
        self.max_spares = max(max_spares, min_spares)
        self._clock = clock
        self._ready: deque[Spare] = deque()
        self._coming: dict[socket.socket, bool] = {}  # whether the spare has a head start
        self._asked = 0  # spares asked for whose socket has not come yet
        self._waiters: deque[asyncio.Future[Spare | None]] = deque()
        self._taken: deque[float] = deque()
        self._failed_in_a_row = 0
        self._missed_in_a_row = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._replacing: asyncio.TimerHandle | None = None
        # Exit statuses: of the spares handed out, those the launcher passed on and not yet asked for.
        self._handed: set[int] = set()
        self._exits: dict[int, int] = {}
        self._news: asyncio.Future[None] | None = None
        self._adopted = False  # the launcher is gone and reaped: its children are the agent's

    @classmethod
    def fork(
        cls, *, min_spares: int, max_spares: int, run: SpareRun, prepare: SparePrepare | None = None
    ) -> Launcher | None:
        """Fork the launcher now; ``run`` is what a spare does with its workload.

        ``prepare``, when given, runs in each new spare before the spare says it is up.

        None when the agent cannot become its spares' subreaper, watch the launcher, or fork now.
        """
        if not become_subreaper():
            log.warning("Cannot become a child subreaper; tasks are started by forking the agent")
            return None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        agent_pid = os.getpid()
        try:
            pid = os.fork()
        except OSError as exc:
            log.warning("Cannot start the task launcher (%s); tasks are started by forking the agent", exc)
            ours.close()
            theirs.close()
            return None
        if pid == 0:  # pragma: no cover - runs in the launcher
            ours.close()
            _launcher_main(theirs, agent_pid, run, prepare)
        theirs.close()
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as exc:
            log.warning("Cannot watch the task launcher (%s); tasks are started by forking the agent", exc)
            ours.close()  # it exits when it reads the end of the channel
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            return None
        # The first spares are made now, while the agent starts up: the first task need not wait.
        ours.send(b"+" * min_spares)
        ours.setblocking(False)
        launcher = cls(pid=pid, pidfd=pidfd, channel=ours, min_spares=min_spares, max_spares=max_spares)
        launcher._asked = min_spares
        return launcher

    @property
    def usable(self) -> bool:
        return self._channel is not None

    @property
    def ready(self) -> int:
        return len(self._ready)

    def target(self) -> int:
        """How many spares to keep ready: the starts of the last ``DEMAND_WINDOW``, within the bounds."""
        horizon = self._clock() - DEMAND_WINDOW
        while self._taken and self._taken[0] < horizon:
            self._taken.popleft()
        return min(max(len(self._taken), self.min_spares), self.max_spares)

    def pids(self) -> set[int]:
        """The launcher while it serves, and the spares not handed out yet: children that are not strays."""
        spares = {spare.pid for spare in self._ready}
        return spares | {self.pid} if self._channel is not None else spares

    async def take(self, timeout: float) -> Spare | None:
        """A ready spare, waiting up to ``timeout`` for one; None when the launcher cannot give one."""
        self._attach()
        self._taken.append(self._clock())
        if self._ready:
            spare = self._ready.popleft()
            self._unwatch(spare.pidfd)
            self._replace_later()
            return self._hand_out(spare)
        if not self.usable:
            return None
        assert self._loop is not None
        waiter: asyncio.Future[Spare | None] = self._loop.create_future()
        self._waiters.append(waiter)
        self._top_up()
        try:
            await asyncio.wait({waiter}, timeout=timeout)
        except BaseException:
            came = waiter.result() if waiter.done() else None
            if came is not None:
                self._keep(came)  # it came as this start was given up
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
        if waiter.done():
            self._missed_in_a_row = 0
            came = waiter.result()
            return None if came is None else self._hand_out(came)
        waiter.cancel()
        self._missed_in_a_row += 1
        if self._missed_in_a_row >= _MAX_MISSED_TAKES:
            self._launcher_gone(f"no spare within {timeout:.0f}s, {self._missed_in_a_row} times in a row")
        return None

    def trim(self) -> None:
        """Let go of ready spares beyond ``target()``, oldest first: a burst of starts is over.

        With no start in the last ``DEMAND_WINDOW``, spares with a head start are
        let go too, and replaced by spares without: on an idle machine the fork a
        head start saves is a few milliseconds, while its waiting task process
        holds some 3 MB of private memory for as long as the agent is idle.
        """
        extra = len(self._ready) - self.target()
        for _ in range(max(extra, 0)):
            spare = self._ready.popleft()
            self._unwatch(spare.pidfd)
            spare.discard()
        if not self._taken:
            for spare in [spare for spare in self._ready if spare.headstart]:
                self._ready.remove(spare)
                self._unwatch(spare.pidfd)
                spare.discard()
            self._top_up()

    def close(self, *, wait: float = 1.0) -> None:
        """Stop the launcher and every spare not handed out, waiting up to ``wait`` s for them to exit.

        Spares handed out run on; once the launcher is gone the agent waits for them
        itself. Safe to call twice.
        """
        deadline = time.monotonic() + wait
        # The ready spares first: each exits as soon as it reads the end of its socket, and
        # the launcher, their parent, is still there to reap them.
        if self._replacing is not None:
            self._replacing.cancel()
            self._replacing = None
        idle = {spare.pid for spare in self._ready}
        for spare in self._ready:
            self._unwatch(spare.pidfd)
            spare.discard()
        self._ready.clear()
        for sock in self._coming:
            self._unwatch(sock)
            sock.close()
        self._coming.clear()
        self._release_waiters()
        while idle and time.monotonic() < deadline:
            idle = {pid for pid in idle if not _gone(pid)}
            if idle:
                time.sleep(0.01)
        channel, self._channel = self._channel, None
        if channel is not None:
            self._unwatch(channel)
            channel.close()
        # The launcher exits as soon as it reads the end of its channel.
        while self._pidfd is not None and time.monotonic() < deadline:
            if _gone(self.pid):
                self._launcher_reaped()
            else:
                time.sleep(0.01)
        if self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
            self._launcher_reaped()

    def forget(self, pid: int) -> None:
        """A spare taken and then let go without its workload: its exit status is not wanted."""
        self._handed.discard(pid)
        self._exits.pop(pid, None)

    async def exit_status(self, pid: int) -> int | None:
        """The wait status of a spare handed out, once it has exited; None if it was lost with the launcher.

        While the launcher lives it is the spare's parent, reaps it and passes the status
        on; once it is gone the spare is the agent's child (the agent is its subreaper)
        and the agent reaps it itself. A launcher that holds a status back is stopped.
        """
        waited = 0.0
        try:
            while True:
                if pid in self._exits:
                    return self._exits.pop(pid)
                try:
                    reaped, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    if self._adopted:
                        log.warning("The exit status of process %d was lost with the task launcher", pid)
                        return None
                else:
                    if reaped:
                        return status
                if waited >= _STATUS_WAIT:
                    self._launcher_gone(f"it did not pass on the exit of process {pid} within {_STATUS_WAIT:.0f}s")
                began = time.monotonic()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._changed()), 1.0)
                waited += time.monotonic() - began
        finally:
            self._handed.discard(pid)

    # -- event loop callbacks -----------------------------------------------------

    def _attach(self) -> None:
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        if self._channel is not None:
            self._loop.add_reader(self._channel, self._on_launcher)
            self._top_up()

    def _unwatch(self, fd: socket.socket | int) -> None:
        if self._loop is not None:
            self._loop.remove_reader(fd)

    def _replace_later(self) -> None:
        """Ask for the spares taken ``REPLACE_AFTER`` from the first of them, once."""
        if self._replacing is None and self._loop is not None:
            self._replacing = self._loop.call_later(REPLACE_AFTER, self._replace)

    def _replace(self) -> None:
        self._replacing = None
        self._top_up()

    def _top_up(self) -> None:
        """Ask for enough spares to keep ``target()`` ready and one for every waiting start."""
        if self._channel is None:
            return
        missing = self.target() + len(self._waiters) - len(self._ready) - len(self._coming) - self._asked
        if missing <= 0:
            return
        # A head start pays off while tasks start often; an idle agent's spare goes without (see trim).
        kind = bytes([_HEADSTART if self._taken else _PLAIN])
        try:
            self._channel.send(kind * missing)
        except OSError as exc:
            self._launcher_gone(f"cannot reach it: {exc}")
            return
        self._asked += missing

    def _on_launcher(self) -> None:
        assert self._channel is not None and self._loop is not None
        try:
            message, fds, _, _ = socket.recv_fds(self._channel, 16, 8)
        except BlockingIOError:
            return
        except OSError as exc:
            self._launcher_gone(str(exc))
            return
        if not message and not fds:
            self._launcher_gone("it exited")
            return
        if self._take_exit(message):
            return
        for fd in fds:
            self._asked = max(self._asked - 1, 0)
            sock = socket.socket(fileno=fd)
            sock.setblocking(False)
            self._coming[sock] = message[:1] == b"H"
            self._loop.add_reader(sock, self._on_spare_up, sock)

    def _on_spare_up(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(_PID.size)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self._unwatch(sock)
        headstart = self._coming.pop(sock, False)
        pidfd = None
        if len(data) == _PID.size:
            (pid,) = _PID.unpack(data)
            with contextlib.suppress(OSError):
                pidfd = os.pidfd_open(pid)
        if pidfd is None:
            sock.close()
            self._failed_in_a_row += 1
            if self._failed_in_a_row >= _MAX_FAILED_SPARES:
                self._launcher_gone(f"{self._failed_in_a_row} spares in a row never came up")
            else:
                self._top_up()
            return
        self._failed_in_a_row = 0
        spare = Spare(pid=pid, pidfd=pidfd, channel=sock, headstart=headstart)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(spare)
                return
        self._keep(spare)

    def _keep(self, spare: Spare) -> None:
        assert self._loop is not None
        self._ready.append(spare)
        self._loop.add_reader(spare.pidfd, self._on_idle_spare_exit, spare)

    def _on_idle_spare_exit(self, spare: Spare) -> None:
        """A ready spare died (killed, out of memory): drop it and ask for another."""
        log.warning("Spare process %d exited before it was given a task", spare.pid)
        self._unwatch(spare.pidfd)
        with contextlib.suppress(ValueError):
            self._ready.remove(spare)
        spare.discard()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(spare.pid, os.WNOHANG)
        self._top_up()

    def _take_exit(self, message: bytes) -> bool:
        """Keep the exit status a launcher's message passes on; whether it was one."""
        if message[:1] != b"X" or len(message) != _EXIT.size:
            return False
        _, pid, status = _EXIT.unpack(message)
        if pid in self._handed:  # an idle spare's exit is nobody's outcome
            self._exits[pid] = status
            self._tell()
        return True

    def _hand_out(self, spare: Spare) -> Spare:
        self._handed.add(spare.pid)
        return spare

    def _changed(self) -> asyncio.Future[None]:
        """Done when an exit status is passed on or the launcher's children become the agent's."""
        if self._news is None or self._news.done():
            self._news = asyncio.get_running_loop().create_future()
        return self._news

    def _tell(self) -> None:
        news, self._news = self._news, None
        if news is not None and not news.done():
            with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits
                news.set_result(None)

    def _launcher_gone(self, why: str) -> None:
        if self._channel is None:
            return
        log.warning("The task launcher stopped (%s); tasks are started by forking the agent", why)
        self._unwatch(self._channel)
        # Exit statuses it sent before it stopped still count; new spares' sockets in the
        # queue are closed unread, which lets those spares go.
        with contextlib.suppress(OSError):
            while message := self._channel.recv(16):
                self._take_exit(message)
        self._channel.close()
        self._channel = None
        self._release_waiters()
        # Its children, the spares handed out among them, become the agent's once it has
        # exited; one that no longer answers must not live on holding their exit statuses.
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        if self._loop is not None and self._pidfd is not None:
            self._loop.add_reader(self._pidfd, self._on_launcher_exit)

    def _on_launcher_exit(self) -> None:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, os.WNOHANG)
        self._launcher_reaped()

    def _launcher_reaped(self) -> None:
        if self._pidfd is not None:
            self._unwatch(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        self._adopted = True
        self._tell()

    def _release_waiters(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)


def _gone(pid: int) -> bool:
    """Whether a process has exited: reaped here if it is this process's child, else by its parent."""
    try:
        return os.waitpid(pid, os.WNOHANG)[0] != 0
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def reap_strays(keep: Iterable[int]) -> list[int]:
    """Reap exited children of this process whose pids are not in ``keep``; returns their pids.

    A child subreaper adopts every orphaned descendant; without this they would
    stay zombies. Children in ``keep`` are waited for by whoever owns them.
    """
    kept = set(keep)
    reaped: list[int] = []
    for child in children():
        if child in kept:
            continue
        with contextlib.suppress(ChildProcessError):
            pid, _ = os.waitpid(child, os.WNOHANG)
            if pid:
                reaped.append(pid)
    return reaped


def children() -> list[int]:
    """The pids of this process's children, exited ones not yet waited for among them.

    Read from ``/proc/self/task/<tid>/children`` (Linux 3.5 with ``CONFIG_PROC_CHILDREN``,
    as every mainstream kernel has it): microseconds. Where that is missing, from a scan of
    every process on the machine (``psutil``), about 1 ms per 100 processes. A child that
    exits while it is read may be missed; the next call finds it.
    """
    pids: list[int] = []
    try:
        for thread in os.scandir("/proc/self/task"):
            with open(os.path.join(thread.path, "children"), encoding="ascii") as listed:
                pids.extend(int(pid) for pid in listed.read().split())
    except (OSError, ValueError):
        try:
            return [child.pid for child in psutil.Process().children()]
        except psutil.Error:
            return []
    return pids
