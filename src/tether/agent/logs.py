"""Task logs leave the agent as they are written: each running task's log file is followed and sent in batches.

The Task SDK's supervisor writes a task's log to ``[logging] base_log_folder`` /
``log_path`` on the agent, one JSON line per event, secrets already masked by
Airflow's masker. A follower reads that file from where the task's run began,
complete lines only, and sends them to the plane a batch at a time (a second,
2,000 lines or 256 KiB, whichever comes first), one batch in flight per task.
The file is the buffer: while the plane is slow or away the follower stops
reading and tries again with backoff, and the task, which only ever writes its
file, never waits for it. After the task process exits the follower reads to the
end and sends the last batch. The plane may say to stop (the try's log reached
its limit): the follower stops, and the file stays whole on the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tether import protocol
from tether.agent.client import Backoff, PlaneClient, backoff_for
from tether.agent.health import AgentMetrics
from tether.agent.settings import AgentSettings
from tether.errors import PlaneRefused, PlaneUnavailable, ProtocolError

log = logging.getLogger("tether.agent.logs")

#: How often a follower looks for new lines.
POLL = 0.5
#: A batch goes once it holds this many lines or bytes, or its first line is this old (seconds).
BATCH_LINES = 2000
BATCH_BYTES = 256 * 1024
BATCH_AGE = 1.0
#: Most bytes read from the file at a time.
READ_SIZE = 256 * 1024
#: How long the last lines of a task may take to leave, once its process exited.
FINAL_GRACE = 60.0
#: How long a batch waits for other jobs' batches to go in the same call (seconds).
LINGER = 0.05
#: Most bytes of lines in one call: well inside the plane's body limit, whatever the JSON adds.
SEND_BYTES = protocol.MAX_LOG_BATCH_BYTES // 4


#: Sends one batch of lines of what a follower follows (a job by its id, a trigger by its id) to the plane.
Send = Callable[[Any, protocol.LogBatch], Awaitable[protocol.LogBatchResponse]]


def _clamp(line: str) -> str:
    if len(line) <= protocol.MAX_LOG_LINE:
        return line
    return line[: protocol.MAX_LOG_LINE] + f" ... [Tether cut this line at {protocol.MAX_LOG_LINE} characters]"


@dataclass
class LogFollower:
    """Follows one log file (a task's, a trigger's) and sends its lines; ``finish()`` once its writer is done."""

    #: What ``send`` is given with each batch: the job's id, the trigger's.
    key: Any
    path: Path
    send: Send
    incarnation: uuid.UUID
    metrics: AgentMetrics
    settings: AgentSettings
    #: Names the follower in the agent's log.
    name: str = ""
    segment: uuid.UUID = field(default_factory=uuid.uuid4)
    offset: int = 0
    seq: int = 0
    _partial: bytes = b""
    _exited: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None
    stopped_by_plane: bool = False

    def start(self) -> None:
        # The file of a try that ran here before (a task resumed after deferral) holds lines already sent.
        with contextlib.suppress(OSError):
            self.offset = self.path.stat().st_size
        self.name = self.name or f"job {self.key}"
        self._task = asyncio.create_task(self._run(), name=f"logs-{self.key}")

    def finish(self) -> None:
        self._exited.set()

    async def wait(self, timeout: float = FINAL_GRACE) -> None:
        """Wait, at most ``timeout``, for the last lines to leave; then stop following."""
        if self._task is None:
            return
        _, pending = await asyncio.wait({self._task}, timeout=timeout)
        for task in pending:
            log.warning(
                "The last log lines of %s did not leave within %.0fs; they stay in %s",
                self.name,
                timeout,
                self.path,
            )
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        backoff = backoff_for(self.settings)
        loop = asyncio.get_running_loop()
        lines: list[str] = []
        size = 0
        first_at = 0.0
        while True:
            # Looked at before reading: what the process wrote before it exited is read in this pass.
            exited = self._exited.is_set()
            new, at_end = self._read(flush=exited)
            if new and not lines:
                first_at = loop.time()
            lines.extend(new)
            size += sum(len(line) + 1 for line in new)
            if exited and at_end:
                await self._send(lines, True, backoff)
                return
            if lines and (size >= BATCH_BYTES or len(lines) >= BATCH_LINES or loop.time() - first_at >= BATCH_AGE):
                if not await self._send(lines, False, backoff):
                    return
                lines, size = [], 0
            if not at_end:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exited.wait(), POLL)

    def _read(self, *, flush: bool) -> tuple[list[str], bool]:
        """Complete lines written since the last read, and whether the file's end was reached.

        A last line without its newline waits for it, unless ``flush``: the process is gone.
        """
        try:
            with self.path.open("rb") as file:
                file.seek(self.offset)
                data = file.read(READ_SIZE)
        except OSError:
            return [], True
        self.offset += len(data)
        at_end = len(data) < READ_SIZE
        *complete, self._partial = (self._partial + data).split(b"\n")
        if flush and at_end and self._partial:
            complete.append(self._partial)
            self._partial = b""
        return [_clamp(line.decode("utf-8", errors="replace")) for line in complete if line], at_end

    async def _send(self, lines: list[str], final: bool, backoff: Backoff) -> bool:
        """Send one batch, retrying while the plane is away; False once the plane says to stop."""
        batch = protocol.LogBatch(
            incarnation=self.incarnation, segment=self.segment, seq=self.seq, lines=lines, final=final
        )
        while True:
            try:
                answer = await self.send(self.key, batch)
            except PlaneUnavailable as exc:
                delay = backoff.next_delay()
                log.debug("Log lines of %s wait for the plane (%s); again in %.1fs", self.name, exc, delay)
                await asyncio.sleep(delay)
                continue
            except PlaneRefused as exc:
                log.warning("The plane refused the log lines of %s: %s; they stay in %s", self.name, exc, self.path)
                self.stopped_by_plane = True
                return False
            backoff.reset()
            self.seq += 1
            self.metrics.log_lines.inc(len(lines))
            self.metrics.log_bytes.inc(sum(len(line) + 1 for line in lines))
            if answer.stop:
                log.warning(
                    "The plane takes no more log lines of %s (%s); the rest stays in %s",
                    self.name,
                    answer.reason,
                    self.path,
                )
                self.stopped_by_plane = True
                return False
            return True


class LogShipper:
    """Makes a follower for each task the agent starts, when it ships logs, and sends their batches together.

    A batch a follower hands over waits ``LINGER`` seconds, or while the call before
    it is in flight, for the batches of other jobs: on a busy agent one call carries
    the lines of many tasks (each kept or refused on its own), not one call per task.
    """

    def __init__(
        self,
        *,
        client: PlaneClient,
        agent_id: Callable[[], uuid.UUID],
        incarnation: uuid.UUID,
        folder: Path,
        metrics: AgentMetrics,
        settings: AgentSettings,
    ) -> None:
        self.client = client
        self.agent_id = agent_id
        self.incarnation = incarnation
        self.folder = folder
        self.metrics = metrics
        self.settings = settings
        self._waiting: list[tuple[protocol.JobLogBatch, asyncio.Future[protocol.LogBatchResponse]]] = []
        self._sender: asyncio.Task[None] | None = None

    def follow(self, job_id: uuid.UUID, log_path: str | None) -> LogFollower | None:
        if not log_path:
            return None
        follower = LogFollower(
            key=job_id,
            path=self.folder / log_path,
            send=self._send,
            incarnation=self.incarnation,
            metrics=self.metrics,
            settings=self.settings,
        )
        follower.start()
        return follower

    async def _send(self, job_id: uuid.UUID, batch: protocol.LogBatch) -> protocol.LogBatchResponse:
        answer: asyncio.Future[protocol.LogBatchResponse] = asyncio.get_running_loop().create_future()
        fields = batch.model_dump(exclude={"incarnation"})
        self._waiting.append((protocol.JobLogBatch(job_id=job_id, **fields), answer))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_waiting(), name="log-batches")
        return await answer

    async def _send_waiting(self) -> None:
        await asyncio.sleep(LINGER)
        while self._waiting:
            taken = _take(self._waiting)
            batches = [batch for batch, _ in taken]
            try:
                response = await self.client.jobs.logs(
                    self.agent_id(), protocol.JobLogBatches(incarnation=self.incarnation, batches=batches)
                )
                by_job = {answer.job_id: answer for answer in response.answers}
            except Exception as exc:  # each follower handles it as it would its own call's
                for _, waiter in taken:
                    if not waiter.done():
                        waiter.set_exception(exc)
                continue
            for batch, waiter in taken:
                if waiter.done():
                    continue  # its follower gave up waiting
                answer = by_job.get(batch.job_id)
                if answer is None:
                    waiter.set_exception(ProtocolError(f"the plane's answer has no word on job {batch.job_id}"))
                else:
                    waiter.set_result(protocol.LogBatchResponse(stop=answer.stop, reason=answer.reason))


def _take(
    waiting: list[tuple[protocol.JobLogBatch, asyncio.Future[protocol.LogBatchResponse]]],
) -> list[tuple[protocol.JobLogBatch, asyncio.Future[protocol.LogBatchResponse]]]:
    """The first waiting batches that fit in one call (always at least one), taken off ``waiting``."""
    size = count = 0
    for batch, _ in waiting:
        cost = sum(len(line) + 1 for line in batch.lines)
        if count and (count >= protocol.MAX_LOG_BATCHES or size + cost > SEND_BYTES):
            break
        size += cost
        count += 1
    taken = waiting[:count]
    del waiting[:count]
    return taken
