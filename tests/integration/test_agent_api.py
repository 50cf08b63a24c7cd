"""The agent API over HTTP against a real database: the protocol's rules, and bad input."""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

import tether
from tests.integration.conftest import SPEAKS, enqueue
from tether import protocol
from tether.plane.models import Agent, Job
from tether.plane.store import Store, utcnow
from tether.protocol import PROTOCOL_HEADER, VERSION_HEADER


def store_of(client: TestClient) -> Store:
    return client.app.state.tether.store  # type: ignore[attr-defined,no-any-return]


class AgentCalls:
    def __init__(self, client: TestClient, token: str, name: str = "a1", **register: Any) -> None:
        self.client = client
        self.headers = {"Authorization": f"Bearer {token}", **SPEAKS}
        self.incarnation = str(uuid.uuid4())
        self.name = name
        self.register_extra = register
        self.agent_id = ""

    def register(self, **override: Any) -> Any:
        body = {
            "name": self.name,
            "incarnation": self.incarnation,
            "tether_version": "0",
            "airflow_version": "3",
            "python_version": "3.11",
            "hostname": "h",
            "queues": ["default"],
            "slots": 4,
            **self.register_extra,
            **override,
        }
        response = self.client.post("/v1/agents/register", json=body, headers=self.headers)
        if response.status_code == 200:
            self.agent_id = response.json()["agent_id"]
        return response

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self.client.post(
            f"/v1/agents/{self.agent_id}{path}",
            json={"incarnation": self.incarnation, **body},
            headers=self.headers,
        )

    def lease(self, free_slots: int = 4, queues: list[str] | None = None, wait: float = 0) -> Any:
        return self.post("/lease", {"free_slots": free_slots, "queues": queues or ["default"], "wait": wait})


@pytest.fixture
def token(store: Store) -> str:
    return store.create_token(name="test")[0].text


@pytest.fixture
def agent(client: TestClient, token: str) -> AgentCalls:
    calls = AgentCalls(client, token)
    assert calls.register().status_code == 200
    return calls


def _hold_polls_long(store: Store) -> None:
    """Hold long-polls for the 20 s agents ask, not the tests' usual second: a busy machine cannot end one early."""
    store.settings = dataclasses.replace(store.settings, lease_wait=timedelta(seconds=20))


def _count(store: Store, model: type) -> int:
    with store.transaction() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def test_health_needs_no_token(client: TestClient) -> None:
    assert client.get("/v1/health").json()["status"] == "ok"


def test_register_heartbeat_lease_start_report(
    client: TestClient, store: Store, agent: AgentCalls, make_workload: Callable[..., Any]
) -> None:
    beat = agent.post("/heartbeat", {"free_slots": 4})
    assert beat.status_code == 200, beat.text
    assert beat.json()["status"] == "HEALTHY"
    workload = make_workload()
    enqueue(store, workload)
    leases = agent.lease().json()["leases"]
    assert len(leases) == 1
    assert leases[0]["workload"]["ti"]["id"] == str(workload.ti.id)
    job_id = leases[0]["job_id"]
    assert agent.post(f"/jobs/{job_id}/start", {}).json()["state"] == "RUNNING"
    report = agent.post(f"/jobs/{job_id}/report", {"state": "success", "exit_code": 0})
    assert report.json()["state"] == "SUCCESS"
    # Reporting the same outcome again is harmless (a retried delivery); another is refused.
    assert agent.post(f"/jobs/{job_id}/report", {"state": "success", "exit_code": 0}).status_code == 200
    again = agent.post(f"/jobs/{job_id}/report", {"state": "failed", "exit_code": 1})
    assert again.status_code == 409 and again.json()["reason"] == "job_final"


def test_lease_honours_queues_slots_and_priority(
    store: Store, agent: AgentCalls, make_workload: Callable[..., Any]
) -> None:
    low = make_workload(task_id="low", priority_weight=1)
    high = make_workload(task_id="high", priority_weight=10)
    big = make_workload(task_id="big", pool_slots=3)
    other = make_workload(task_id="other", queue="gpu")
    enqueue(store, low, high, big, other)
    first = agent.lease(free_slots=1).json()["leases"]
    assert [lease["workload"]["ti"]["task_id"] for lease in first] == ["high"]
    second = agent.lease(free_slots=2).json()["leases"]
    assert [lease["workload"]["ti"]["task_id"] for lease in second] == ["low"]
    assert agent.lease(free_slots=2).json()["leases"] == []
    third = agent.lease(free_slots=3).json()["leases"]
    assert [lease["workload"]["ti"]["task_id"] for lease in third] == ["big"]


def test_only_the_holder_may_start_or_report(
    client: TestClient, store: Store, agent: AgentCalls, token: str, make_workload: Callable[..., Any]
) -> None:
    other = AgentCalls(client, token, name="a2")
    assert other.register().status_code == 200
    enqueue(store, make_workload())
    job_id = agent.lease().json()["leases"][0]["job_id"]
    start = other.post(f"/jobs/{job_id}/start", {})
    assert start.status_code == 409 and start.json()["reason"] == "not_holder"
    assert agent.post(f"/jobs/{job_id}/start", {}).status_code == 200
    report = other.post(f"/jobs/{job_id}/report", {"state": "success", "exit_code": 0})
    assert report.status_code == 409
    with store.transaction() as session:
        assert session.get(Job, job_id).state == "RUNNING"


def test_expired_lease_is_refused_at_the_start_gate_and_requeued_without_a_retry(
    store: Store, agent: AgentCalls, make_workload: Callable[..., Any]
) -> None:
    workload = make_workload(try_number=1)
    enqueue(store, workload)
    job_id = agent.lease().json()["leases"][0]["job_id"]
    with store.transaction() as session:
        session.get(Job, job_id).lease_expires_at = utcnow() - timedelta(seconds=1)
    start = agent.post(f"/jobs/{job_id}/start", {})
    assert start.status_code == 409 and start.json()["reason"] == "lease_expired"
    with store.transaction() as session:
        job = session.get(Job, job_id)
        assert (job.state, job.agent_id, job.try_number) == ("QUEUED", None, 1)
    assert agent.lease().json()["leases"][0]["job_id"] == job_id


def test_one_start_call_starts_the_held_jobs_and_refuses_each_other_on_its_own(
    store: Store, agent: AgentCalls, make_workload: Callable[..., Any]
) -> None:
    enqueue(store, *(make_workload(task_id=f"t{i}") for i in range(4)))
    fresh, expired, again, foreign = (lease["job_id"] for lease in agent.lease(free_slots=4).json()["leases"])
    assert agent.post(f"/jobs/{again}/start", {}).status_code == 200
    with store.transaction() as session:
        session.get(Job, expired).lease_expires_at = utcnow() - timedelta(seconds=1)
        session.get(Job, foreign).agent_id = str(uuid.uuid4())
    unknown = str(uuid.uuid4())
    answer = agent.post("/jobs/start", {"job_ids": [fresh, expired, again, foreign, unknown, fresh]})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    # A start already made counts as started (a retried call); a repeated id is one job.
    assert body["started"] == [fresh, again]
    assert {r["job_id"]: (r["status"], r["reason"]) for r in body["refused"]} == {
        expired: (409, "lease_expired"),
        foreign: (409, "not_holder"),
        unknown: (404, "job_not_found"),
    }
    with store.transaction() as session:
        states = {job_id: session.get(Job, job_id).state for job_id in (fresh, expired, again, foreign)}
    assert states == {fresh: "RUNNING", expired: "QUEUED", again: "RUNNING", foreign: "LEASED"}


def test_a_start_call_from_a_superseded_process_starts_nothing(
    client: TestClient, store: Store, agent: AgentCalls, token: str, make_workload: Callable[..., Any]
) -> None:
    enqueue(store, make_workload(), make_workload())
    job_ids = [lease["job_id"] for lease in agent.lease(free_slots=2).json()["leases"]]
    successor = AgentCalls(client, token, name=agent.name)
    successor.agent_id = agent.agent_id
    # The same name and id, another process: the plane knows only the newest incarnation.
    with store.transaction() as session:
        session.get(Agent, agent.agent_id).incarnation = successor.incarnation
    refused = agent.post("/jobs/start", {"job_ids": job_ids})
    assert refused.status_code == 409 and refused.json()["reason"] == "superseded"
    with store.transaction() as session:
        assert {session.get(Job, job_id).state for job_id in job_ids} == {"LEASED"}
    assert agent.post("/jobs/start", {"job_ids": []}).status_code == 422


def test_a_live_name_cannot_be_taken_but_a_dead_one_can(
    client: TestClient, store: Store, agent: AgentCalls, token: str, make_workload: Callable[..., Any]
) -> None:
    enqueue(store, make_workload(), make_workload())
    leases = agent.lease(free_slots=2).json()["leases"]
    agent.post(f"/jobs/{leases[0]['job_id']}/start", {})
    impostor = AgentCalls(client, token, name=agent.name)
    refused = impostor.register()
    assert refused.status_code == 409
    assert "held by a live agent" in refused.json()["detail"]
    with store.transaction() as session:
        session.get(Agent, agent.agent_id).last_heartbeat = utcnow() - timedelta(minutes=5)
    assert impostor.register().status_code == 200
    with store.transaction() as session:
        states = {session.get(Job, lease["job_id"]).state for lease in leases}
    # The dead incarnation's started job failed; its unstarted lease went back to the queue.
    assert states == {"FAILED", "QUEUED"}
    superseded = agent.post("/heartbeat", {"free_slots": 4})
    assert superseded.status_code == 409 and superseded.json()["reason"] == "superseded"


def test_sweep_settles_the_jobs_of_a_silent_agent(
    store: Store, agent: AgentCalls, make_workload: Callable[..., Any]
) -> None:
    enqueue(store, make_workload(), make_workload())
    leases = agent.lease(free_slots=2).json()["leases"]
    agent.post(f"/jobs/{leases[0]['job_id']}/start", {})
    assert store.sweep() == {"expired_leases": 0, "unhealthy_agents": 0, "triggerers_ended": 0}
    later = utcnow() + SETTINGS_HEALTH_TIMEOUT + timedelta(seconds=1)
    assert store.sweep(now=later)["unhealthy_agents"] == 1
    with store.transaction() as session:
        running, leased = (session.get(Job, lease["job_id"]) for lease in leases)
        assert running.state == "FAILED" and "unhealthy" in running.reason
        assert (leased.state, leased.try_number) == ("QUEUED", 1)
    # A report from the frozen agent for the failed job cannot overturn it.
    late = agent.post(f"/jobs/{leases[0]['job_id']}/report", {"state": "success", "exit_code": 0})
    assert late.status_code == 409


SETTINGS_HEALTH_TIMEOUT = timedelta(seconds=3)


def test_heartbeat_orders_a_kill_for_jobs_the_agent_no_longer_holds(
    store: Store, agent: AgentCalls, make_workload: Callable[..., Any]
) -> None:
    workload = make_workload()
    enqueue(store, workload)
    job_id = agent.lease().json()["leases"][0]["job_id"]
    agent.post(f"/jobs/{job_id}/start", {})
    assert agent.post("/heartbeat", {"free_slots": 3, "running_jobs": [job_id]}).json()["commands"] == []
    store.revoke(str(workload.ti.id), 1)
    commands = agent.post("/heartbeat", {"free_slots": 3, "running_jobs": [job_id]}).json()["commands"]
    assert [(c["kind"], c["job_id"]) for c in commands] == [("kill", job_id)]


@pytest.mark.parametrize(
    ("authorization", "reason"),
    [
        (None, "no_token"),
        ("Basic abc", "no_token"),
        ("Bearer not-a-token", "token_malformed"),
        ("Bearer tether_0123456789_" + "A" * 43, "token_unknown"),
    ],
)
def test_requests_without_a_valid_token_get_401_and_change_nothing(
    client: TestClient, store: Store, authorization: str | None, reason: str
) -> None:
    headers = {**SPEAKS, "Authorization": authorization} if authorization else dict(SPEAKS)
    body = {
        "name": "x",
        "incarnation": str(uuid.uuid4()),
        "tether_version": "0",
        "airflow_version": "3",
        "python_version": "3",
        "hostname": "h",
        "queues": ["default"],
        "slots": 1,
    }
    response = client.post("/v1/agents/register", json=body, headers=headers)
    assert response.status_code == 401
    assert response.json()["reason"] == reason
    assert _count(store, Agent) == 0


def test_revoked_and_expired_tokens_are_refused(client: TestClient, store: Store) -> None:
    revoked_token, revoked_row = store.create_token(name="revoked")
    store.revoke_token(revoked_row.id)
    expired_token, _ = store.create_token(name="old", expires_in=timedelta(seconds=-1))
    for text, reason in ((revoked_token.text, "token_revoked"), (expired_token.text, "token_expired")):
        response = AgentCalls(client, text).register()
        assert response.status_code == 401
        assert response.json()["reason"] == reason
    assert _count(store, Agent) == 0


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ({"slots": -1}, "slots"),
        ({"slots": 0}, "slots"),
        ({"name": "x" * 10_000}, "name"),
        ({"name": "bad name with spaces"}, "name"),
        ({"queues": []}, "queues"),
        ({"surprise": 1}, "surprise"),
        ({"incarnation": "not-a-uuid"}, "incarnation"),
    ],
)
def test_malformed_bodies_get_422_with_a_reason_and_change_nothing(
    client: TestClient, store: Store, token: str, override: dict[str, Any], fragment: str
) -> None:
    response = AgentCalls(client, token).register(**override)
    assert response.status_code == 422, response.text
    assert response.json()["reason"] == "invalid_request"
    assert fragment in response.json()["detail"]
    assert _count(store, Agent) == 0


def test_oversized_and_non_json_bodies_are_refused(client: TestClient, store: Store, token: str) -> None:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json", **SPEAKS}
    big = client.post("/v1/agents/register", content=b"{" + b" " * 100_000 + b"}", headers=headers)
    assert big.status_code == 413 and big.json()["reason"] == "body_too_large"
    garbage = client.post("/v1/agents/register", content=b"{not json", headers=headers)
    assert garbage.status_code == 422
    assert _count(store, Agent) == 0


def test_a_header_block_over_the_limit_is_refused_before_the_token_is_read(client: TestClient, token: str) -> None:
    headers = {"Authorization": f"Bearer {token}", **SPEAKS}
    # The positive control: the same call with headers just under the limit reaches the route.
    under = client.get("/v1/preflight", headers={**headers, "X-Filler": "a" * (protocol.MAX_HEADER_BYTES - 2048)})
    assert under.status_code == 200, under.text
    over = client.get("/v1/preflight", headers={**headers, "X-Filler": "a" * protocol.MAX_HEADER_BYTES})
    assert (over.status_code, over.json()["reason"]) == (431, "headers_too_large")
    many = {f"X-F{i}": "b" * 100 for i in range(400)}
    assert client.get("/v1/health", headers=many).status_code == 431


@pytest.mark.parametrize(
    ("header", "reason", "names"),
    [
        (None, "protocol_missing", ["X-Tether-Protocol", "protocol 1 to 2"]),
        ("two", "protocol_missing", ["X-Tether-Protocol"]),
        ("99", "agent_too_new", ["Tether 0.9.0 (protocol 99)", "upgrade the plane first"]),
        ("0", "agent_too_old", ["Tether 0.9.0 (protocol 0)", "upgrade the agent to Tether 0.1 or newer"]),
    ],
)
def test_a_protocol_revision_the_plane_does_not_serve_is_refused_naming_both_versions(
    client: TestClient, store: Store, token: str, header: str | None, reason: str, names: list[str]
) -> None:
    calls = AgentCalls(client, token)
    calls.headers.pop(PROTOCOL_HEADER)
    calls.headers[VERSION_HEADER] = "0.9.0"
    if header is not None:
        calls.headers[PROTOCOL_HEADER] = header
    response = calls.register()
    assert response.status_code == 400 and response.json()["reason"] == reason
    assert f"this plane runs Tether {tether.__version__}" in response.json()["detail"]
    for name in names:
        assert name in response.json()["detail"]
    assert _count(store, Agent) == 0


def test_an_agent_of_the_previous_revision_gets_answers_in_its_revision(client: TestClient, token: str) -> None:
    calls = AgentCalls(client, token)
    calls.headers[PROTOCOL_HEADER] = "1"
    assert calls.register().status_code == 200
    health = client.get("/v1/health", headers={PROTOCOL_HEADER: "1"}).json()
    assert health == {"status": "ok", "protocol": 1, "version": tether.__version__}
    assert client.get("/v1/health").json()["oldest_protocol"] == 1  # the current revision's answer has it
    with store_of(client).transaction() as session:
        assert session.scalars(select(Agent.protocol)).all() == [1]


def test_every_response_carries_a_request_id(client: TestClient) -> None:
    response = client.get("/v1/health", headers={"X-Request-Id": "abc123"})
    assert response.headers["X-Request-Id"] == "abc123"
    assert client.get("/v1/health").headers["X-Request-Id"]


def test_answered_requests_are_logged_at_debug_and_refused_ones_at_info(client: TestClient) -> None:
    # On the logger itself: the first refusal loads Airflow's metrics, whose logging set-up replaces
    # the root logger's handlers (and with them pytest's).
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("tether.api")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        client.get("/v1/health", headers={"X-Request-Id": "answered1"})
        client.post("/v1/agents/register", json={}, headers={"X-Request-Id": "refused1"})
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    requests = [r for r in records if " -> " in r.getMessage()]
    lines = {r.getMessage().rsplit("=", 1)[-1].rstrip("]"): r.levelname for r in requests}
    # Airflow's access log has every request with its id; Tether's own line is for when something went wrong.
    assert lines == {"answered1": "DEBUG", "refused1": "INFO"}


def test_openapi_document_describes_every_agent_route(client: TestClient) -> None:
    paths = client.get("/v1/openapi.json").json()["paths"]
    for suffix in ("register", "heartbeat", "lease", "start", "report", "health"):
        assert any(p.endswith(suffix) for p in paths), suffix


def test_a_long_poll_returns_as_soon_as_a_job_is_queued(
    client: TestClient, store: Store, agent: AgentCalls, make_workload: Callable[..., Any]
) -> None:
    import threading
    import time

    result: dict[str, Any] = {}
    _hold_polls_long(store)

    def poll() -> None:
        result["response"] = agent.lease(wait=20)

    thread = threading.Thread(target=poll)
    thread.start()
    time.sleep(0.5)
    enqueue(store, make_workload())
    thread.join(timeout=15)
    assert not thread.is_alive(), "the waiting lease was not woken by the new job"
    assert len(result["response"].json()["leases"]) == 1


def _count_claims(store: Store, monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """The claims the store is asked for from now on, one entry each."""
    claims: list[object] = []
    real_claim = store.claim

    def counted_claim(*args: Any, **kwargs: Any) -> Any:
        claims.append(args)
        return real_claim(*args, **kwargs)

    monkeypatch.setattr(store, "claim", counted_claim)
    return claims


def test_idle_polls_skip_the_database_while_the_queue_is_known_empty(
    client: TestClient,
    store: Store,
    agent: AgentCalls,
    make_workload: Callable[..., Any],
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import time

    claims = _count_claims(store, monkeypatch)
    _hold_polls_long(store)
    assert agent.lease().json()["leases"] == []  # the first poll starts the listener
    listens = database_url.startswith("postgresql")
    if listens:
        limit = time.monotonic() + 10
        while not client.app.state.tether.wakeup.listening and time.monotonic() < limit:  # type: ignore[attr-defined]
            time.sleep(0.05)
    assert agent.lease().json()["leases"] == []  # looks, and finds the queue empty
    looked = len(claims)
    for _ in range(5):
        assert agent.lease().json()["leases"] == []
    # With LISTEN (PostgreSQL) nothing new can have come without a notification; SQLite must look each time.
    assert len(claims) - looked == (0 if listens else 5)
    # A job queued now is leased by the next poll, which the notification wakes if it did not look.
    enqueue(store, make_workload())
    assert len(agent.lease(wait=10).json()["leases"]) == 1


def test_a_job_wakes_a_few_waiting_polls_and_costs_a_few_claims_not_one_each(
    client: TestClient,
    store: Store,
    token: str,
    make_workload: Callable[..., Any],
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading
    import time

    from tether.plane.api.deps import CLAIM_THREADS
    from tether.plane.api.wakeup import WAKE_MORE

    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite has no notifications: every poll looks on a timer")
    claims = _count_claims(store, monkeypatch)
    _hold_polls_long(store)
    waiting = 3 * CLAIM_THREADS
    agents = [AgentCalls(client, token, name=f"w{i}") for i in range(waiting)]
    for calls in agents:
        assert calls.register().status_code == 200
    wakeup = client.app.state.tether.wakeup  # type: ignore[attr-defined]
    assert agents[0].lease().json()["leases"] == []  # starts the listener
    limit = time.monotonic() + 10
    while not wakeup.listening and time.monotonic() < limit:
        time.sleep(0.05)
    leased: list[int] = []

    def poll(calls: AgentCalls) -> None:
        leased.append(len(calls.lease(free_slots=1, wait=20).json()["leases"]))

    threads = [threading.Thread(target=poll, args=(calls,)) for calls in agents]
    for thread in threads:
        thread.start()
    limit = time.monotonic() + 10
    while len(wakeup._waiters.get("default", ())) < waiting and time.monotonic() < limit:
        time.sleep(0.05)
    claims.clear()
    enqueue(store, make_workload())
    limit = time.monotonic() + 10
    while not leased and time.monotonic() < limit:
        time.sleep(0.05)
    assert leased == [1], "one waiting poll leases the job"
    time.sleep(1.0)  # the woken polls that still look do so now
    # The longest-waiting poll was woken and leased, and woke two more, which found the queue empty.
    assert 1 <= len(claims) <= 1 + WAKE_MORE, len(claims)
    # The other polls wait on: a burst queued later (one notification) reaches every one of them.
    enqueue(store, *(make_workload(task_id=f"t{i}") for i in range(waiting - 1)))
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(leased) == [1] * waiting


# -- ADR 8: an idle agent's lease poll is its heartbeat ---------------------------------


def _last_heartbeat(store: Store, agent: AgentCalls) -> tuple[Any, int]:
    with store.transaction() as session:
        row = session.get(Agent, agent.agent_id)
        assert row is not None
        return row.last_heartbeat, row.free_slots


def test_a_poll_marked_as_the_heartbeat_stamps_it_and_a_plain_poll_does_not(
    client: TestClient, store: Store, token: str
) -> None:
    calls = AgentCalls(client, token)
    answer = calls.register().json()
    # The health timeout less one interval: 3 x 1 s - 1 s.
    assert answer["poll_heartbeat_window"] == 2.0
    registered, _ = _last_heartbeat(store, calls)
    time.sleep(0.01)
    plain = calls.lease(free_slots=3)
    assert plain.status_code == 200 and plain.json() == {"leases": [], "cordoned": False}
    assert _last_heartbeat(store, calls) == (registered, 4)
    beat = calls.post("/lease", {"free_slots": 3, "queues": ["default"], "wait": 0, "heartbeat": True})
    assert beat.status_code == 200 and beat.json() == {"leases": [], "cordoned": False}
    stamped, free = _last_heartbeat(store, calls)
    assert stamped > registered and free == 3
    # The plane judges silence by it: an agent whose only call was that poll is not silent.
    assert store.sweep(now=stamped + SETTINGS_HEALTH_TIMEOUT - timedelta(seconds=0.5))["unhealthy_agents"] == 0


def test_an_agent_of_the_previous_revision_is_not_told_of_the_window(client: TestClient, token: str) -> None:
    calls = AgentCalls(client, token)
    calls.headers[PROTOCOL_HEADER] = "1"
    assert "poll_heartbeat_window" not in calls.register().json()
    assert "cordoned" not in calls.lease().json()


def test_a_heartbeat_poll_of_a_deleted_agent_is_refused_as_its_heartbeat_is(store: Store, agent: AgentCalls) -> None:
    store.delete_agent(agent.name, actor="test")
    beat = agent.post("/heartbeat", {"free_slots": 4})
    poll = agent.post("/lease", {"free_slots": 4, "queues": ["default"], "wait": 0, "heartbeat": True})
    assert beat.status_code == 404 and beat.json()["reason"] == "agent_deleted"
    assert (poll.status_code, poll.json()["reason"]) == (404, "agent_deleted")


def test_a_cordoned_agents_heartbeat_poll_is_answered_with_the_cordon_and_leases_nothing(
    store: Store, agent: AgentCalls, make_workload: Callable[..., Any]
) -> None:
    _hold_polls_long(store)
    enqueue(store, make_workload())
    store.cordon(agent.name, reason="maintenance", actor="test")
    poll = agent.post("/lease", {"free_slots": 4, "queues": ["default"], "wait": 20, "heartbeat": True})
    assert poll.json() == {"leases": [], "cordoned": True}
    store.uncordon(agent.name, actor="test")
    poll = agent.post("/lease", {"free_slots": 4, "queues": ["default"], "wait": 20, "heartbeat": True})
    assert len(poll.json()["leases"]) == 1 and poll.json()["cordoned"] is False
