"""The agent API's token cache: one database lookup per token at a time, and no cached refusals."""

from __future__ import annotations

import asyncio

import pytest

from tether import errors
from tether.plane.api.deps import TokenCache
from tether.plane.store import TokenIdentity


def test_calls_that_miss_together_share_one_lookup() -> None:
    loads = 0

    async def load() -> TokenIdentity:
        nonlocal loads
        loads += 1
        await asyncio.sleep(0.05)
        return TokenIdentity(id="abc", name="fleet")

    async def main() -> list[TokenIdentity]:
        cache = TokenCache(ttl=60)
        return await asyncio.gather(*(cache.lookup("secret", load) for _ in range(50)))

    identities = asyncio.run(main())
    assert loads == 1
    assert {i.name for i in identities} == {"fleet"}


def test_a_refusal_reaches_every_waiting_call_and_is_not_kept() -> None:
    loads = 0

    async def refuse() -> TokenIdentity:
        nonlocal loads
        loads += 1
        await asyncio.sleep(0.05)
        raise errors.Unauthorized("the agent token was revoked", reason="token_revoked")

    async def accept() -> TokenIdentity:
        return TokenIdentity(id="abc", name="fleet")

    async def main() -> tuple[list[object], TokenIdentity]:
        cache = TokenCache(ttl=60)
        outcomes = await asyncio.gather(*(cache.lookup("secret", refuse) for _ in range(10)), return_exceptions=True)
        # Refused once is not refused for good: the next call looks again.
        return outcomes, await cache.lookup("secret", accept)

    outcomes, later = asyncio.run(main())
    assert loads == 1
    assert all(isinstance(o, errors.Unauthorized) and o.reason == "token_revoked" for o in outcomes)
    assert later.name == "fleet"


def test_an_entry_is_looked_up_again_once_its_time_is_up(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("tether.plane.api.deps.time.monotonic", lambda: now[0])
    names = iter(["first", "second"])

    async def load() -> TokenIdentity:
        return TokenIdentity(id="abc", name=next(names))

    async def main() -> list[str]:
        cache = TokenCache(ttl=2)
        seen = [(await cache.lookup("secret", load)).name]
        now[0] += 1.5
        seen.append((await cache.lookup("secret", load)).name)
        now[0] += 1.0
        seen.append((await cache.lookup("secret", load)).name)
        return seen

    assert asyncio.run(main()) == ["first", "first", "second"]
