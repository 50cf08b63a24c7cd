"""Running asyncio scenarios in unit tests: bounded in time, and waiting for a condition."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Return once ``predicate()`` holds; ``TimeoutError`` if it does not within ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


def run(scenario: Callable[[], Awaitable[None]], timeout: float = 20.0) -> None:
    """Run ``scenario`` on a new event loop, failing it after ``timeout`` seconds."""
    asyncio.run(asyncio.wait_for(scenario(), timeout))
