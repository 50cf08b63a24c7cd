"""The agent API's token cache: one database lookup per token at a time, and no cached refusals."""

from __future__ import annotations

import asyncio

import pytest

from tether import errors
from tether.plane.api.deps import TOKEN_KEEP, TokenCache
from tether.plane.store import TokenIdentity


def test_calls_that_miss_together_share_one_lookup() -> None:
    loads = 0

    async def load() -> TokenIdentity:
        nonlocal loads
        loads += 1
        await asyncio.sleep(0.05)
        return TokenIdentity(id="abc", name="fleet")

    async def main() -> list[TokenIdentity]:
        cache = TokenCache(60)
        return await asyncio.gather(*(cache.get("secret", load) for _ in range(50)))

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
        cache = TokenCache(60)
        outcomes = await asyncio.gather(*(cache.get("secret", refuse) for _ in range(10)), return_exceptions=True)
        # Refused once is not refused for good: the next call looks again.
        return outcomes, await cache.get("secret", accept)

    outcomes, later = asyncio.run(main())
    assert loads == 1
    assert all(isinstance(o, errors.Unauthorized) and o.reason == "token_revoked" for o in outcomes)
    assert later.name == "fleet"


def test_an_entry_is_refreshed_in_the_background_before_its_time_is_up(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("tether.plane.api.deps.time.monotonic", lambda: now[0])
    names = iter(["first", "second", "third"])
    loads: list[float] = []

    async def load() -> TokenIdentity:
        loads.append(now[0])
        return TokenIdentity(id="abc", name=next(names))

    async def main() -> list[str]:
        cache = TokenCache(2)
        seen = [(await cache.get("secret", load)).name]
        now[0] += 0.5  # first half of its time: used as it is
        seen.append((await cache.get("secret", load)).name)
        assert len(loads) == 1
        now[0] += 1.0  # second half: still used at once, while one load runs in the background
        seen.append((await cache.get("secret", load)).name)
        seen.append((await cache.get("secret", load)).name)
        for _ in range(3):  # the load, then its completion, each take a turn of the event loop
            await asyncio.sleep(0)
        assert len(loads) == 2
        seen.append((await cache.get("secret", load)).name)
        now[0] += 2.5  # past its time (counted from when its load began): every call waits for a new one
        seen.append((await cache.get("secret", load)).name)
        return seen

    assert asyncio.run(main()) == ["first", "first", "first", "first", "second", "third"]


def test_a_clear_discards_what_a_load_begun_before_it_finds() -> None:
    names = iter(["before", "after"])

    async def main() -> list[str]:
        gate = asyncio.Event()

        async def slow_load() -> TokenIdentity:
            await gate.wait()
            return TokenIdentity(id="abc", name=next(names))

        cache = TokenCache(60)
        waiting = asyncio.ensure_future(cache.get("secret", slow_load))
        await asyncio.sleep(0)
        cache.clear()  # the token was revoked while it was being looked up
        gate.set()
        seen = [(await waiting).name]
        seen.append((await cache.get("secret", slow_load)).name)
        return seen

    # The call that was waiting gets its answer, but it is not kept: the next call looks again.
    assert asyncio.run(main()) == ["before", "after"]


def test_an_entry_outlives_the_old_minute_while_the_epoch_holds_and_goes_with_a_new_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    monkeypatch.setattr("tether.plane.api.deps.time.monotonic", lambda: now[0])
    epoch = [7]
    loads = 0

    async def load() -> TokenIdentity:
        nonlocal loads
        loads += 1
        return TokenIdentity(id="abc", name="fleet")

    async def read_epoch() -> int:
        return epoch[0]

    async def main() -> None:
        cache = TokenCache(2, keep=TOKEN_KEEP)
        for _ in range(30):  # half an hour of an agent's calls, a minute apart
            await cache.identity("secret", load, read_epoch)
            now[0] += 60
            await asyncio.sleep(0)
        assert loads == 1
        epoch[0] += 1  # a token changed somewhere: the next reading of the epoch drops every entry
        now[0] += 3
        await cache.identity("secret", load, read_epoch)
        assert loads == 2

    asyncio.run(main())


def test_tokens_used_are_written_together_once_a_minute_and_kept_when_the_write_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    monkeypatch.setattr("tether.plane.api.deps.time.monotonic", lambda: now[0])
    writes: list[list[str]] = []
    fail = [False]
    gate = asyncio.Event()

    async def write(used: list[str]) -> None:
        await gate.wait()
        if fail[0]:
            raise OSError("the database is away")
        writes.append(used)

    async def settle() -> None:
        for _ in range(3):
            await asyncio.sleep(0)

    async def main() -> None:
        gate.set()
        cache = TokenCache(2, keep=TOKEN_KEEP, used_every=60)
        for token in ("a", "b", "a", "c"):
            cache.note_use(token, write)
            now[0] += 10
        await settle()
        assert writes == []  # 40 s in: nothing written yet
        now[0] += 20
        cache.note_use("d", write)
        await settle()
        assert writes == [["a", "b", "c", "d"]]  # every token used since, in one write
        # A write that fails keeps its tokens for the next, with those used meanwhile.
        gate.clear()
        fail[0] = True
        now[0] += 60
        cache.note_use("e", write)
        cache.note_use("f", write)  # while the write is under way: counted for the next
        gate.set()
        await settle()
        fail[0] = False
        now[0] += 60
        cache.note_use("g", write)
        await settle()
        assert writes == [["a", "b", "c", "d"], ["e", "f", "g"]]

    asyncio.run(main())
