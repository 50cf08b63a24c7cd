"""Wakes lease requests waiting for work.

On PostgreSQL a thread LISTENs on the jobs channel and wakes the waiters of the
queue named in each notification. While that connection is down, and after it
comes back, waiters fall back to looking on a timer, so a lost notification
costs at most one poll interval. SQLite has no notifications: waiters rely on
the timer alone.
"""

from __future__ import annotations

import asyncio
import logging
import select
import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)


class Wakeup:
    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        #: True while LISTEN is in place: waiters can then sleep until woken.
        self.listening = False

    def start_listening(self, dsn: str, channel: str) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._listen, args=(dsn, channel), name="tether-listen", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    @contextmanager
    def subscribe(self, queues: list[str]) -> Iterator[asyncio.Event]:
        """An event set whenever one of ``queues`` may have new work.

        Subscribe *before* looking for work: a job queued between the look and
        the wait still sets the event, so no wake-up is lost.
        """
        event = asyncio.Event()
        for queue in queues:
            self._waiters[queue].add(event)
        try:
            yield event
        finally:
            for queue in queues:
                waiters = self._waiters.get(queue)
                if waiters is not None:
                    waiters.discard(event)
                    if not waiters:
                        del self._waiters[queue]

    def wake(self, queue: str) -> None:
        """Wake the waiters of one queue; call on the event loop."""
        for event in list(self._waiters.get(queue, ())):
            event.set()

    def _listen(self, dsn: str, channel: str) -> None:
        import psycopg2

        while not self._stop.is_set():
            try:
                conn: Any = psycopg2.connect(dsn)
                conn.set_isolation_level(0)  # autocommit: LISTEN must not sit in a transaction
                with conn.cursor() as cursor:
                    cursor.execute(f"LISTEN {channel}")
                log.info("Listening for new Tether jobs on %s", channel)
                self.listening = True
                # Notifications sent while we were not listening are lost: everyone looks again.
                self._wake_all_threadsafe()
                while not self._stop.is_set():
                    if select.select([conn], [], [], 5.0) == ([], [], []):
                        continue
                    conn.poll()
                    queues = {notify.payload for notify in conn.notifies}
                    conn.notifies.clear()
                    if self._loop is not None:
                        for queue in queues:
                            self._loop.call_soon_threadsafe(self.wake, queue)
            except Exception:
                self.listening = False
                log.exception("Tether job listener lost its connection; retrying in 1s")
                self._stop.wait(1.0)
        self.listening = False

    def _wake_all_threadsafe(self) -> None:
        if self._loop is not None:
            for queue in list(self._waiters):
                self._loop.call_soon_threadsafe(self.wake, queue)
