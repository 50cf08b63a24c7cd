"""Wakes lease requests waiting for work.

On PostgreSQL a thread LISTENs on the jobs channel and wakes the waiters of the
queue named in each notification. While that connection is down, and after it
comes back, waiters fall back to looking on a timer, so a lost notification
costs at most one poll interval. SQLite has no notifications: waiters rely on
the timer alone.

A LISTEN connection can stop delivering without being closed (a NAT or
firewall idle timeout, a failover behind a virtual address, a pooler in
transaction mode). The listener watches for that: TCP keepalives on its
connection, and, after ``PROBE_IDLE`` seconds with nothing heard, a
notification to itself sent over another connection, which must come back
within ``PROBE_TIMEOUT``. When it does not, the listener says so, waiters look
on the timer, and it connects again; once it hears again, everyone looks.

A notification wakes the longest-waiting poll of its queue, not every one: with
a thousand agents waiting, waking all of them for each job cost the API server
more than the job itself, and each woken poll that found a thread claimed. A woken
poll that leases wakes two more (the notification may have been for more jobs than
it took), so a burst reaches as many polls as it needs in a few rounds; one that
may not lease passes its wake on; one that finds nothing wakes the poll with the
most free slots, if it has more (a job may need more pool slots than it had). A
poll that comes in after a notification looks at once. A job then costs about
three claims.

While listening it also remembers which queues a claim has just found empty:
a lease request for those needs no trip to the database, only the wait. A
notification for a queue, a new LISTEN connection or ``EMPTY_FOR`` seconds end
that knowledge - the last bounds the one case no notification covers, a claim
that saw a job locked by another claim whose transaction then rolled back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

#: Seconds a queue found empty is trusted to stay empty without a notification.
EMPTY_FOR = 2.0
#: Waiting polls a notification wakes, longest-waiting first ...
WAKE_FIRST = 1
#: ... and a woken poll that leased: a burst doubles the polls looking at each round.
WAKE_MORE = 2
#: Seconds without a notification after which the listener checks that notifications still reach it.
PROBE_IDLE = 3.0
#: Seconds its own notification has to come back before the LISTEN connection counts as dead.
PROBE_TIMEOUT = 2.0
#: The payload of a probe: no queue is named so.
PROBE_PAYLOAD = "tether:probe"
#: libpq options of the LISTEN connection: connect within 5 s, notice a dead peer within about 10 s.
LISTEN_OPTIONS: dict[str, Any] = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,
}


class ListenerSilent(Exception):
    """The LISTEN connection stopped delivering notifications without being closed."""


class ListenerState:
    LISTENING = "listening"
    #: Not listening (connecting, or reconnecting after a failure): waiters look on a timer.
    POLLING = "polling"
    #: No LISTEN (SQLite): waiters look on a timer.
    NOT_USED = "not_used"


@dataclass(frozen=True)
class Look:
    """What the listener had heard when a claim began: the LISTEN connection and each queue's notifications."""

    connection: int
    notified: dict[str, int]
    at: float


class Wakeup:
    def __init__(self, probe: Callable[[str, str], None] | None = None) -> None:
        """``probe(channel, payload)`` sends a notification over a connection other than the listener's."""
        self._probe = probe
        #: When the listener stopped hearing (None: it hears, or never listened).
        self.silent_since: float | None = None
        #: Per queue, each waiting poll's event and its free slots, in the order they began to wait.
        self._waiters: dict[str, dict[asyncio.Event, int]] = defaultdict(dict)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        #: True while LISTEN is in place: waiters can then sleep until woken.
        self.listening = False
        #: Counts LISTEN connections made: what was learnt on one means nothing on the next.
        self._connection = 0
        #: Notifications received per queue.
        self._notified: dict[str, int] = defaultdict(int)
        #: Queues a claim found empty: (Look.connection, notifications then, free slots it had, when).
        self._empty: dict[str, tuple[int, int, int, float]] = {}

    @property
    def state(self) -> str:
        if self._thread is None:
            return ListenerState.NOT_USED
        return ListenerState.LISTENING if self.listening else ListenerState.POLLING

    def start_listening(self, dsn: str, channel: str) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._listen, args=(dsn, channel), name="tether-listen", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    @contextmanager
    def subscribe(self, queues: list[str], free_slots: int = 1) -> Iterator[asyncio.Event]:
        """An event set when one of ``queues`` may have new work for a poll with ``free_slots``.

        Subscribe *before* looking for work: a job queued between the look and
        the wait still sets the event, so no wake-up is lost. A poll woken must
        look, and pass the wake on (``leased``, ``cannot_lease``, ``found_empty``).
        """
        event = asyncio.Event()
        for queue in queues:
            self._waiters[queue][event] = free_slots
        try:
            yield event
        finally:
            for queue in queues:
                waiters = self._waiters.get(queue)
                if waiters is not None:
                    waiters.pop(event, None)
                    if not waiters:
                        del self._waiters[queue]

    def wake(self, queue: str) -> None:
        """A notification for ``queue``: wake its longest-waiting poll; call on the event loop."""
        self._notified[queue] += 1
        self._wake_some(queue, WAKE_FIRST)

    def wake_everyone(self, queue: str) -> None:
        """Wake every poll of ``queue``: notifications may have been missed; call on the event loop."""
        self._notified[queue] += 1
        for event in list(self._waiters.get(queue, {})):
            event.set()

    def leased(self, queues: list[str]) -> None:
        """A woken poll leased jobs: more may be there for the next polls."""
        for queue in queues:
            self._wake_some(queue, WAKE_MORE)

    def cannot_lease(self, queues: list[str]) -> None:
        """A woken poll may lease nothing (its agent cordoned or judged silent, its claim failed): another may."""
        for queue in queues:
            self._wake_some(queue, WAKE_FIRST)

    def _wake_some(self, queue: str, count: int) -> None:
        """Wake the ``count`` longest-waiting polls of ``queue`` not woken yet."""
        woken = 0
        # Not copied: setting an event changes no subscription, and the walk stops after ``count``.
        for event in self._waiters.get(queue, {}):
            if woken >= count:
                return
            if not event.is_set():
                event.set()
                woken += 1

    def _wake_largest(self, queue: str, *, more_than: int) -> None:
        """Wake the longest-waiting of the polls of ``queue`` with the most free slots, if more than ``more_than``."""
        waiters = self._waiters.get(queue, {})
        most = max(waiters.values(), default=0)
        if most <= more_than:
            return
        for event, free in waiters.items():
            if free == most and not event.is_set():
                event.set()
                return

    def look(self, queues: list[str]) -> Look:
        """Note what has been heard so far, just before a claim looks at ``queues``."""
        return Look(self._connection, {queue: self._notified[queue] for queue in queues}, time.monotonic())

    def found_empty(self, look: Look, free_slots: int) -> None:
        """A claim begun at ``look`` found nothing for an agent with ``free_slots``.

        Known from when the claim began, not from its answer: its query saw the queue
        at some moment in between, and ``EMPTY_FOR`` counts from the earliest. A job
        too large for those slots may still be there: the poll with the most free slots,
        if it has more, is woken (once: what it finds is the last word).
        """
        for queue in look.notified:
            self._wake_largest(queue, more_than=free_slots)
        for queue, notified in look.notified.items():
            if notified != self._notified[queue]:
                continue  # a job came while the claim ran: the queue may not be empty
            known = self._empty.get(queue)
            if (
                known is not None
                and known[:2] == (look.connection, notified)
                and known[2] > free_slots
                and look.at - known[3] <= EMPTY_FOR
            ):
                continue  # a larger agent found it empty: that says more than this look
            self._empty[queue] = (look.connection, notified, free_slots, look.at)

    def known_empty(self, queues: list[str], free_slots: int) -> bool:
        """True if every one of ``queues`` was found empty for this many free slots since its last notification."""
        if not self.listening:
            return False
        now = time.monotonic()
        for queue in queues:
            known = self._empty.get(queue)
            if (
                known is None
                or known[:2] != (self._connection, self._notified[queue])
                or free_slots > known[2]
                or now - known[3] > EMPTY_FOR
            ):
                return False
        return True

    def _listen(self, dsn: str, channel: str) -> None:
        import psycopg2

        while not self._stop.is_set():
            conn: Any = None
            try:
                conn = psycopg2.connect(dsn, **LISTEN_OPTIONS)
                conn.set_isolation_level(0)  # autocommit: LISTEN must not sit in a transaction
                with conn.cursor() as cursor:
                    cursor.execute(f"LISTEN {channel}")
                self._connection += 1
                self.listening = True
                if self.silent_since is not None:
                    log.warning(
                        "Tether's job listener hears notifications again, after %.1fs; lease requests are woken "
                        "at once again",
                        time.monotonic() - self.silent_since,
                    )
                    self.silent_since = None
                else:
                    log.info("Listening for new Tether jobs on %s", channel)
                # Notifications sent while we were not listening are lost: everyone looks again.
                self._wake_all_threadsafe()
                self._hear(conn, channel)
            except Exception as exc:
                if self.listening or self.silent_since is None:
                    self.silent_since = time.monotonic()
                    log.warning(
                        "Tether's job listener lost its connection (%s); lease requests look for work on a timer "
                        "until it is back. Connecting again.",
                        exc if isinstance(exc, ListenerSilent) else repr(exc),
                    )
                self.listening = False
                self._stop.wait(1.0)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()
        self.listening = False

    def _hear(self, conn: Any, channel: str) -> None:
        """Wake the waiters of each queue notified, until the connection fails or falls silent."""
        heard = time.monotonic()
        probe_sent: float | None = None
        probe = ""
        while not self._stop.is_set():
            if select.select([conn], [], [], 0.5) != ([], [], []):
                conn.poll()
                payloads = {notify.payload for notify in conn.notifies}
                conn.notifies.clear()
                if payloads:
                    heard = time.monotonic()
                    if probe in payloads:
                        probe_sent = None
                queues = {p for p in payloads if not p.startswith(PROBE_PAYLOAD)}
                if self._loop is not None:
                    for queue in queues:
                        self._loop.call_soon_threadsafe(self.wake, queue)
            now = time.monotonic()
            if probe_sent is not None and now - probe_sent > PROBE_TIMEOUT:
                raise ListenerSilent(
                    f"its own notification did not come back within {PROBE_TIMEOUT:.0f}s, "
                    f"nothing heard for {now - heard:.0f}s"
                )
            if probe_sent is None and self._probe is not None and now - heard >= PROBE_IDLE:
                probe = f"{PROBE_PAYLOAD}:{self._connection}:{now:.3f}"
                self._probe(channel, probe)
                probe_sent = time.monotonic()

    def _wake_all_threadsafe(self) -> None:
        if self._loop is not None:
            for queue in list(self._waiters):
                self._loop.call_soon_threadsafe(self.wake_everyone, queue)
