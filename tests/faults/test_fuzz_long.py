"""The long fuzzing run (``-m long``; CI runs it as a step of its own): a real budget against a live plane.

Stateless: every operation of the published document, 200 generated requests per
operation and mode. Stateful: schemathesis walks the agent protocol by OpenAPI
links - register, then heartbeat and lease as that agent, start what it leased,
report and ship logs for what it started - with generated data everywhere the
links leave free, against jobs that real DAG runs queued. Nothing answers 5xx,
every successful answer matches its schema, and the plane's jobs end in states
the protocol allows.
"""

from __future__ import annotations

import collections
import contextlib
import copy
from typing import Any

import httpx
import hypothesis
import hypothesis.errors
import pytest
import schemathesis
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from tests.e2e.test_admin import Admin
from tests.faults.conftest import jobs, trigger
from tests.faults.test_bad_input import fuzz_every_operation
from tether.embedded import Plane, wait_until

pytestmark = [pytest.mark.long, pytest.mark.timeout(3000)]

EXAMPLES = 200
DAG = "faults_fuzz"
QUEUE = "fuzzq"
SCENARIOS = 200
#: Scenarios at most, when the first SCENARIOS did not walk all the way, and per run of the state machine.
MAX_SCENARIOS = 3 * SCENARIOS
CHUNK = 50
STEPS = 8
#: Operations the walk must have passed at least once.
WALKED = ("register", "heartbeat", "lease", "start", "report")
#: Runs of the state machine at most, each going on from the scenarios done before it.
ATTEMPTS = 200


def test_every_operation_with_a_real_budget(
    plane: Plane, admin: Admin, token: str, capsys: pytest.CaptureFixture[str]
) -> None:
    calls = fuzz_every_operation(plane, admin, token, EXAMPLES)
    with capsys.disabled():
        print(f"\nstateless: {calls} generated requests, up to {EXAMPLES} per operation and mode, no 5xx")


def _agent_protocol_with_links(raw: dict[str, Any]) -> dict[str, Any]:
    """The agent protocol's operations of the published document, with the links an agent follows."""
    spec = copy.deepcopy(raw)
    ops = {
        "register": ("/v1/agents/register", "post"),
        "heartbeat": ("/v1/agents/{agent_id}/heartbeat", "post"),
        "lease": ("/v1/agents/{agent_id}/lease", "post"),
        "start": ("/v1/agents/{agent_id}/jobs/{job_id}/start", "post"),
        "report": ("/v1/agents/{agent_id}/jobs/{job_id}/report", "post"),
        "logs": ("/v1/agents/{agent_id}/jobs/{job_id}/logs", "post"),
    }
    spec["paths"] = {path: {method: spec["paths"][path][method]} for path, method in ops.values()}
    # Every lease of the walk takes one job at most. A generated free_slots in the hundreds leased all 60
    # queued jobs to agents of a few early scenarios, which never started them: later scenarios found the
    # queue empty until the leases expired, and a started and reported job became a rare draw. The
    # stateless test sends the whole range.
    spec["components"]["schemas"]["LeaseRequest"]["properties"]["free_slots"]["maximum"] = 1
    op_id = {name: spec["paths"][path][method]["operationId"] for name, (path, method) in ops.items()}
    me = "$request.body#/incarnation"
    same_agent = "$request.path.agent_id"

    def link(target: str, parameters: dict[str, str], body: dict[str, Any]) -> dict[str, Any]:
        return {"operationId": op_id[target], "parameters": parameters, "requestBody": body}

    # Leases by the links take one job each, as every lease of the walk (above).
    links = {
        "register": {
            "Heartbeat": link("heartbeat", {"path.agent_id": "$response.body#/agent_id"}, {"incarnation": me}),
            "Lease": link(
                "lease",
                {"path.agent_id": "$response.body#/agent_id"},
                {"incarnation": me, "queues": [QUEUE], "wait": 0, "free_slots": 1},
            ),
        },
        "heartbeat": {
            "Lease": link(
                "lease",
                {"path.agent_id": same_agent},
                {"incarnation": me, "queues": [QUEUE], "wait": 0, "free_slots": 1},
            ),
        },
        "lease": {
            "Start": link(
                "start",
                {"path.agent_id": same_agent, "path.job_id": "$response.body#/leases/0/job_id"},
                {"incarnation": me},
            ),
        },
        "start": {
            # An outcome the job can take: the generated rest of the body still varies. Left to chance,
            # a valid state after one of the few started jobs came too rarely for every run to see one.
            "Report": link(
                "report",
                {"path.agent_id": same_agent, "path.job_id": "$request.path.job_id"},
                {"incarnation": me, "state": "success"},
            ),
            "Logs": link(
                "logs", {"path.agent_id": same_agent, "path.job_id": "$request.path.job_id"}, {"incarnation": me}
            ),
        },
    }
    for name, targets in links.items():
        path, method = ops[name]
        spec["paths"][path][method]["responses"]["200"]["links"] = targets
    return spec


def test_the_agent_protocol_walked_by_its_links(plane: Plane, token: str, capsys: pytest.CaptureFixture[str]) -> None:
    raw = httpx.get(f"{plane.url}/tether/v1/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(_agent_protocol_with_links(raw))
    schema.config.update(base_url=f"{plane.url}/tether")
    runs = [trigger(plane, DAG) for _ in range(3)]
    wait_until(
        lambda: sum(1 for run in runs for job in jobs(plane, DAG, run) if job["state"] == "QUEUED") == 60,
        120,
        "60 jobs queued",
    )
    answers: collections.Counter[tuple[str, int]] = collections.Counter()
    failures: list[str] = []
    headers = {"Authorization": f"Bearer {token}", "X-Tether-Protocol": "1"}

    scenarios = 0

    class AgentProtocol(schema.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"headers": headers, "timeout": 30}

        def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
            name = case.operation.path.rsplit("/", 1)[-1]
            answers[(name, response.status_code // 100 * 100)] += 1
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}")
            elif response.status_code < 300:
                case.validate_response(response, checks=[response_schema_conformance, content_type_conformance])

        def teardown(self) -> None:
            nonlocal scenarios
            scenarios += 1

    # The plane's answers feed the next steps, so the same choices can draw differently on another try:
    # Hypothesis then stops the run as flaky. As schemathesis's own runner does, go on with a new run.
    # Runs of CHUNK scenarios go on past SCENARIOS, up to MAX_SCENARIOS, until the walk has gone all the
    # way at least once: a start and a report that pass are rare draws, not every 200 scenarios hold one.
    def walked_all_the_way() -> bool:
        return all(answers[(name, 200)] for name in WALKED)

    for _ in range(ATTEMPTS):
        if failures or scenarios >= MAX_SCENARIOS or (scenarios >= SCENARIOS and walked_all_the_way()):
            break
        with contextlib.suppress(hypothesis.errors.Flaky):
            AgentProtocol.run(
                settings=hypothesis.settings(
                    max_examples=min(CHUNK, MAX_SCENARIOS - scenarios),
                    stateful_step_count=STEPS,
                    deadline=None,
                    database=None,
                    # Fresh draws in every chunk: Hypothesis's profile for CI (CI set) derandomizes,
                    # and each chunk would then walk the same scenarios again.
                    derandomize=False,
                    phases=[hypothesis.Phase.generate],
                    suppress_health_check=list(hypothesis.HealthCheck),
                )
            )
    assert not failures, "\n".join(failures[:20])
    assert scenarios >= SCENARIOS, f"only {scenarios} scenarios ran"
    # The walk was real: agents registered, leased the queued jobs, passed the start gate and reported.
    states = dict(plane.query("SELECT state, count(*) FROM tether_job WHERE queue = :q GROUP BY state", q=QUEUE))
    for name in WALKED:
        assert answers[(name, 200)] > 0, (name, scenarios, sorted(answers.items()), states)
    started = plane.query("SELECT count(*) FROM tether_job WHERE queue = :q AND started_at IS NOT NULL", q=QUEUE)[0][0]
    assert started > 0
    # Whatever the walk did, every job is in a state of the protocol, and times run forwards.
    rows = plane.query("SELECT state, started_at, finished_at FROM tether_job WHERE queue = :q", q=QUEUE)
    assert {row[0] for row in rows} <= {"QUEUED", "LEASED", "RUNNING", "SUCCESS", "FAILED", "REVOKED"}
    assert all(row[1] is None or row[2] is None or row[1] <= row[2] for row in rows)
    assert httpx.get(f"{plane.url}/tether/v1/health", timeout=10).status_code == 200
    with capsys.disabled():
        summary = ", ".join(f"{name} {status}: {count}" for (name, status), count in sorted(answers.items()))
        print(f"\nstateful: {scenarios} scenarios of up to {STEPS} steps; {started} jobs started; {summary}")
