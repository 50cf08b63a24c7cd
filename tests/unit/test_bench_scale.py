"""The scale test's pure parts: token rows, splitting the fleet, per-step figures, the dispatch ceiling, targets."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from bench import enqueue
from bench.loadgen import read_tokens
from bench.report_scale import ceiling_text, scale_target_rows
from bench.scale import (
    Plan,
    aggregate_step,
    api_server_times,
    dispatch_ceiling,
    merge_loadgens,
    split,
    step_passes,
    token_rows,
    write_tokens,
)

from tether.plane import tokens
from tether.plane.models import AgentToken


def test_token_rows_fill_every_column_and_hold_only_the_hash(tmp_path: Path) -> None:
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    rows, texts = token_rows(3, now)
    assert len(rows) == len(texts) == 3
    assert {c.name for c in AgentToken.__table__.columns} == set(rows[0])
    for row, text in zip(rows, texts, strict=True):
        assert tokens.parse_id(text) == row["id"]
        assert tokens.matches(text, row["secret_hash"])
        assert text not in row.values()
        assert row["scopes"] == ["worker"] and row["revoked_at"] is None and row["expires_at"] is None
    assert len({r["name"] for r in rows}) == 3 and len({r["id"] for r in rows}) == 3

    path = tmp_path / "tokens"
    write_tokens(texts, path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_tokens(path, 1, 2) == texts[1:]
    with pytest.raises(ValueError, match="not the 3"):
        read_tokens(path, 1, 3)


@pytest.mark.parametrize(
    ("agents", "procs", "expected"),
    [(5000, 2, [(0, 2500), (2500, 2500)]), (10, 3, [(0, 4), (4, 3), (7, 3)]), (2, 5, [(0, 1), (1, 1)])],
)
def test_split_covers_every_token_line_once(agents: int, procs: int, expected: list[tuple[int, int]]) -> None:
    assert split(agents, procs) == expected


def test_plan_chooses_one_generator_per_2500_agents_unless_told() -> None:
    assert [Plan().procs_for(n) for n in (100, 2500, 2501, 5000)] == [1, 1, 2, 2]
    assert Plan(loadgen_procs=3).procs_for(100) == 3


def test_enqueuer_spreads_a_step_evenly_and_stops_at_its_end() -> None:
    assert enqueue.due(10, 0.05, 20) == 0
    assert enqueue.due(10, 1.0, 20) == 10
    assert enqueue.due(10, 25.0, 20) == 200
    assert enqueue.due(0, 5.0, 20) == 0
    task = enqueue.workload("q", 2, 7)
    assert task.type == "ExecuteTask" and task.ti.queue == "q" and task.ti.run_id == "scale_step_02"


def _events(**extra: Any) -> dict[str, Any]:
    events: dict[str, Any] = {"heartbeat": [], "start": [], "report": [], "errors": [], "loop_lag": []}
    events.update(extra)
    return events


def _counters(api: float, xacts: float, sched: float = 0.0, gen: float = 0.0) -> dict[str, float]:
    return {"api_cpu": api, "xacts": xacts, "scheduler_cpu": sched, "loadgen_cpu": gen}


def test_aggregate_step_counts_what_happened_in_its_window() -> None:
    step = {"rate": 10.0, "start": 100.0, "end": 110.0, "backlog_max": 2}
    jobs = [
        (100.0 + i, 100.0 + i + 0.05, 100.0 + i + 0.6, "SUCCESS")
        for i in range(10)  # this step's, leased at once
    ]
    jobs.append((99.0, 99.1, 99.5, "SUCCESS"))  # the step before's, finished before this window
    jobs.append((109.9, None, None, "QUEUED"))  # never leased
    events = _events(
        heartbeat=[(101.0, 0.010), (105.0, 0.030), (111.0, 9.0)],
        errors=[(102.0, "heartbeat: 503"), (103.0, "heartbeat: 503"), (120.0, "lease: ReadTimeout")],
        loop_lag=[(101.0, 0.001), (102.0, 0.004)],
    )
    out = aggregate_step(step, jobs, events, (_counters(5.0, 1000), _counters(7.0, 1300, 1.0, 2.0)), 0.6)
    assert out["offered"] == 11 and out["offered_per_second"] == pytest.approx(1.1)
    assert out["completed"] == 10
    assert out["unleased"] == 1
    # One job of eleven never leased: the p99 is the unleased one, not a number.
    assert out["queued_to_leased_p99"] is None
    assert out["queued_to_leased_p50"] == pytest.approx(0.05)
    assert out["heartbeats"] == 2 and out["heartbeat_max"] == pytest.approx(0.030)
    assert out["errors"] == {"heartbeat: 503": 2}
    assert out["api_cpu_seconds"] == pytest.approx(2.0) and out["api_cpu_per_job"] == pytest.approx(0.2)
    assert out["db_xacts_per_job"] == pytest.approx(30.0)
    assert out["scheduler_cpu_cores"] == pytest.approx(0.1) and out["loadgen_cpu_cores"] == pytest.approx(0.2)
    assert out["passed"] is False


def _step(rate: float, p99: float | None, completed: int, offered: int | None = None) -> dict[str, Any]:
    offered = int(rate * 10) if offered is None else offered
    return {"rate": rate, "seconds": 10.0, "offered": offered, "completed": completed, "queued_to_leased_p99": p99}


def test_a_step_passes_only_if_dispatch_kept_up_with_what_was_really_offered() -> None:
    assert step_passes(_step(10, 0.2, 100))
    assert step_passes(_step(10, 0.2, 95))
    assert not step_passes(_step(10, 0.2, 94))  # under 95 % completed
    assert not step_passes(_step(10, 1.0, 100))  # p99 not under a second
    assert not step_passes(_step(10, None, 100))  # some job never leased
    assert not step_passes(_step(10, 0.2, 50, offered=50))  # the enqueuer fell behind: not offered
    assert not step_passes(_step(0, None, 0))  # the idle step is no dispatch


def test_dispatch_ceiling_is_the_highest_passing_step() -> None:
    steps = [_step(0, None, 0), _step(10, 0.1, 100), _step(25, 0.3, 250), _step(50, 2.0, 400), _step(100, 5.0, 500)]
    assert dispatch_ceiling(steps) == 25
    assert dispatch_ceiling(steps[:1]) is None
    assert dispatch_ceiling([_step(10, 3.0, 100), _step(25, 0.5, 250)]) == 25
    run = {"ceiling": 25.0, "steps": steps}
    assert ceiling_text(run) == "25 jobs/s"
    assert "highest step" in ceiling_text({"ceiling": 100.0, "steps": steps})
    assert "no step passed" in ceiling_text({"ceiling": None, "steps": steps})


def test_merge_loadgens_pools_events_and_adds_counts() -> None:
    part = {
        **_events(heartbeat=[(1.0, 0.1)], errors=[(1.0, "lease: 503")]),
        "agents": 2,
        "registered": 2,
        "ramp_seconds": 3.0,
        "leases_granted": 5,
        "jobs_run": 4,
        "refusals": {"lease_expired": 1},
        "heartbeat_interval": 10.0,
        "lease_wait": 20.0,
    }
    merged = merge_loadgens([part, {**part, "ramp_seconds": 4.0}])
    assert merged["agents"] == 4 and merged["jobs_run"] == 8 and merged["ramp_seconds"] == 4.0
    assert len(merged["heartbeat"]) == 2 and merged["refusals"] == {"lease_expired": 2}


def _run(agents: int, workers: int, p99: float, errors: dict[str, int], ceiling: float | None) -> dict[str, Any]:
    return {
        "agents": agents,
        "workers": workers,
        "heartbeat_p99": p99,
        "errors": errors,
        "ceiling": ceiling,
        "steps": [_step(0, None, 0), _step(100, 0.1, 1000), _step(400, 0.1, 4000)],
    }


def test_targets_say_not_measured_without_the_fleet_or_the_schedulers_ceiling() -> None:
    rows = scale_target_rows([_run(1000, 1, 0.1, {}, 100.0)], None)
    assert [(measured, met) for _, measured, met in rows] == [("not measured", False), ("not measured", False)]


def test_targets_judge_the_5000_agent_runs_and_every_ceiling() -> None:
    scale = [_run(5000, 1, 0.2, {}, 400.0), _run(5000, 2, 0.3, {}, 400.0), _run(100, 1, 0.01, {}, 100.0)]
    rows = scale_target_rows(scale, {"tasks_per_second": 40.0})
    heartbeat = [met for text, _, met in rows if "heartbeat" in text]
    assert heartbeat == [True, False]
    (ceiling,) = [(measured, met) for text, measured, met in rows if "dispatch ceiling" in text]
    assert "120.0 jobs/s needed" in ceiling[0] and ceiling[1] is False  # the 100-agent run reached 100 only
    errors = scale_target_rows([_run(5000, 1, 0.2, {"heartbeat: 503": 1}, 400.0)], {"tasks_per_second": 40.0})
    assert [met for _, _, met in errors] == [False, True]
    assert ceiling_text(scale[0]).startswith("≥ 400")


def test_the_fleet_target_needs_every_agent_registered_and_none_looking_silent() -> None:
    ceiling = {"tasks_per_second": 40.0}
    fine = {**_run(5000, 1, 0.1, {}, 400.0), "registered": 5000, "stalest_heartbeat": 19.5, "health_timeout": 30.0}
    assert [met for _, _, met in scale_target_rows([fine], ceiling)] == [True, True]
    short = {**fine, "registered": 4999}
    stale = {**fine, "stalest_heartbeat": 31.0}
    for run in (short, stale):
        (heartbeat, _) = scale_target_rows([run], ceiling)
        assert heartbeat[2] is False
    assert "4999 of 5000 registered" in scale_target_rows([short], ceiling)[0][1]
    assert "stalest heartbeat 31.0 s" in scale_target_rows([stale], ceiling)[0][1]


def test_merge_loadgens_pools_polls_and_the_heartbeats_they_stood_in_for() -> None:
    part = {
        **_events(),
        "agents": 1,
        "registered": 1,
        "ramp_seconds": 1.0,
        "leases_granted": 0,
        "jobs_run": 0,
        "polls": [1.0, 2.0],
        "beats_by_poll": [1.5],
        "poll_heartbeat_window": 20.0,
    }
    merged = merge_loadgens([part, part])
    assert merged["polls"] == [1.0, 2.0, 1.0, 2.0] and merged["beats_by_poll"] == [1.5, 1.5]
    assert merged["poll_heartbeat_window"] == 20.0


def test_runs_whose_agents_heartbeat_every_interval_are_shown_but_not_judged() -> None:
    ceiling = {"tasks_per_second": 40.0}
    shipped = {**_run(5000, 1, 0.1, {}, 400.0), "poll_heartbeats": True, "poll_heartbeat_window": 20.0}
    beats = {**_run(5000, 1, 9.0, {"heartbeat: ReadTimeout": 5}, None), "poll_heartbeats": False}
    rows = scale_target_rows([shipped, beats], ceiling)
    assert [met for _, _, met in rows] == [True, True]
    assert scale_target_rows([beats], ceiling)[0][1] == "not measured"


def test_heartbeats_time_in_the_api_server_is_read_from_airflows_access_log(tmp_path: Path) -> None:
    agent = "490f4b4a-0a42-4e6b-b418-b452a410f26e"
    log = tmp_path / "api-server.log"
    log.write_text(
        "2026-12-07T09:18:05.937410Z [info     ] request finished               [http.access] "
        f"client_addr=127.0.0.1:42460 duration_us=5965 loc=http_access_log.py:130 method=POST "
        f"path=/tether/v1/agents/{agent}/heartbeat query= request_id=da8b status_code=200\n"
        # Another call, and a line of Tether's own about a heartbeat: neither is counted.
        "2026-12-07T09:18:06.000000Z [info     ] request finished               [http.access] "
        f"client_addr=127.0.0.1:42460 duration_us=700 method=POST path=/tether/v1/agents/{agent}/lease "
        "query= status_code=200\n"
        f"2026-12-07T09:18:07.000000Z [debug    ] POST /tether/v1/agents/{agent}/heartbeat -> 200 in 5.3 ms "
        "[request_id=da8b] [tether.api]\n"
    )
    at = dt.datetime(2026, 12, 7, 9, 18, 5, 937410, tzinfo=dt.UTC).timestamp()
    assert api_server_times(log) == [(at, 0.005965)]
