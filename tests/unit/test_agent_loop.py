"""The agent daemon's loop against a fake plane and a fake runner: no network, no processes."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from tests.unit.fake_plane import FakePlane
from tests.unit.scenarios import run, until
from tether.agent.agent import Agent
from tether.agent.client import PlaneClient, make_http_client
from tether.agent.settings import AgentSettings
from tether.agent.testing import FakeRunner


def _agent(plane: FakePlane, runner: FakeRunner, drain_timeout: float = 5) -> Agent:
    settings = AgentSettings(
        plane_url="http://plane.test",
        token="tether_0123456789_" + "a" * 43,
        name="unit",
        slots=2,
        health_port=0,
        max_backoff=timedelta(seconds=0.05),
        drain_timeout=timedelta(seconds=drain_timeout),
    )
    return Agent(
        settings=settings,
        client=PlaneClient(make_http_client(settings, plane.transport())),
        runner=runner,
        kill_grace=timedelta(seconds=0.2),
    )


def test_the_outcome_is_reported_from_the_exit_code() -> None:
    async def scenario() -> None:
        plane, runner = FakePlane(), FakeRunner()
        ok, bad = plane.add_job("ok"), plane.add_job("bad")
        agent = _agent(plane, runner)
        running = asyncio.create_task(agent.run())
        await until(lambda: len(runner.tasks) == 2)
        assert plane.started == [ok, bad]
        runner.tasks[0].finish(0)
        runner.tasks[1].finish(1)
        await until(lambda: len(plane.reports) == 2)
        assert sorted(plane.reports) == sorted([(ok, "success", 0), (bad, "failed", 1)])
        agent.stop()
        assert await running == 0

    run(scenario)


def test_nothing_runs_when_the_start_gate_refuses() -> None:
    async def scenario() -> None:
        plane, runner = FakePlane(refuse_start=True), FakeRunner()

        async def leased_and_a_few_heartbeats_later() -> None:
            beats = len(plane.heartbeats)
            await until(lambda: not plane.queued and len(plane.heartbeats) > beats + 2)

        plane.add_job()
        agent = _agent(plane, runner)
        running = asyncio.create_task(agent.run())
        await leased_and_a_few_heartbeats_later()
        assert runner.tasks == [] and plane.reports == []
        assert agent.free_slots == 2
        # The same wait, the gate open: the job leased runs.
        plane.refuse_start = False
        job = plane.add_job()
        await leased_and_a_few_heartbeats_later()
        assert len(runner.tasks) == 1 and plane.started == [job]
        runner.tasks[0].finish(0)
        await until(lambda: plane.reports == [(job, "success", 0)])
        agent.stop()
        await running

    run(scenario)


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "one-by-one"])
def test_one_lease_answer_passes_one_start_gate_and_only_confirmed_jobs_run(batched: bool) -> None:
    async def scenario() -> None:
        plane, runner = FakePlane(batched_start=batched), FakeRunner()
        ok, refused = plane.add_job("ok"), plane.add_job("refused")
        plane.refuse_jobs.add(refused)
        agent = _agent(plane, runner)
        running = asyncio.create_task(agent.run())
        await until(lambda: len(runner.tasks) == 1 and not agent.state.jobs.get(refused))
        # One call for both jobs; a plane without the batched start gets one call each, for good.
        assert plane.start_calls == ([[ok, refused]] if batched else [[ok], [refused]])
        assert plane.started == [ok]
        assert [t.workload["ti"]["task_id"] for t in runner.tasks] == ["ok"]
        assert agent.free_slots == 1
        plane.add_job("later")
        runner.tasks[0].finish(0)
        await until(lambda: len(runner.tasks) == 2)
        assert len(plane.start_calls) == (2 if batched else 3)
        runner.tasks[1].finish(0)
        await until(lambda: len(plane.reports) == 2)
        agent.stop()
        assert await running == 0

    run(scenario)


def test_slots_bound_what_is_leased() -> None:
    async def scenario() -> None:
        plane, runner = FakePlane(), FakeRunner()
        for _ in range(3):
            plane.add_job()
        agent = _agent(plane, runner)
        running = asyncio.create_task(agent.run())
        await until(lambda: len(runner.tasks) == 2)
        await asyncio.sleep(0.2)
        assert len(runner.tasks) == 2 and len(plane.queued) == 1
        runner.tasks[0].finish(0)
        # Within the same 0.2 s, the slot freed takes the job left in the queue.
        await until(lambda: len(runner.tasks) == 3, timeout=0.2)
        for task in runner.tasks:
            task.finish(0)
        agent.stop()
        await running

    run(scenario)


def test_an_outcome_waits_for_the_plane_to_come_back() -> None:
    async def scenario() -> None:
        plane, runner = FakePlane(), FakeRunner()
        first, job = plane.add_job(), plane.add_job()
        agent = _agent(plane, runner)
        running = asyncio.create_task(agent.run())
        await until(lambda: len(runner.tasks) == 2)
        # With the plane there, the same 0.3 s see an outcome reach it.
        runner.tasks[0].finish(0)
        await asyncio.sleep(0.3)
        assert plane.reports == [(first, "success", 0)]
        plane.down = True
        runner.tasks[1].finish(0)
        await asyncio.sleep(0.3)
        assert plane.reports == [(first, "success", 0)]
        await until(lambda: agent.ready()[0] is False)
        plane.down = False
        await until(lambda: plane.reports == [(first, "success", 0), (job, "success", 0)])
        await until(lambda: agent.ready()[0])
        agent.stop()
        await running

    run(scenario)


def test_a_kill_command_ends_the_task_and_reports_it_failed() -> None:
    async def scenario() -> None:
        plane, runner = FakePlane(), FakeRunner()
        job = plane.add_job()
        agent = _agent(plane, runner)
        running = asyncio.create_task(agent.run())
        await until(lambda: len(runner.tasks) == 1)
        plane.kill.add(job)
        await until(lambda: len(plane.reports) == 1)
        assert runner.tasks[0].killed
        assert plane.reports[0][:2] == (job, "failed")
        agent.stop()
        await running

    run(scenario)


def test_a_cordoned_agent_leases_nothing_until_uncordoned() -> None:
    async def scenario() -> None:
        plane, runner = FakePlane(cordoned=True), FakeRunner()
        agent = _agent(plane, runner)
        running = asyncio.create_task(agent.run())
        await until(lambda: len(plane.heartbeats) >= 2)
        plane.add_job()
        await asyncio.sleep(0.2)
        assert runner.tasks == []
        plane.cordoned = False
        # Within the same 0.2 s, the agent uncordoned takes the job.
        await until(lambda: len(runner.tasks) == 1, timeout=0.2)
        runner.tasks[0].finish(0)
        agent.stop()
        await running

    run(scenario)


def test_stop_drains_running_tasks_and_leases_nothing_more() -> None:
    async def scenario() -> None:
        plane, runner = FakePlane(), FakeRunner()
        job = plane.add_job()
        agent = _agent(plane, runner)
        running = asyncio.create_task(agent.run())
        await until(lambda: len(runner.tasks) == 1)
        # Before the stop, the same 0.2 s see a job queued taken by the slot still free.
        earlier = plane.add_job()
        await asyncio.sleep(0.2)
        assert len(runner.tasks) == 2
        runner.tasks[1].finish(0)
        await until(lambda: agent.free_slots == 1)
        agent.stop()
        plane.add_job()
        await asyncio.sleep(0.2)
        assert len(runner.tasks) == 2 and not runner.tasks[0].terminated
        await until(lambda: plane.heartbeats[-1]["draining"] is True)
        runner.tasks[0].finish(0)
        assert await running == 0
        assert plane.reports == [(earlier, "success", 0), (job, "success", 0)]
        assert len(plane.queued) == 1

    run(scenario)


@pytest.mark.parametrize("ignores_sigterm", [False, True])
def test_past_the_drain_timeout_tasks_are_terminated_then_killed_and_reported(ignores_sigterm: bool) -> None:
    async def scenario() -> None:
        plane, runner = FakePlane(), FakeRunner(ignore_sigterm=ignores_sigterm)
        job = plane.add_job()
        agent = _agent(plane, runner, drain_timeout=0.1)
        running = asyncio.create_task(agent.run())
        await until(lambda: len(runner.tasks) == 1)
        agent.stop()
        assert await running == 0
        task = runner.tasks[0]
        assert task.terminated and task.killed is ignores_sigterm
        assert plane.reports[0][:2] == (job, "failed")

    run(scenario)


def test_stop_before_run_and_twice_is_harmless() -> None:
    async def scenario() -> None:
        plane, runner = FakePlane(), FakeRunner()
        agent = _agent(plane, runner)
        agent.stop()
        agent.stop()
        assert await agent.run() == 0
        assert runner.tasks == []

    run(scenario)


def test_an_answer_that_is_not_the_protocols_is_retried_like_an_outage(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        plane, runner = FakePlane(garbled={"register"}), FakeRunner()
        agent = _agent(plane, runner)
        running = asyncio.create_task(agent.run())
        await until(lambda: "is not a RegisterResponse" in caplog.text)
        plane.garbled = {"heartbeat", "lease"}
        await until(lambda: agent.state.registration is not None)
        await until(lambda: caplog.text.count("is not a HeartbeatResponse") >= 2)
        assert not running.done()
        plane.garbled = set()
        job = plane.add_job()
        await until(lambda: len(runner.tasks) == 1)
        runner.tasks[0].finish(0)
        await until(lambda: plane.reports == [(job, "success", 0)])
        agent.stop()
        assert await running == 0

    with caplog.at_level("WARNING", logger="tether.agent"):
        run(scenario)
    assert "request_id=" in caplog.text


@pytest.mark.parametrize(
    "refusal",
    [
        # What a Tether 0.1 plane answers an agent that speaks a later revision.
        (422, {"detail": "this plane speaks protocol 1, the agent sent '2'", "reason": "protocol_mismatch"}),
        (400, {"detail": "this plane runs Tether 0.3.0 ...: upgrade the agent", "reason": "agent_too_old"}),
    ],
    ids=["older-plane", "newer-plane"],
)
def test_a_version_refusal_is_logged_once_and_asked_again_until_it_ends(
    refusal: tuple[int, dict[str, str]], caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        plane, runner = FakePlane(refuse_register=refusal), FakeRunner()
        agent = _agent(plane, runner)
        running = asyncio.create_task(agent.run())
        polls_at_start: list[int] = []
        runner.start = lambda: polls_at_start.append(len(plane.polls))  # type: ignore[method-assign]
        await until(lambda: plane.registrations >= 5)
        assert not running.done()
        refused = [r for r in caplog.records if "refuses this agent's registration" in r.getMessage()]
        assert len(refused) == 1 and refusal[1]["detail"] in refused[0].getMessage()
        # The task launcher is forked once the agent is registered, not while it is refused.
        assert polls_at_start == []
        plane.refuse_register = None  # the plane (or the agent) was upgraded
        await until(lambda: agent.state.registration is not None)
        assert "accepts this agent's calls again" in caplog.text
        await until(lambda: len(plane.polls) >= 1)
        assert polls_at_start == [0]  # once, before the first lease poll
        agent.stop()
        assert await running == 0

    with caplog.at_level("INFO", logger="tether.agent"):
        run(scenario)


def test_a_request_the_plane_finds_malformed_stops_the_agent() -> None:
    async def scenario() -> None:
        refusal = (422, {"detail": "invalid request: slots: too many", "reason": "invalid_request"})
        plane, runner = FakePlane(refuse_register=refusal), FakeRunner()
        assert await _agent(plane, runner).run() == 3
        assert plane.registrations == 1

    run(scenario)


# -- ADR 8: an idle agent's lease poll is its heartbeat ---------------------------------


def _idle_beats(window: float | None) -> tuple[int, list[dict[str, object]]]:
    """Heartbeats an idle agent sends while it makes 20 polls, and its polls, with ``window`` announced."""
    result: tuple[int, list[dict[str, object]]] = (0, [])

    async def scenario() -> None:
        nonlocal result
        plane, runner = FakePlane(poll_heartbeat_window=window), FakeRunner()
        agent = _agent(plane, runner)
        running = asyncio.create_task(agent.run())
        await until(lambda: len(plane.polls) >= 2)
        beats = len(plane.heartbeats)
        await until(lambda: len(plane.polls) >= 22)
        result = (len(plane.heartbeats) - beats, list(plane.polls))
        agent.stop()
        await running

    run(scenario)
    return result


def test_an_idle_agents_polls_stand_in_for_its_heartbeats_when_the_plane_says_so() -> None:
    # Polls come every 0.05 s (the fake answers at once and the agent paces them), heartbeats are due
    # every 0.05 s: over 20 polls, an agent whose plane counts only heartbeats sends about 20.
    without, polls = _idle_beats(None)
    assert without >= 10
    assert not any(poll["heartbeat"] for poll in polls)
    with_window, polls = _idle_beats(0.3)
    assert with_window <= 1
    assert all(poll["heartbeat"] for poll in polls)
    # A poll that is the heartbeat asks to be answered within the window.
    assert all(float(str(poll["wait"])) <= 0.3 for poll in polls)


def test_an_agent_holding_a_job_heartbeats_and_names_it_and_stops_when_idle_again() -> None:
    async def scenario() -> None:
        plane, runner = FakePlane(poll_heartbeat_window=0.3), FakeRunner()
        agent = _agent(plane, runner)
        running = asyncio.create_task(agent.run())
        await until(lambda: len(plane.polls) >= 5)
        job = plane.add_job()
        await until(lambda: len(runner.tasks) == 1)
        beats = len(plane.heartbeats)
        # The kill commands of a running job come with heartbeats: they go on while it runs.
        await until(lambda: sum(1 for b in plane.heartbeats[beats:] if job in b["running_jobs"]) >= 3)
        runner.tasks[0].finish(0)
        await until(lambda: plane.reports == [(job, "success", 0)])
        await until(lambda: not agent.state.jobs)
        # One heartbeat says the agent is idle again; its polls stand in from then on.
        await until(lambda: plane.heartbeats[-1]["running_jobs"] == [] and plane.heartbeats[-1]["free_slots"] == 2)
        polls = len(plane.polls)
        await until(lambda: len(plane.polls) >= polls + 3)
        beats = len(plane.heartbeats)
        await until(lambda: len(plane.polls) >= polls + 13)
        assert len(plane.heartbeats) - beats <= 1
        agent.stop()
        await running

    run(scenario)


def test_heartbeats_come_back_as_soon_as_polls_fail() -> None:
    async def scenario() -> None:
        plane, runner = FakePlane(poll_heartbeat_window=10.0), FakeRunner()
        agent = _agent(plane, runner)
        running = asyncio.create_task(agent.run())
        await until(lambda: len(plane.polls) >= 5)
        plane.unavailable = {"lease"}
        beats = len(plane.heartbeats)
        # Long before the window of the last poll answered lapses: the heartbeats go on as without polls.
        await until(lambda: len(plane.heartbeats) >= beats + 3, timeout=5.0)
        plane.unavailable = set()
        agent.stop()
        await running

    run(scenario)


def test_a_cordon_answered_to_a_poll_stops_the_polls_and_a_heartbeat_learns_the_uncordon() -> None:
    async def scenario() -> None:
        plane, runner = FakePlane(poll_heartbeat_window=0.3), FakeRunner()
        agent = _agent(plane, runner)
        running = asyncio.create_task(agent.run())
        await until(lambda: len(plane.polls) >= 5)
        plane.cordoned = True
        await until(lambda: agent.state.cordoned)
        polls, beats = len(plane.polls), len(plane.heartbeats)
        await until(lambda: len(plane.heartbeats) >= beats + 3)
        assert len(plane.polls) == polls
        plane.cordoned = False
        job = plane.add_job()
        await until(lambda: len(runner.tasks) == 1)
        assert plane.started == [job]
        runner.tasks[0].finish(0)
        agent.stop()
        await running

    run(scenario)


def test_the_calls_an_agent_makes_all_the_time_ask_for_answers_uncompressed() -> None:
    async def scenario() -> None:
        plane, runner = FakePlane(), FakeRunner()
        plane.add_job()
        agent = _agent(plane, runner)
        running = asyncio.create_task(agent.run())
        await until(lambda: len(runner.tasks) == 1)
        runner.tasks[0].finish(0)
        await until(lambda: len(plane.reports) == 1)
        agent.stop()
        await running
        calls = ("register", "heartbeat", "lease", "start", "report")
        assert {call: plane.accept_encoding[call] for call in calls} == dict.fromkeys(calls, "identity")
        # The client's own default, which other calls keep, accepts compressed answers.
        async with make_http_client(agent.settings, plane.transport()) as http:
            await http.get("/anything")
        assert "gzip" in plane.accept_encoding["anything"]

    run(scenario)
