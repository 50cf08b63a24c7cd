"""An agent whose main thread belongs to Airflow's own loop: the agent on an asyncio loop in a thread beside it.

The dag-processor and triggerer roles run Airflow's DAG processor manager and
trigger runner supervisor, which own the main thread (they install signal
handlers and fork their processes). The agent's registration, heartbeats and
health endpoints run on an asyncio loop in a thread of their own, and calls to
the plane from the main thread are handed to it.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from tether import protocol
from tether.agent.agent import Agent
from tether.agent.client import PlaneClient, make_http_client
from tether.agent.health import AgentMetrics
from tether.agent.settings import AgentSettings
from tether.errors import PlaneUnavailable

T = TypeVar("T")

#: Longest wait for one call to the plane from the main thread.
CALL_TIMEOUT = 120.0


class PlaneBridge:
    """The agent (registration, heartbeats, health) on an asyncio loop in a thread; calls to it from others."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._loop = asyncio.new_event_loop()
        self._exit_code: int | None = None
        self._thread = threading.Thread(target=self._serve, name="tether-agent", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._exit_code = self._loop.run_until_complete(self.agent.run())

    def wait_registered(self) -> bool:
        """Wait until the plane registered the agent; False if the agent stopped first."""
        while not self.agent.registered.wait(0.5):
            if not self._thread.is_alive():
                return False
        return True

    @property
    def agent_id(self) -> uuid.UUID:
        registration = self.agent.state.registration
        assert registration is not None
        return registration.agent_id

    @property
    def incarnation(self) -> uuid.UUID:
        return self.agent.incarnation

    @property
    def client(self) -> PlaneClient:
        return self.agent.client

    def call(self, call: Callable[..., Awaitable[T]], *args: Any, timeout: float = CALL_TIMEOUT) -> T:
        """Run ``call(*args)`` on the agent's loop and wait for it; raises what it raises."""

        async def run() -> T:
            return await call(*args)

        try:
            return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)
        except TimeoutError as exc:
            raise PlaneUnavailable(f"no answer from the plane within {timeout:.0f}s") from exc

    def run_soon(self, callback: Callable[[], Any]) -> None:
        """Run ``callback()`` on the agent's loop, soon; without waiting for it."""
        self._loop.call_soon_threadsafe(callback)

    def stop(self) -> int:
        """Stop the agent (a last heartbeat) and wait for its thread; its exit code."""
        self._loop.call_soon_threadsafe(self.agent.stop)
        self._thread.join(30)
        return self._exit_code or 0


def connect(settings: AgentSettings, role: protocol.AgentRole) -> PlaneBridge:
    """An agent of ``role`` alone, started on its bridge: it registers, heartbeats and serves its health."""
    agent = Agent(
        settings=settings,
        client=PlaneClient(make_http_client(settings)),
        runner=None,
        metrics=AgentMetrics(),
        roles=(role,),
    )
    bridge = PlaneBridge(agent)
    bridge.start()
    return bridge
