"""DESIGN §6.8: malformed, oversized or hostile requests get a clear 4xx with a reason, and change nothing.

Every operation of the published OpenAPI document is fuzzed with schemathesis
against the live API server: with invalid data everywhere, and with valid data
where it can only name things that do not exist (read-only calls and calls on
an id). Then a few hostile requests are sent by hand.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode

from tests.e2e.test_admin import Admin
from tests.faults.conftest import agent_api, jobs, trigger
from tether.embedded import Plane, wait_until

pytestmark = pytest.mark.timeout(420)

TABLES = (
    "tether_agent",
    "tether_agent_token",
    "tether_job",
    "tether_allowed_ip_range",
    "tether_audit_log",
    "tether_triggerer",
    "tether_trigger_outcome",
    "tether_trigger_run",
)
EXAMPLES = 12


def _snapshot(plane: Plane) -> dict[str, list[tuple[Any, ...]]]:
    snapshot = {table: sorted(map(tuple, plane.query(f"SELECT * FROM {table}")), key=repr) for table in TABLES}
    # When a token was last used is bookkeeping for people, written when a request authenticates.
    snapshot["tether_agent_token"] = sorted(
        map(tuple, plane.query("SELECT id, name, secret_hash, expires_at, revoked_at FROM tether_agent_token")),
        key=repr,
    )
    return snapshot


def _positive_is_harmless(method: str, path: str) -> bool:
    """Valid data may be sent where it can only read, or act on an id that will not exist."""
    return method == "GET" or ("{" in path and path != "/v1/agents/register")


def _fuzz(
    operation: Any,
    mode: GenerationMode,
    base_url: str,
    headers: dict[str, str],
    errors: list[str],
    examples: int = EXAMPLES,
) -> int:
    """Send ``examples`` generated requests for one operation; note every 5xx; return how many were sent."""
    sent = 0

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    def probe(case: Any) -> None:
        nonlocal sent
        sent += 1
        response = case.call(base_url=base_url, headers=headers, timeout=30)
        if response.status_code >= 500:
            errors.append(f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:200]}")

    probe()
    return sent


def fuzz_every_operation(plane: Plane, admin: Admin, token: str, examples: int) -> int:
    """Fuzz every operation of the published document; fail on any 5xx or change; return the calls sent."""
    schema = schemathesis.openapi.from_url(f"{plane.url}/tether/v1/openapi.json")
    agent_auth = {"Authorization": f"Bearer {token}", "X-Tether-Protocol": "1"}
    admin_auth = {"Authorization": str(admin.http.headers["Authorization"])}
    before = _snapshot(plane)
    server_errors: list[str] = []
    calls = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        headers = admin_auth if "admin" in (operation.tags or []) else agent_auth
        modes = [GenerationMode.NEGATIVE]
        if _positive_is_harmless(operation.method.upper(), operation.path):
            modes.append(GenerationMode.POSITIVE)
        for mode in modes:
            try:
                calls += _fuzz(operation, mode, f"{plane.url}/tether", headers, server_errors, examples)
            except Unsatisfiable:
                continue  # nothing to make invalid: the operation takes no input
    assert calls >= 20 * examples
    assert not server_errors, "\n".join(server_errors[:20])
    assert _snapshot(plane) == before
    return calls


def test_fuzzing_every_endpoint_yields_no_5xx_and_changes_nothing(plane: Plane, admin: Admin, token: str) -> None:
    fuzz_every_operation(plane, admin, token, EXAMPLES)


def _problem(response: httpx.Response, status: int, reason: str | tuple[str, ...]) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["reason"] in ((reason,) if isinstance(reason, str) else reason), body
    assert isinstance(body["detail"], str) and body["detail"]
    return str(body["detail"])


def _register_body(name: str, **overrides: Any) -> dict[str, Any]:
    return {
        "name": name,
        "incarnation": str(uuid.uuid4()),
        "tether_version": "0",
        "airflow_version": "3",
        "python_version": "3",
        "hostname": "h",
        "queues": ["badq"],
        "slots": 1,
        **overrides,
    }


def test_hostile_requests_get_a_clear_4xx_with_a_reason(plane: Plane, admin: Admin, token: str) -> None:
    before = _snapshot(plane)
    with agent_api(plane, token) as api:
        register = "/agents/register"
        assert "65536" in _problem(api.post(register, content=b"{" + b" " * 70_000 + b"}"), 413, "body_too_large")
        chunked = api.post(register, content=iter([b'{"name": "', b"x" * 70_000, b'"}']))
        _problem(chunked, 413, "body_too_large")
        for bad in ("garbage", "tether_", token[:-6], token + "x", token.replace("_", "-"), "tether_\u00e9\u00e9_x"):
            refused = httpx.post(
                f"{plane.url}/tether/v1{register}",
                json=_register_body("bad-token"),
                headers={"Authorization": f"Bearer {bad}".encode(), "X-Tether-Protocol": b"1"},
                timeout=10,
            )
            _problem(refused, 401, ("token_malformed", "token_unknown"))
        assert "name" in _problem(api.post(register, json=_register_body("agënt-ü")), 422, "invalid_request")
        assert "name" in _problem(api.post(register, json=_register_body("n" * 10_240)), 422, "invalid_request")
        assert "slots" in _problem(api.post(register, json=_register_body("neg", slots=-1)), 422, "invalid_request")
        assert "queues" in _problem(
            api.post(register, json=_register_body("q", queues=["a b"])), 422, "invalid_request"
        )
        _problem(
            api.post(register, content=b'{"name": "trunc', headers={"Content-Type": "application/json"}),
            422,
            "invalid_request",
        )
    _problem(admin.http.post("/tokens", json={"name": "t" * 10_240}), 422, "invalid_request")
    _problem(admin.http.post("/tokens", json={"name": "tökén"}), 422, "invalid_request")
    _problem(admin.http.put("/allowed-ip-ranges", json={"ranges": ["300.1.2.3/8"]}), 422, "invalid_cidr")
    _problem(
        httpx.get(f"{plane.url}/tether/v1/tokens", headers={"Authorization": "Bearer x.y.z"}), 401, "not_authenticated"
    )
    assert _snapshot(plane) == before

    # A report for a job another agent holds is refused, and the job is untouched.
    run_id = trigger(plane, "faults_bad_input")
    wait_until(lambda: [j["state"] for j in jobs(plane, "faults_bad_input", run_id)] == ["QUEUED"], 60, "job queued")
    with agent_api(plane, token) as api:
        owner, other = (_register_body(name) for name in ("bad-owner", "bad-other"))
        owner_id = api.post("/agents/register", json=owner).json()["agent_id"]
        other_id = api.post("/agents/register", json=other).json()["agent_id"]
        leases = api.post(
            f"/agents/{owner_id}/lease",
            json={"incarnation": owner["incarnation"], "free_slots": 1, "queues": ["badq"], "wait": 0},
        ).json()["leases"]
        assert len(leases) == 1
        job = leases[0]["job_id"]
        assert api.post(f"/agents/{owner_id}/jobs/{job}/start", json={"incarnation": owner["incarnation"]}).is_success
        stolen = api.post(
            f"/agents/{other_id}/jobs/{job}/report", json={"incarnation": other["incarnation"], "state": "success"}
        )
        _problem(stolen, 409, "not_holder")
        hijack = api.post(f"/agents/{other_id}/jobs/{job}/start", json={"incarnation": other["incarnation"]})
        _problem(hijack, 409, "not_holder")
        impostor = api.post(f"/agents/{owner_id}/heartbeat", json={"incarnation": str(uuid.uuid4()), "free_slots": 1})
        _problem(impostor, 409, "superseded")
        assert [(j["state"], j["agent_name"]) for j in jobs(plane, "faults_bad_input", run_id)] == [
            ("RUNNING", "bad-owner")
        ]
        # The holder settles it; a second, different outcome is refused as final.
        done = api.post(
            f"/agents/{owner_id}/jobs/{job}/report",
            json={"incarnation": owner["incarnation"], "state": "failed", "exit_code": 1, "reason": "test"},
        )
        assert done.is_success, done.text
        again = api.post(
            f"/agents/{owner_id}/jobs/{job}/report", json={"incarnation": owner["incarnation"], "state": "success"}
        )
        _problem(again, 409, "job_final")
    assert plane.wait_for_run("faults_bad_input", run_id, timeout=60) == "failed"


def test_triggerer_calls_out_of_role_or_out_of_turn_are_refused_and_change_nothing(plane: Plane, token: str) -> None:
    tables = ("tether_triggerer", "tether_trigger_outcome", "tether_trigger_run", "trigger", "task_instance")

    def state() -> dict[str, list[tuple[Any, ...]]]:
        return {t: sorted(map(tuple, plane.query(f"SELECT * FROM {t}")), key=repr) for t in tables}

    both = plane.create_token("bad-trig-both", scopes=("worker", "triggerer"))
    with agent_api(plane, token) as api:
        # A worker token may not run triggers.
        refused_scope = api.post("/agents/register", json=_register_body("bad-trig-scope", roles=["triggerer"]))
        _problem(refused_scope, 403, "scope_missing")
    with agent_api(plane, both) as api:
        worker = _register_body("bad-trig-worker")
        worker_id = api.post("/agents/register", json=worker).json()["agent_id"]
        trig = _register_body("bad-trig", roles=["triggerer"], queues=["default"])
        registered = api.post("/agents/register", json=trig)
        assert registered.is_success, registered.text
        trig_id = registered.json()["agent_id"]
        base = f"/agents/{trig_id}/triggerer"
        me = {"incarnation": trig["incarnation"]}
        # The positive control: the triggerer's own load is served, and makes its Airflow triggerer job.
        loaded = api.post(f"{base}/load", json={**me, "capacity": 10})
        assert loaded.is_success, loaded.text
        assert loaded.json()["trigger_ids"] == []
        before = state()
        refused = api.post(
            f"/agents/{worker_id}/triggerer/load", json={"incarnation": worker["incarnation"], "capacity": 10}
        )
        _problem(refused, 403, "role_not_registered")
        impostor = api.post(f"{base}/load", json={"incarnation": str(uuid.uuid4()), "capacity": 10})
        _problem(impostor, 409, "superseded")
        _problem(api.post(f"{base}/load", json={**me, "capacity": 0}), 422, "invalid_request")
        _problem(api.post(f"{base}/workloads", json={**me, "trigger_ids": []}), 422, "invalid_request")
        assert api.post(f"{base}/workloads", json={**me, "trigger_ids": [2**31 - 1]}).json() == {"workloads": []}
        outcome = {"outcome_id": str(uuid.uuid4()), "trigger_id": 1}
        bad_kind = api.post(f"{base}/outcomes", json={**me, "events": [{**outcome, "kind": "boom"}]})
        _problem(bad_kind, 422, "invalid_request")
        _problem(
            api.post(f"{base}/outcomes", json={**me, "failures": [{**outcome, "error": ["x" * 20_000]}]}),
            422,
            "invalid_request",
        )
        logged = api.post(
            f"{base}/triggers/1/logs", json={**me, "segment": str(uuid.uuid4()), "seq": 0, "lines": ["x"]}
        )
        assert logged.json() == {"stop": True, "reason": "the trigger is not this agent process's"}
        assert state() == before
        # Stopping ends its Airflow job and forgets it.
        assert api.post(f"{base}/release", json=me).status_code == 204
    assert (
        plane.query(
            "SELECT count(*) FROM tether_triggerer r JOIN tether_agent a ON a.id = r.agent_id WHERE a.name = 'bad-trig'"
        )[0][0]
        == 0
    )
