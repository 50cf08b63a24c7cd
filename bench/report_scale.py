"""The scale test's part of the report: per run a table of its steps, the dispatch ceilings, the targets, a chart.

Everything said here is read from the runs themselves (``bench.scale``'s results).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.scale import COMPLETED_SHARE, LEASE_P99_LIMIT

MB = 1.048576  # MiB -> MB
#: The fleet the heartbeat target is about, and what it asks.
TARGET_AGENTS = 5000
HEARTBEAT_P99_TARGET = 0.25
#: How many times the scheduler's own ceiling the plane's dispatch must reach.
CEILING_FACTOR = 3.0


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else f"{value:{spec}}"


def _errors(errors: dict[str, int]) -> str:
    total = sum(errors.values())
    return f"{total} {json.dumps(errors)}" if total else "0"


def ceiling_text(run: dict[str, Any]) -> str:
    """The run's ceiling, saying when it is only a floor (its highest step passed) or when no step passed."""
    ceiling = run.get("ceiling")
    rates = [s["rate"] for s in run["steps"] if s["rate"] > 0]
    if ceiling is None:
        return f"below {min(rates):g} jobs/s (no step passed)" if rates else "not measured (no step with jobs)"
    if rates and ceiling >= max(rates):
        return f"≥ {ceiling:g} jobs/s (the highest step offered)"
    return f"{ceiling:g} jobs/s"


def scale_section(scale: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    add = lines.append
    if not scale:
        return lines
    add("## Scale test: simulated agents with work flowing")
    add("")
    first = scale[0]
    plan = first["plan"]
    counts = "; ".join(_label(r) for r in scale)
    add(
        f"Runs: {counts}. Each simulated agent has a worker token of its own (one token row per agent) and "
        f"talks HTTPS to the API server, verifying it against a CA made for the run. It registers with "
        f"{plan['slots']} slots, heartbeats every {_num(first.get('heartbeat_interval'), 'g')} s (the interval the "
        f"plane gave it) naming the jobs it runs, keeps one lease long-poll open for its free slots "
        f"(wait {_num(first.get('lease_wait'), 'g')} s), passes each lease through the start gate in one "
        f"start-many call, and reports success after a simulated task of {plan['task_min']:g}-{plan['task_max']:g} s "
        "(uniform). The plane runs the API server and the scheduler with Tether's executor (its sweeps on the "
        "same database); no DAG processor, no DAGs. A process of its own queues synthetic `ExecuteTask`-shaped "
        "jobs through Tether's `Store.enqueue` (the row and the NOTIFY), in one transaction per 20 ms tick, at "
        f"steps of {', '.join(f'{r:g}' for r in plan['rates'])} jobs/s, {plan['step_seconds']:g} s each, after "
        "every agent has registered and gone round once."
    )
    add("")
    window = first.get("poll_heartbeat_window")
    if window is not None:
        add(
            f"As `tether-agent` does (ADR 8), a simulated agent that holds no job and whose polls are answered "
            f"sends no heartbeat while its last poll is under {window:g} s old (the window the plane gave it): "
            "the poll is its heartbeat, stamped by the plane as it arrives, and polls ask for a wait no longer than "
            "the window. Heartbeats are then mostly those of agents running jobs. *Stood in* counts the heartbeats "
            "not sent for that reason; *stalest heartbeat* is the plane's own view of the fleet, sampled every "
            "second from the agent table: the oldest `last_heartbeat` of a registered agent, at its oldest over "
            "the steps (an agent counts as silent past the health timeout, "
            f"{_num(first.get('health_timeout'), 'g')} s)."
        )
        add("")
    add(
        "Per step: *offered* = jobs queued in the step; *completed* = jobs that finished as success in the step's "
        f"window shifted by the mean task time ({(plan['task_min'] + plan['task_max']) / 2:g} s); *queued→leased* "
        "is read from the job table (`leased_at - queued_at` of the jobs queued in the step; a job never leased "
        "counts as infinitely late). Heartbeat latency and errors are the simulated agents' own, from sending to "
        "the whole answer, for calls sent in the step; *in API server* is the time Airflow's access log "
        "recorded for the same heartbeats, from the request read to the answer sent. API CPU is the whole "
        "`airflow api-server` process tree (every uvicorn "
        "worker); DB transactions are `xact_commit + xact_rollback` of the run's database in `pg_stat_database`, "
        "everything on it (heartbeats, token look-ups, claims, the scheduler); both per completed job. The load "
        "generator shares the machine with the plane and PostgreSQL: its event-loop lag p99 is in every latency "
        "it measures, and its CPU is shown. *Machine busy cores* is the whole machine's busy CPU time over the "
        f"step (the run recorded {first.get('cpus') or 'an unknown number of'} CPUs), whatever ran on it: what the "
        "plane, the generators and PostgreSQL do not account for was used by other processes."
    )
    add("")
    add(
        f"**Dispatch ceiling**: the highest step whose queued→leased p99 < {LEASE_P99_LIMIT:g} s and that completed "
        f"≥ {COMPLETED_SHARE:.0%} of what it offered (and offered ≥ {COMPLETED_SHARE:.0%} of its rate: the enqueuer "
        "kept up)."
    )
    add("")
    add(
        "| agents | `[api] workers` | polls stand in | load generators | registered | ramp | dispatch ceiling "
        "| heartbeat p99 / max, all steps | errors, all steps | heartbeats sent / stood in by polls / polls, all steps "
        "| stalest heartbeat | API RSS peak | DB connections peak |"
    )
    add("|---" * 13 + "|")
    for run in scale:
        add(
            f"| {run['agents']} | {run['workers']} | {'yes' if _polls_stand_in(run) else 'no'} "
            f"| {run['loadgen_procs']} | {run['registered']} "
            f"| {run['ramp_seconds']:.0f} s | {ceiling_text(run)} "
            f"| {_ms(run['heartbeat_p99'])} / {_ms(run['heartbeat_max'])} ms | {_errors(run['errors'])} "
            f"| {run['heartbeats']} / {run.get('beats_by_poll', 0)} / {run.get('polls', 0)} "
            f"| {_num(run.get('stalest_heartbeat'), '.1f')} s "
            f"| {run['api_rss_peak'] * MB:.0f} MB | {run['db_connections_peak']} |"
        )
    add("")
    for run in scale:
        add(f"### {_label(run)}")
        add("")
        add(
            "| step jobs/s | offered/s | completed/s | queued→leased p50 / p99 (ms) | not leased | heartbeats "
            "| heartbeat p50 / p99 / max (ms) | in API server p99 (ms) | start-many p99 / report p99 (ms) | errors "
            "| API CPU cores | API CPU ms/job | DB tx/job | scheduler CPU cores | generator CPU cores "
            "| machine busy cores | generator lag p99 (ms) | passed |"
        )
        add("|---" * 18 + "|")
        for s in run["steps"]:
            add(
                f"| {s['rate']:g} | {s['offered_per_second']:.1f} | {s['completed_per_second']:.1f} "
                f"| {_ms(s['queued_to_leased_p50'])} / {_ms(s['queued_to_leased_p99'])} | {s['unleased']} "
                f"| {s['heartbeats']} | {_ms(s['heartbeat_p50'])} / {_ms(s['heartbeat_p99'])} / "
                f"{_ms(s['heartbeat_max'])} | {_ms(s['handler_heartbeat_p99'])} "
                f"| {_ms(s['start_p99'])} / {_ms(s['report_p99'])} | {_errors(s['errors'])} "
                f"| {s['api_cpu_cores']:.2f} | {_ms(s['api_cpu_per_job'])} | {_num(s['db_xacts_per_job'], '.1f')} "
                f"| {s['scheduler_cpu_cores']:.2f} | {s['loadgen_cpu_cores']:.2f} "
                f"| {_num(s.get('machine_cpu_cores'), '.2f')} "
                f"| {_ms(s['loadgen_loop_lag_p99'])} | {'yes' if s['passed'] else 'no'} |"
            )
        refusals = run.get("refusals") or {}
        add("")
        add(
            f"Jobs queued {run['jobs_queued']}, leased to simulated agents {run['leases_granted']}, reported "
            f"success {run['jobs_run']}; start-gate refusals: {json.dumps(refusals) if refusals else 'none'}."
        )
        add("")
    return lines


def _polls_stand_in(run: dict[str, Any]) -> bool:
    """Whether the run's simulated agents let polls stand in for idle heartbeats (runs before ADR 8 did not)."""
    return bool(run.get("poll_heartbeats", False)) and run.get("poll_heartbeat_window") is not None


def _label(run: dict[str, Any]) -> str:
    polls = "" if _polls_stand_in(run) else ", heartbeats every interval"
    return f"{run['agents']} agents, `[api] workers` {run['workers']}{polls}"


def _pooled_heartbeat(run: dict[str, Any]) -> tuple[float | None, int]:
    return run["heartbeat_p99"], sum(run["errors"].values())


def _fleet_live(run: dict[str, Any]) -> tuple[str, bool]:
    """Every agent registered and, where the plane's view was sampled, none of them ever looked silent."""
    registered = run.get("registered", run["agents"])
    stalest, timeout = run.get("stalest_heartbeat"), run.get("health_timeout")
    text = f"{registered} of {run['agents']} registered"
    live = registered == run["agents"]
    if stalest is not None and timeout is not None:
        text += f", stalest heartbeat {stalest:.1f} s (silent past {timeout:g} s)"
        live = live and stalest < timeout
    return text, live


def scale_target_rows(
    scale: list[dict[str, Any]], scheduler_ceiling: dict[str, Any] | None
) -> list[tuple[str, str, bool]]:
    """The scale targets as (text, measured, met); a target with nothing measured says so and is not met."""
    rows = []
    label = (
        f"{TARGET_AGENTS:,} agents: heartbeat p99 ≤ {HEARTBEAT_P99_TARGET * 1000:.0f} ms and zero errors, every agent "
        "registered and none looking silent"
    )
    # Tether as it ships: runs whose agents heartbeat every interval are the comparison, not the product.
    shipped = [r for r in scale if r.get("poll_heartbeats", True)]
    big = [r for r in shipped if r["agents"] >= TARGET_AGENTS]
    if not big:
        rows.append((label, "not measured", False))
    for run in big:
        p99, errors = _pooled_heartbeat(run)
        fleet, live = _fleet_live(run)
        rows.append(
            (
                f"{label} (`[api] workers` {run['workers']}, every step)",
                f"p99 {_ms(p99)} ms, {errors} errors, {fleet}",
                p99 is not None and p99 <= HEARTBEAT_P99_TARGET and errors == 0 and live,
            )
        )
    label = f"dispatch ceiling ≥ {CEILING_FACTOR:g}x the scheduler's own ceiling"
    theirs = (scheduler_ceiling or {}).get("tasks_per_second")
    ceilings = [(r, r.get("ceiling")) for r in shipped]
    if theirs is None or not ceilings:
        rows.append((label, "not measured", False))
    else:
        listed = "; ".join(f"{r['agents']} agents, {r['workers']} worker(s): {ceiling_text(r)}" for r, _ in ceilings)
        rows.append(
            (
                label,
                f"scheduler {float(theirs):.1f} tasks/s, so ≥ {CEILING_FACTOR * float(theirs):.1f} jobs/s needed; "
                + listed,
                all(c is not None and c >= CEILING_FACTOR * float(theirs) for _, c in ceilings),
            )
        )
    return rows


def scale_chart(out: Path, scale: list[dict[str, Any]]) -> str | None:
    """Queued→leased p99 and heartbeat p99 against the offered rate, one line per run; the file's name."""
    runs = [r for r in scale if any(s["rate"] > 0 for s in r["steps"])]
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run in runs:
        steps = [s for s in run["steps"] if s["rate"] > 0]
        label = f"{run['agents']} agents, {run['workers']} worker(s)" + ("" if _polls_stand_in(run) else ", beats")
        left.plot(
            [s["rate"] for s in steps],
            [(s["queued_to_leased_p99"] or float("nan")) * 1000 for s in steps],
            marker="o",
            label=label,
        )
        right.plot(
            [s["rate"] for s in run["steps"]],
            [(s["heartbeat_p99"] or float("nan")) * 1000 for s in run["steps"]],
            marker="o",
            label=label,
        )
    left.axhline(LEASE_P99_LIMIT * 1000, color="grey", linestyle="--", label="ceiling limit")
    right.axhline(HEARTBEAT_P99_TARGET * 1000, color="grey", linestyle="--", label="target p99")
    for ax, title in ((left, "queued→leased p99"), (right, "heartbeat p99")):
        ax.set_xscale("symlog", linthresh=10)
        ax.set_yscale("log")
        ax.set_xlabel("offered jobs/s (step)")
        ax.set_ylabel("ms")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "scale.png", dpi=110)
    plt.close(fig)
    return "scale.png"
