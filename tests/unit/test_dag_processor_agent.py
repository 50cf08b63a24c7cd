"""The dag-processor role's side of parse results, against a fake plane: what is sent, when, and again."""

from __future__ import annotations

import asyncio
import gzip
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from tether.agent.client import PlaneClient
from tether.agent.dag_processor import TetherDagProcessorManager
from tether.agent.health import AgentMetrics


@dataclass
class ResultsPlane:
    """The results route of a plane: records what it got, answers as told."""

    answers: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    received: list[dict[str, Any]] = field(default_factory=list)
    down: bool = False

    def handle(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("refused", request=request)
        body = json.loads(gzip.decompress(request.content))
        self.received.append(body)
        status, answer = self.answers.pop(0) if self.answers else (200, {})
        return httpx.Response(status, json=answer)


class Bridge:
    """The agent's side, reduced to what the manager uses: ids and calls run to completion."""

    def __init__(self, plane: ResultsPlane) -> None:
        self.incarnation = uuid.uuid4()
        self.agent_id = uuid.uuid4()
        http = httpx.AsyncClient(base_url="http://plane.test/tether/v1", transport=httpx.MockTransport(plane.handle))
        self.client = PlaneClient(http)

    def call(self, call: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        async def run() -> Any:
            return await call(*args)

        return asyncio.run(run())


def _dag(dag_id: str, version: str = "1") -> Any:
    return SimpleNamespace(dag_id=dag_id, hash=f"{dag_id}{version}".encode().hex()[:32].ljust(32, "0"),
                           data={"dag": {"dag_id": dag_id, "v": version}}, last_loaded=None)  # fmt: skip


def _parsed(*dags: Any, errors: dict[str, str] | None = None) -> Any:
    return SimpleNamespace(fileloc="/dags/a.py", serialized_dags=list(dags), import_errors=errors, warnings=None)


@pytest.fixture
def plane() -> ResultsPlane:
    return ResultsPlane()


@pytest.fixture
def manager(plane: ResultsPlane) -> TetherDagProcessorManager:
    return TetherDagProcessorManager(max_runs=1, plane=Bridge(plane), metrics=AgentMetrics())  # type: ignore[arg-type]


def _persist(manager: TetherDagProcessorManager, parsed: Any) -> None:
    manager.persist_parsing_result(
        bundle_name="b",
        bundle_version=None,
        version_data=None,
        parsing_result=parsed,
        run_duration=0.1,
        relative_fileloc="a.py",
    )


def _sent_data(body: dict[str, Any]) -> dict[str, bool]:
    return {dag["dag_id"]: dag["data"] is not None for dag in body["dags"]}


def test_an_unchanged_result_is_not_sent_again(manager: TetherDagProcessorManager, plane: ResultsPlane) -> None:
    _persist(manager, _parsed(_dag("x")))
    _persist(manager, _parsed(_dag("x")))
    assert len(plane.received) == 1
    _persist(manager, _parsed(_dag("x"), errors={"a.py": "Traceback"}))
    assert len(plane.received) == 2


def test_a_dag_the_plane_has_goes_as_its_hash_unless_the_plane_asks(
    manager: TetherDagProcessorManager, plane: ResultsPlane
) -> None:
    _persist(manager, _parsed(_dag("x"), _dag("y")))
    plane.answers = [(200, {"resend": ["x"]})]
    _persist(manager, _parsed(_dag("x"), _dag("y", "2")))
    assert [_sent_data(body) for body in plane.received] == [
        {"x": True, "y": True},
        {"x": False, "y": True},
        {"x": True, "y": True},
    ]


def test_what_the_plane_could_not_take_waits_and_goes_again(
    manager: TetherDagProcessorManager, plane: ResultsPlane
) -> None:
    plane.down = True
    _persist(manager, _parsed(_dag("x")))
    assert plane.received == []
    plane.down = False
    manager.retry_unsent()
    assert [body["seq"] for body in plane.received] == [1]
    manager.retry_unsent()  # nothing waits any more
    _persist(manager, _parsed(_dag("x")))  # and the plane has it
    assert len(plane.received) == 1


def test_a_refused_result_is_not_offered_again_until_it_changes(
    manager: TetherDagProcessorManager, plane: ResultsPlane
) -> None:
    plane.answers = [(409, {"detail": "'x' belongs to bundle 'a'", "reason": "dag_id_owned"})]
    _persist(manager, _parsed(_dag("x")))
    _persist(manager, _parsed(_dag("x")))
    assert len(plane.received) == 1
    _persist(manager, _parsed(_dag("x", "2")))
    assert len(plane.received) == 2


def test_a_result_the_plane_writes_later_is_sent_again(manager: TetherDagProcessorManager, plane: ResultsPlane) -> None:
    plane.answers = [(200, {"deferred": ["x"]})]
    _persist(manager, _parsed(_dag("x")))
    _persist(manager, _parsed(_dag("x")))
    assert [_sent_data(body) for body in plane.received] == [{"x": True}, {"x": True}]
    _persist(manager, _parsed(_dag("x")))
    assert len(plane.received) == 2


def test_a_result_over_the_planes_limit_is_not_sent(manager: TetherDagProcessorManager, plane: ResultsPlane) -> None:
    manager._max_result_bytes = 100
    _persist(manager, _parsed(_dag("x")))
    assert plane.received == []
