"""Accepted tokens in the agent API: looked up once per token while none changes, refused soon after a change.

A change made elsewhere (the CLI, another API server) does not clear this API
server's cache: only the token epoch it reads every ``token_cache_ttl`` tells it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.integration.conftest import fake_authorizer
from tests.integration.test_agent_api import AgentCalls
from tether.plane.api.app import create_app
from tether.plane.api.deps import PlaneContext
from tether.plane.store import Store, utcnow

TTL = 0.3


@pytest.fixture
def lookups(store: Store) -> list[str]:
    """The store's token look-ups, by token name, as the API makes them."""
    seen: list[str] = []
    authenticate = store.authenticate

    def counted(text: str, **kwargs: Any) -> Any:
        identity = authenticate(text, **kwargs)
        seen.append(identity.name)
        return identity

    store.authenticate = counted  # type: ignore[method-assign]
    return seen


@pytest.fixture
def cached_client(store: Store, lookups: list[str]) -> Iterator[TestClient]:
    store.settings = dataclasses.replace(store.settings, token_cache_ttl=timedelta(seconds=TTL))
    ctx = PlaneContext.for_store(store)
    with TestClient(create_app(lambda: ctx, authorizer=fake_authorizer)) as test_client:
        yield test_client
    ctx.wakeup.stop()


def _beat(agent: AgentCalls) -> Any:
    return agent.post("/heartbeat", {"free_slots": 4})


def _refused_within(call: Callable[[], Any], reason: str, seconds: float) -> None:
    began = time.monotonic()
    while time.monotonic() - began < seconds:
        response = call()
        if response.status_code == 401:
            assert response.json()["reason"] == reason, response.text
            return
        assert response.status_code == 200, response.text
        time.sleep(0.02)
    raise AssertionError(f"still accepted {seconds} s after the change")


def test_a_fleet_of_tokens_is_looked_up_once_each_while_no_token_changes(
    cached_client: TestClient, store: Store, lookups: list[str]
) -> None:
    agents = [AgentCalls(cached_client, store.create_token(name=f"t{i}")[0].text, name=f"a{i}") for i in range(3)]
    for agent in agents:
        assert agent.register().status_code == 200
    began = time.monotonic()
    calls = 0
    # Several times the check interval: each token stays accepted without a new look-up.
    while time.monotonic() - began < 5 * TTL:
        for agent in agents:
            assert _beat(agent).status_code == 200
            calls += 1
        time.sleep(0.02)
    assert calls > 10 * len(agents)
    assert sorted(lookups) == ["t0", "t1", "t2"]


def test_a_token_revoked_elsewhere_is_refused_within_the_check_interval_and_the_others_stay_accepted(
    cached_client: TestClient, store: Store, lookups: list[str]
) -> None:
    revoked_text, revoked_row = store.create_token(name="revoked")
    revoked = AgentCalls(cached_client, revoked_text.text, name="r")
    kept = AgentCalls(cached_client, store.create_token(name="kept")[0].text, name="k")
    assert revoked.register().status_code == 200
    assert kept.register().status_code == 200
    assert _beat(revoked).status_code == 200  # accepted from the cache before the change
    # As another process does it: this API server's cache is not told.
    store.revoke_token(revoked_row.id, revoked_by="cli")
    _refused_within(lambda: _beat(revoked), "token_revoked", 10 * TTL)
    assert _beat(kept).status_code == 200
    # The change dropped every entry: the kept token was looked up once more, not once per call.
    assert lookups.count("kept") == 2


def test_a_token_brought_forward_elsewhere_is_refused_from_its_new_expiry(
    cached_client: TestClient, store: Store
) -> None:
    text, row = store.create_token(name="short")
    agent = AgentCalls(cached_client, text.text, name="s")
    assert agent.register().status_code == 200
    expires_at = utcnow() + timedelta(seconds=1)
    store.update_token(row.id, expires_at=expires_at, changed_by="cli")
    # Accepted until the moment, refused from it: the cached identity carries its expiry.
    while utcnow() < expires_at - timedelta(seconds=0.2):
        assert _beat(agent).status_code == 200
        time.sleep(0.05)
    _refused_within(lambda: _beat(agent), "token_expired", 10 * TTL + 0.2)
    assert utcnow() >= expires_at


def test_last_used_is_written_for_many_tokens_at_once_and_never_moved_back(store: Store) -> None:
    rows = [store.create_token(name=f"fleet{i}")[1] for i in range(4)]
    untouched = rows.pop()
    # More tokens than one statement takes (most of them unknown here), the real ones spread over them.
    ids = [f"{n:010x}" for n in range(1200)]
    ids[0], ids[600], ids[1199] = (row.id for row in rows)
    later = utcnow()
    store.mark_tokens_used(ids[:1], now=later)
    store.mark_tokens_used(ids, now=later - timedelta(minutes=5))  # an older time, from another API server
    seen = {token.name: token.last_used_at for token in store.list_tokens()}
    assert seen == {
        "fleet0": later,
        "fleet1": later - timedelta(minutes=5),
        "fleet2": later - timedelta(minutes=5),
        untouched.name: None,
    }
