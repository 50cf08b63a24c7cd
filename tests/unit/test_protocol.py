"""The wire format: strict in what the plane accepts, tolerant in what the agent reads back (ADR 5)."""

from __future__ import annotations

import uuid

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

from tether import protocol


def test_an_answer_with_fields_this_agent_does_not_know_is_read() -> None:
    answer = protocol.HeartbeatResponse.model_validate_json(
        '{"status": "HEALTHY", "cordoned": false, "heartbeat_interval": 10, "commands": [],'
        ' "next_thing": {"a": 1}, "drain_by": "2027-01-01T00:00:00Z"}'
    )
    assert answer == protocol.HeartbeatResponse(
        status=protocol.AgentStatus.HEALTHY, cordoned=False, heartbeat_interval=10
    )


def test_nested_answers_and_unknown_commands_are_read_too() -> None:
    job_id = uuid.uuid4()
    answer = protocol.HeartbeatResponse.model_validate(
        {
            "status": "HEALTHY",
            "cordoned": True,
            "heartbeat_interval": 10,
            "commands": [
                {"kind": "kill", "job_id": str(job_id), "reason": "revoked", "grace": 5},
                {"kind": "rotate-token", "after": 30},
            ],
        }
    )
    assert answer.commands == [protocol.KillJob(job_id=job_id, reason="revoked")]


def test_a_request_with_a_field_the_plane_does_not_know_is_refused() -> None:
    with pytest.raises(ValidationError, match="surprise"):
        protocol.StartRequest.model_validate({"incarnation": str(uuid.uuid4()), "surprise": 1})


def test_an_answer_written_for_an_older_revision_leaves_out_later_fields() -> None:
    health = protocol.Health(version="0.2.0", protocol=1)
    assert protocol.written_for(health, 1) == {"status": "ok", "protocol": 1, "version": "0.2.0"}
    assert protocol.written_for(health, 2) == {**health.model_dump(mode="json")}
    assert "oldest_protocol" in protocol.written_for(health, 2)


class _Revision1Health(BaseModel):
    """The health answer as Tether 0.1's agent reads it: its fields, and no other."""

    model_config = ConfigDict(extra="forbid")
    status: str
    protocol: int
    version: str


def test_a_strict_reader_of_the_older_revision_accepts_what_is_written_for_it() -> None:
    health = protocol.Health(version="0.2.0", protocol=1)
    with pytest.raises(ValidationError, match="oldest_protocol"):
        _Revision1Health.model_validate(health.model_dump(mode="json"))
    assert _Revision1Health.model_validate(protocol.written_for(health, 1)).protocol == 1


@pytest.mark.parametrize(("text", "revision"), [("2", 2), (" 1 ", 1), ("", None), ("two", None), (None, None)])
def test_the_revision_header_is_read_strictly(text: str | None, revision: int | None) -> None:
    assert protocol.parse_revision(text) == revision


def test_a_nul_a_task_printed_reaches_the_plane_as_the_replacement_character() -> None:
    batch = protocol.LogBatch.model_validate(
        {"incarnation": str(uuid.uuid4()), "segment": str(uuid.uuid4()), "seq": 0, "lines": ["a\x00b", "plain"]}
    )
    assert batch.lines == ["a\ufffdb", "plain"]


def test_a_counter_past_the_databases_integer_is_refused() -> None:
    batch = {"incarnation": str(uuid.uuid4()), "segment": str(uuid.uuid4()), "lines": ["x"]}
    assert protocol.LogBatch.model_validate({**batch, "seq": 2**31 - 1}).seq == 2**31 - 1
    with pytest.raises(ValidationError):
        protocol.LogBatch.model_validate({**batch, "seq": 2**31})


def test_a_version_longer_than_the_plane_stores_is_refused() -> None:
    body = {
        "name": "a",
        "incarnation": str(uuid.uuid4()),
        "airflow_version": "3.3.2",
        "python_version": "3.11",
        "hostname": "h",
        "queues": ["default"],
        "slots": 1,
    }
    longest = "v" * protocol.MAX_VERSION_LENGTH
    assert protocol.RegisterRequest.model_validate({**body, "tether_version": longest}).tether_version == longest
    with pytest.raises(ValidationError):
        protocol.RegisterRequest.model_validate({**body, "tether_version": longest + "v"})
