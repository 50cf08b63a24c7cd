"""The agent API under attack (docs/security.md): what a holder of a token, or of a socket, cannot do.

Each scenario sends the attack to the live API server and checks both the answer
and that nothing changed that the attacker should not have changed; each has a
positive control that the same call succeeds for whom it is meant.
"""

from __future__ import annotations

import contextlib
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.faults.conftest import Agents, agent_api, jobs, settled_jobs, trigger
from tests.faults.test_bad_input import _problem, _register_body
from tether.embedded import Plane, wait_until

pytestmark = pytest.mark.timeout(300)

DAG = "faults_attacks"
#: Slow clients held open at once: well under the API server's descriptors, well over its workers.
SLOW_CLIENTS = 200
SLOW_FOR = 20.0


def _job_row(plane: Plane, job_id: str) -> dict[str, Any]:
    rows = plane.query(
        "SELECT state, agent_id, incarnation, started_at, finished_at, reason FROM tether_job WHERE id = :j", j=job_id
    )
    return dict(rows[0]._mapping)


def test_another_tokens_agent_and_replayed_calls_change_nothing(plane: Plane, token: str) -> None:
    run_id = trigger(plane, DAG)
    wait_until(lambda: [j["state"] for j in jobs(plane, DAG, run_id)] == ["QUEUED"], 60, "job queued")
    stolen_from = plane.create_token("attack-other", scopes=("worker",))
    owner = _register_body("attack-owner", queues=["attackq"])
    me = {"incarnation": owner["incarnation"]}
    with agent_api(plane, token) as api, agent_api(plane, stolen_from) as intruder:
        owner_id = api.post("/agents/register", json=owner).json()["agent_id"]
        leased = api.post(f"/agents/{owner_id}/lease", json={**me, "free_slots": 1, "queues": ["attackq"], "wait": 0})
        (lease,) = leased.json()["leases"]
        job = lease["job_id"]
        held = _job_row(plane, job)

        # Another token, even knowing the agent's id, its incarnation and the job's id, acts on nothing.
        calls = {
            "heartbeat": (f"/agents/{owner_id}/heartbeat", {**me, "free_slots": 1}),
            "lease": (f"/agents/{owner_id}/lease", {**me, "free_slots": 1, "queues": ["attackq"], "wait": 0}),
            "start": (f"/agents/{owner_id}/jobs/{job}/start", me),
            "start_many": (f"/agents/{owner_id}/jobs/start", {**me, "job_ids": [job]}),
            "report": (f"/agents/{owner_id}/jobs/{job}/report", {**me, "state": "success"}),
            "logs": (
                f"/agents/{owner_id}/jobs/{job}/logs",
                {**me, "segment": str(uuid.uuid4()), "seq": 0, "lines": ["x"]},
            ),
            "logs_of_jobs": (
                f"/agents/{owner_id}/logs",
                {**me, "batches": [{"job_id": job, "segment": str(uuid.uuid4()), "seq": 0, "lines": ["x"]}]},
            ),
        }
        for name, (path, body) in calls.items():
            refused = intruder.post(path, json=body)
            # Refused as another token's agent, or as no agent of this token at all: either way, refused.
            assert (refused.status_code, refused.json()["reason"]) in {
                (409, "token_mismatch"),
                (404, "agent_not_found"),
            }, (name, refused.text)
        # Registering under the owner's name with the other token takes nothing over either.
        _problem(intruder.post("/agents/register", json=_register_body("attack-owner")), 409, "name_taken")
        assert _job_row(plane, job) == held

        # The holder passes the start gate; the same call again is answered the same and starts nothing twice.
        assert api.post(f"/agents/{owner_id}/jobs/{job}/start", json=me).is_success
        started = _job_row(plane, job)
        assert started["state"] == "RUNNING"
        replayed = api.post(f"/agents/{owner_id}/jobs/{job}/start", json=me)
        assert replayed.is_success, replayed.text
        assert _job_row(plane, job) == started
        # A lease replayed hands out nothing: the job is held.
        again = api.post(f"/agents/{owner_id}/lease", json={**me, "free_slots": 1, "queues": ["attackq"], "wait": 0})
        assert again.json()["leases"] == []

        report = {**me, "state": "failed", "exit_code": 1, "reason": "attack test"}
        assert api.post(f"/agents/{owner_id}/jobs/{job}/report", json=report).json()["state"] == "FAILED"
        finished = _job_row(plane, job)
        # The same report replayed is the same answer and changes nothing; another outcome is refused.
        assert api.post(f"/agents/{owner_id}/jobs/{job}/report", json=report).json()["state"] == "FAILED"
        _problem(api.post(f"/agents/{owner_id}/jobs/{job}/report", json={**me, "state": "success"}), 409, "job_final")
        # A start replayed after the end does not run it again.
        _problem(api.post(f"/agents/{owner_id}/jobs/{job}/start", json=me), 409, "not_leased")
        assert _job_row(plane, job) == finished
    assert plane.wait_for_run(DAG, run_id, timeout=90) == "failed"
    assert [j["try_number"] for j in jobs(plane, DAG, run_id)] == [1]


def _raw_request(plane: Plane, head: bytes) -> bytes:
    """Send ``head`` on a socket of its own; what the server answers before it closes (or b"")."""
    port = int(plane.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            sock.sendall(head)
        answer = b""
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            while chunk := sock.recv(65536):
                answer += chunk
        return answer


def test_oversized_headers_are_refused_and_the_server_serves_on(plane: Plane, token: str) -> None:
    health = "/tether/v1/health"
    ordinary = f"GET {health} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode()
    # The positive control: the same request with ordinary headers is served.
    assert _raw_request(plane, ordinary + b"\r\n").startswith(b"HTTP/1.1 200")
    for huge in (
        b"X-Filler: " + b"a" * 200_000 + b"\r\n",  # one header of 200 kB
        b"".join(b"X-F%d: %s\r\n" % (i, b"b" * 100) for i in range(5_000)),  # 5,000 headers
        b"Authorization: Bearer tether_" + b"c" * 100_000 + b"\r\n",  # a token the size of a file
        b"X-Filler: " + b"d" * 8_000_000 + b"\r\n",  # 8 MB
    ):
        answer = _raw_request(plane, ordinary + huge + b"\r\n")
        status = answer.split(b"\r\n", 1)[0]
        # Refused before any handler runs: 431 with the reason, or the connection closed without an answer.
        assert status in (b"", b"HTTP/1.1 431 Request Header Fields Too Large"), status
        if status:
            assert b'"reason":"headers_too_large"' in answer
    # A token of an ordinary header's size but no real token's shape is refused for what it is.
    with agent_api(plane, "tether_" + "d" * 8_000) as api:
        refused = api.post("/agents/register", json=_register_body("attack-huge"))
        _problem(refused, 401, ("token_malformed", "token_unknown"))
    assert httpx.get(f"{plane.url}{health}", timeout=10).status_code == 200


@contextlib.contextmanager
def _slow_clients(plane: Plane, count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections that each sent the start of a request and then trickle it, never finishing."""
    port = int(plane.url.rsplit(":", 1)[1])
    opened: list[socket.socket] = []
    try:
        for i in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"POST /tether/v1/agents/register HTTP/1.1\r\nHost: x\r\nX-Slow-%d: " % i)
            opened.append(sock)
        yield opened
    finally:
        for sock in opened:
            sock.close()


def _open(sock: socket.socket) -> bool:
    """Whether the server still holds the connection open (nothing to read, and no end of file)."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


def test_slow_clients_holding_connections_do_not_keep_agents_from_work(
    plane: Plane, agents: Agents, capsys: pytest.CaptureFixture[str]
) -> None:
    agent = agents.start("attack-worker", queues="attackq", slots="2")
    waits: list[float] = []
    with _slow_clients(plane, SLOW_CLIENTS) as slow:
        run_id = trigger(plane, DAG)
        deadline = time.monotonic() + SLOW_FOR
        while time.monotonic() < deadline:
            for sock in slow:
                with contextlib.suppress(OSError):
                    sock.send(b"z")  # one more byte of a header that never ends
            began = time.monotonic()
            assert httpx.get(f"{plane.url}/tether/v1/health", timeout=10).status_code == 200
            waits.append(time.monotonic() - began)
            time.sleep(0.5)
        # The attack was real: the server still holds the slow connections open while it served the rest.
        still_open = sum(_open(sock) for sock in slow)
        assert still_open >= SLOW_CLIENTS * 0.9, still_open
        # And the agent went on working through it.
        assert plane.wait_for_run(DAG, run_id, timeout=90) == "success"
        (job,) = settled_jobs(plane, DAG, run_id)
        assert job["agent_name"] == agent.name
    waits.sort()
    with capsys.disabled():
        print(
            f"\n{SLOW_CLIENTS} slow clients for {SLOW_FOR:.0f} s: {still_open} held open; "
            f"health answered {len(waits)}/{len(waits)}, median {waits[len(waits) // 2] * 1000:.0f} ms, "
            f"slowest {waits[-1] * 1000:.0f} ms; the agent's task ran"
        )
