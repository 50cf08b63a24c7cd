"""The agent's side of the launcher, against a stand-in launcher on the other end of its socket.

The stand-in answers each byte asked with a socket whose far end the test holds,
and announces this test process's own pid on it: a spare that is not a process,
so the pool's bookkeeping can be driven without forking. The launcher's pid is a
``sleep`` the test starts: the agent's side stops a launcher it gives up on.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from tests.unit.scenarios import run, until
from tether.agent.launcher import DEMAND_WINDOW, REPLACE_AFTER, Launcher


class StandInLauncher:
    def __init__(self) -> None:
        self.agents_end, self.end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.end.setblocking(False)
        self.agents_end.setblocking(False)
        self.asked = 0
        self.kinds = b""  # every byte asked: b"h" with a head start, b"+" without
        self.spares: list[socket.socket] = []
        self.process = subprocess.Popen(["sleep", "300"])

    def read_asks(self) -> int:
        while True:
            try:
                data = self.end.recv(64)
            except BlockingIOError:
                return self.asked
            if not data:
                return self.asked
            self.asked += len(data)
            self.kinds += data

    def send_spare(self, *, announce: bool = True, headstart: bool = False) -> socket.socket:
        agents, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        socket.send_fds(self.end, [b"H" if headstart else b"S"], [agents.fileno()])
        agents.close()
        if announce:
            ours.send(struct.pack("=i", os.getpid()))
        else:
            ours.close()
        self.spares.append(ours)
        return ours


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Pool:
    stand_in: StandInLauncher
    clock: Clock
    launcher: Launcher


@contextmanager
def _pool(*, min_spares: int = 2, max_spares: int = 8) -> Iterator[Pool]:
    """A launcher's agent side on a stand-in, closed at the end."""
    stand_in, clock = StandInLauncher(), Clock()
    launcher = Launcher(
        pid=stand_in.process.pid,
        pidfd=os.pidfd_open(stand_in.process.pid),
        channel=stand_in.agents_end,
        min_spares=min_spares,
        max_spares=max_spares,
        clock=clock,
    )
    try:
        yield Pool(stand_in, clock, launcher)
    finally:
        launcher.close(wait=0)
        stand_in.process.kill()
        stand_in.process.wait()


def test_a_burst_of_starts_is_served_and_the_pool_follows_demand() -> None:
    async def scenario() -> None:
        with _pool() as pool:
            takes = [asyncio.create_task(pool.launcher.take(5)) for _ in range(5)]
            await asyncio.sleep(0)
            # Five starts waiting and nothing ready: a spare for each, and as many to keep ready
            # as there were starts in the window.
            await until(lambda: pool.stand_in.read_asks() == 10)
            for _ in range(5):
                pool.stand_in.send_spare()
            spares = await asyncio.gather(*takes)
            assert all(spare is not None and spare.pid == os.getpid() for spare in spares)
            assert pool.launcher.target() == 5
            for _ in range(5):
                pool.stand_in.send_spare()
            await until(lambda: pool.launcher.ready == 5)
            pool.launcher.trim()
            assert pool.launcher.ready == 5
            assert pool.stand_in.read_asks() == 10
            # The burst is over: the spares beyond the idle two are let go.
            pool.clock.now += DEMAND_WINDOW + 1
            assert pool.launcher.target() == 2
            pool.launcher.trim()
            assert pool.launcher.ready == 2

    run(scenario)


def test_spares_get_a_head_start_while_tasks_start_and_an_idle_agent_keeps_none() -> None:
    async def scenario() -> None:
        with _pool(min_spares=1) as pool:
            take = asyncio.create_task(pool.launcher.take(5))
            await until(lambda: pool.stand_in.read_asks() == 2)
            # The spare an idle agent keeps, without a head start; then, a start having come, one with.
            assert pool.stand_in.kinds == b"+h"
            pool.stand_in.send_spare()
            assert await take is not None
            pool.stand_in.send_spare(headstart=True)
            await until(lambda: pool.launcher.ready == 1)
            pool.launcher.trim()
            assert pool.launcher.ready == 1 and pool.stand_in.read_asks() == 2  # still busy: kept
            # No start within the window: the head-started spare is let go for one without.
            pool.clock.now += DEMAND_WINDOW + 1
            pool.launcher.trim()
            assert pool.launcher.ready == 0
            await until(lambda: pool.stand_in.read_asks() == 3)
            assert pool.stand_in.kinds == b"+h+"
            pool.stand_in.send_spare()
            await until(lambda: pool.launcher.ready == 1)
            pool.launcher.trim()
            assert pool.launcher.ready == 1 and pool.stand_in.read_asks() == 3

    run(scenario)


def test_a_taken_spare_is_replaced_after_its_start_not_during_it() -> None:
    """The launcher's fork of a replacement would take the CPU from the start the taken spare makes."""

    async def scenario() -> None:
        with _pool(min_spares=1) as pool:
            # A first start attaches the pool and, finding no spare yet, gives up at once.
            assert await pool.launcher.take(0) is None
            await until(lambda: pool.stand_in.read_asks() >= 1)
            for _ in range(pool.stand_in.read_asks()):
                pool.stand_in.send_spare()
            await until(lambda: pool.launcher.ready >= 1)
            asked = pool.stand_in.read_asks()
            taken_at = asyncio.get_running_loop().time()
            assert await pool.launcher.take(5) is not None
            # Handed out with nothing asked of the launcher yet...
            assert pool.stand_in.read_asks() == asked
            # ...and its replacement asked for a moment later, with a head start: tasks are starting.
            await until(lambda: pool.stand_in.read_asks() > asked)
            assert asyncio.get_running_loop().time() - taken_at >= REPLACE_AFTER
            assert pool.stand_in.kinds.endswith(b"h")

    run(scenario)


def test_the_pool_never_grows_past_its_bound() -> None:
    async def scenario() -> None:
        with _pool(min_spares=1, max_spares=3) as pool:
            for _ in range(6):
                take = asyncio.create_task(pool.launcher.take(5))
                await until(lambda: pool.stand_in.read_asks() > len(pool.stand_in.spares))
                pool.stand_in.send_spare()
                assert await take is not None
            assert pool.launcher.target() == 3

    run(scenario)


def test_spares_that_never_come_up_make_the_agent_fork_itself() -> None:
    async def scenario() -> None:
        with _pool() as pool:
            take = asyncio.create_task(pool.launcher.take(5))
            await until(lambda: pool.stand_in.read_asks() >= 3)
            for _ in range(3):
                pool.stand_in.send_spare(announce=False)
            assert await take is None
            assert not pool.launcher.usable
            assert await pool.launcher.take(5) is None

    run(scenario)


def test_a_launcher_that_exits_releases_waiting_starts() -> None:
    async def scenario() -> None:
        with _pool() as pool:
            take = asyncio.create_task(pool.launcher.take(30))
            await until(lambda: pool.stand_in.read_asks() > 0)
            pool.stand_in.end.close()
            assert await asyncio.wait_for(take, 5) is None
            assert not pool.launcher.usable
            assert pool.launcher.pids() == set()

    run(scenario)


def test_starts_that_wait_in_vain_give_up_on_the_launcher() -> None:
    async def scenario() -> None:
        with _pool() as pool:
            for _ in range(3):
                assert await pool.launcher.take(0.01) is None
            assert not pool.launcher.usable

    run(scenario)


def test_a_spare_that_comes_after_its_start_gave_up_is_kept() -> None:
    async def scenario() -> None:
        with _pool() as pool:
            take = asyncio.create_task(pool.launcher.take(30))
            await until(lambda: pool.stand_in.read_asks() > 0)
            take.cancel()
            with pytest.raises(asyncio.CancelledError):
                await take
            pool.stand_in.send_spare()
            await until(lambda: pool.launcher.ready == 1)
            assert await pool.launcher.take(1) is not None

    run(scenario)


def test_a_spares_exit_status_comes_from_the_launcher_and_is_lost_only_with_it() -> None:
    async def scenario() -> None:
        with _pool(min_spares=1) as pool:
            take = asyncio.create_task(pool.launcher.take(5))
            await until(lambda: pool.stand_in.read_asks() > 0)
            pool.stand_in.send_spare()
            spare = await take
            assert spare is not None
            status = asyncio.create_task(pool.launcher.exit_status(spare.pid))
            await asyncio.sleep(0.05)
            assert not status.done()  # not the agent's child: it waits for the launcher to pass it on
            pool.stand_in.end.send(struct.pack("=cii", b"X", 999_999, 0))  # a spare never handed out
            pool.stand_in.end.send(struct.pack("=cii", b"X", spare.pid, 3 << 8))
            assert await asyncio.wait_for(status, 5) == 3 << 8
            assert pool.launcher._exits == {}  # the idle spare's status is nobody's outcome: dropped
            # The launcher exits holding a status it never passed on: once it is reaped, the
            # agent knows the status is lost rather than waiting for it.
            lost = asyncio.create_task(pool.launcher.exit_status(spare.pid))
            pool.stand_in.end.close()
            assert await asyncio.wait_for(lost, 5) is None
            assert pool.stand_in.process.poll() is not None  # stopped, and reaped by the agent's side

    run(scenario)


def test_a_lost_exit_status_is_told_apart_from_a_process_that_exits_255() -> None:
    from tether.agent.runner import EXIT_STATUS_LOST, ForkedTask

    async def scenario() -> None:
        async def lost(pid: int) -> int | None:
            os.waitpid(pid, 0)  # reaped elsewhere, its status never passed on
            return None

        async def passed_on(pid: int) -> int | None:
            return os.waitpid(pid, 0)[1]

        for status_from, expected_lost in ((lost, True), (passed_on, False)):
            child = subprocess.Popen(["sh", "-c", "exit 255"])
            task = ForkedTask(pid=child.pid, _pidfd=os.pidfd_open(child.pid), _exit_status=status_from)
            assert await task.wait() == EXIT_STATUS_LOST == 255
            assert task.status_lost is expected_lost

    run(scenario)
