"""The report: Markdown tables, PNG charts and the targets, from the measurements of one run.

``python -m bench.report <folder>`` writes it again from the folder's ``results.json``.
Ratios to the LocalExecutor are taken pair by pair (run i of X over run i of
Local, measured minutes apart) and then summarised, so that the machine's
drift over the run cancels out as far as possible.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from bench.dag_processing import NAMES as PROCESSOR_NAMES
from bench.dag_processing import PROCESSORS
from bench.deploy import DAG_IDS, EDGE_PACKAGES, EXECUTORS, VARIANTS
from bench.measure import COMPONENTS
from bench.report_scale import scale_chart, scale_section, scale_target_rows
from bench.stats import percentile
from bench.task_logs import log_section
from bench.triggers import NAMES as TRIGGERER_NAMES
from bench.triggers import SIDES as TRIGGERER_SIDES

MB = 1.048576  # MiB -> MB: the targets are in MB.
NAMES = {name: variant.label for name, variant in VARIANTS.items()}


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _fmt(value: float | None, spec: str = ".2f", unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def _spread(values: Sequence[float], spec: str = ".2f", unit: str = "") -> str:
    if not values:
        return "-"
    mid = statistics.median(values)
    if len(values) == 1:
        return f"{mid:{spec}}{unit}"
    return f"{mid:{spec}}{unit} ({min(values):{spec}}-{max(values):{spec}})"


class Results:
    def __init__(self, runs: list[dict[str, Any]]) -> None:
        self.runs = runs
        self.executors = [e for e in EXECUTORS if any(r["executor"] == e for r in runs)]

    def of(self, executor: str) -> list[dict[str, Any]]:
        return sorted((r for r in self.runs if r["executor"] == executor), key=lambda r: r["run"])

    def values(self, executor: str, pick: Callable[[dict[str, Any]], float | None]) -> list[float]:
        return [v for r in self.of(executor) if (v := pick(r)) is not None]

    def ratios(self, executor: str, pick: Callable[[dict[str, Any]], float | None], base: str = "local") -> list[float]:
        baseline = {r["run"]: pick(r) for r in self.of(base)}
        out = []
        for r in self.of(executor):
            mine, theirs = pick(r), baseline.get(r["run"])
            if mine is not None and theirs:
                out.append(mine / theirs)
        return out


def wall(dag: str) -> Callable[[dict[str, Any]], float | None]:
    return lambda r: r["dags"][dag]["wall"] if dag in r["dags"] else None


def latency_pct(dag: str, q: float) -> Callable[[dict[str, Any]], float | None]:
    return lambda r: percentile(r["dags"][dag]["latencies"], q) if dag in r["dags"] else None


def memory_run(r: dict[str, Any]) -> dict[str, Any] | None:
    """The sampled fanout_100 run; in results written before it existed, the timed one was sampled."""
    run: dict[str, Any] | None = r.get("memory") or r["dags"].get("fanout_100")
    return run


def peak_pss_mb(r: dict[str, Any]) -> float | None:
    mem = memory_run(r)
    return float(mem["peak_pss"]) * MB if mem and mem.get("peak_pss") is not None else None


def peak_running(r: dict[str, Any]) -> float | None:
    mem = memory_run(r)
    return float(mem["peak_running"]) if mem else None


def per_task_mb(r: dict[str, Any]) -> float | None:
    peak, running = peak_pss_mb(r), peak_running(r)
    if peak is None or not running:
        return None
    return (peak - float(r["idle"]["worker_pss"]) * MB) / running


def _timed_fanout(r: dict[str, Any]) -> dict[str, Any] | None:
    """The timed fanout_100 run of a deployment, if it measured the machine's CPU."""
    run: dict[str, Any] | None = r["dags"].get("fanout_100")
    if not run or run.get("machine_cpu") is None or not run["tasks"] or not run.get("cpus") or run["wall"] <= 0:
        return None
    return run


def fanout_cpu_per_task_ms(r: dict[str, Any]) -> float | None:
    run = _timed_fanout(r)
    return None if run is None else float(run["machine_cpu"]) / int(run["tasks"]) * 1000


def fanout_component_ms(component: str) -> Callable[[dict[str, Any]], float | None]:
    """CPU per timed fanout_100 task of one component (``rest``: the machine's CPU no component accounts for)."""

    def pick(r: dict[str, Any]) -> float | None:
        run = _timed_fanout(r)
        parts = (run or {}).get("component_cpu") or {}
        if run is None or not parts:
            return None
        if component == "rest":
            return (float(run["machine_cpu"]) - float(sum(parts.values()))) / int(run["tasks"]) * 1000
        return float(parts[component]) / int(run["tasks"]) * 1000 if component in parts else None

    return pick


def fanout_busy_pct(r: dict[str, Any]) -> float | None:
    run = _timed_fanout(r)
    return None if run is None else 100 * float(run["machine_cpu"]) / (float(run["wall"]) * int(run["cpus"]))


def pooled_latencies(res: Results, executor: str, dag: str) -> list[float]:
    return [x for r in res.of(executor) if dag in r["dags"] for x in r["dags"][dag]["latencies"]]


def charts(out: Path, res: Results, scale: list[dict[str, Any]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    colors = {
        "local": "#4c72b0",
        "tether": "#55a868",
        "tether-nice0": "#8fd19e",
        "tether-cold": "#2d6a3e",
        "edge": "#c44e52",
        "edge-poll1": "#e8a0a2",
    }

    def bars(name: str, title: str, ylabel: str, pick: Callable[[str, str], list[float]]) -> None:
        fig, ax = plt.subplots(figsize=(8, 4.2))
        width = 0.8 / max(len(res.executors), 1)
        for i, executor in enumerate(res.executors):
            mids, lows, highs = [], [], []
            for dag in DAG_IDS:
                values = pick(executor, dag) or [0.0]
                mid = statistics.median(values)
                mids.append(mid)
                lows.append(mid - min(values))
                highs.append(max(values) - mid)
            xs = [d + i * width for d in range(len(DAG_IDS))]
            ax.bar(xs, mids, width, yerr=[lows, highs], capsize=3, label=NAMES[executor], color=colors[executor])
        ax.set_xticks([d + width * (len(res.executors) - 1) / 2 for d in range(len(DAG_IDS))], DAG_IDS)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append(name)

    if res.executors:
        bars("wall.png", "Trigger → DAG run success (median, min-max)", "seconds", lambda e, d: res.values(e, wall(d)))
        bars(
            "latency.png",
            "Queued → start, p50 per run (median, min-max)",
            "seconds",
            lambda e, d: res.values(e, latency_pct(d, 0.5)),
        )
        fig, ax = plt.subplots(figsize=(8, 4.2))
        for executor in res.executors:
            for r in res.of(executor):
                samples = (memory_run(r) or {}).get("pss_samples") or []
                if samples:
                    ax.plot(
                        [t for t, _ in samples],
                        [p * MB for _, p in samples],
                        color=colors[executor],
                        alpha=0.8,
                        label=NAMES[executor] if r["run"] == 1 else None,
                    )
        ax.set_xlabel("seconds since trigger")
        ax.set_ylabel("PSS of the task-running tree, MB")
        ax.set_title("Memory during fanout_100")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "memory.png", dpi=110)
        plt.close(fig)
        made.append("memory.png")
    if scale and (chart := scale_chart(out, scale)):
        made.append(chart)
    return made


def _machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    with_suppress = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        load = os.getloadavg()
        with_suppress = f", load average at report time {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}"
    except OSError:
        pass
    mem = psutil.virtual_memory().total / 2**30
    return f"{psutil.cpu_count()} CPUs ({cpu}), {mem:.0f} GiB RAM{with_suppress}"


def _git() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def render(
    res: Results,
    scale: list[dict[str, Any]],
    options: dict[str, Any],
    elapsed: float | None,
    processing: list[dict[str, Any]] | None = None,
    triggers: dict[str, list[dict[str, Any]]] | None = None,
    task_logs: list[dict[str, Any]] | None = None,
    scheduler_ceiling: dict[str, Any] | None = None,
) -> str:
    lines: list[str] = []
    add = lines.append
    runs = max((r["run"] for r in res.runs), default=0)
    add(f"# Tether benchmark — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    add("")
    intro = (
        f"Commit `{_git()}`, Airflow 3.3.2, Python {platform.python_version()}, PostgreSQL on loopback; {_machine()}"
    )
    if res.executors:
        intro += (
            f". {runs} run(s) per executor, alternating ({', '.join(NAMES[e] for e in res.executors)}), "
            "each on a fresh database copied from a migrated template"
        )
    add(intro + (f"; whole run {elapsed / 60:.1f} min." if elapsed else "."))
    add("")
    if res.executors:
        add(
            "Every row gets the same plane (API server, scheduler, DAG processor; `[core] parallelism` 16, "
            "scheduler heartbeat 1 s) and the same DAGs; only what runs the tasks differs. Figures are median "
            "(min-max) over runs; ratios are taken run by run against the LocalExecutor run of the same round. "
            "What each row ran with, as read from its deployments:"
        )
        add("")
        add("| row | runs tasks with | settings |")
        add("|---|---|---|")
        for e in res.executors:
            add(f"| {NAMES[e]} | {_runner(e)} | {_settings(res, e)} |")
        add("")
    targets = target_rows(res, scale, scheduler_ceiling)
    if targets:
        add("## Targets")
        add("")
        add("| target | measured | met |")
        add("|---|---|---|")
        for name, measured, met in targets:
            add(f"| {name} | {measured} | {'yes' if met else '**no**'} |")
        add("")
    if res.executors:
        add("## DAG wall time, trigger → DAG run success (s)")
        add("")
        header = "| DAG | " + " | ".join(NAMES[e] for e in res.executors)
        header += "".join(f" | {NAMES[e]} ÷ Local" for e in res.executors if e != "local") + " |"
        add(header)
        add("|---" * (1 + len(res.executors) + sum(e != "local" for e in res.executors)) + "|")
        for dag in DAG_IDS:
            row = [dag] + [_spread(res.values(e, wall(dag))) for e in res.executors]
            row += [_spread(res.ratios(e, wall(dag)), unit="x") for e in res.executors if e != "local"]
            add("| " + " | ".join(row) + " |")
        add("")
        add("## Queued → start per task (s): p50 / p90 over every task of every run")
        add("")
        add("| DAG | " + " | ".join(NAMES[e] for e in res.executors) + " |")
        add("|---" * (1 + len(res.executors)) + "|")
        for dag in DAG_IDS:
            cells = []
            for e in res.executors:
                pooled = pooled_latencies(res, e, dag)
                cells.append(f"{_fmt(percentile(pooled, 0.5), '.3f')} / {_fmt(percentile(pooled, 0.9), '.3f')}")
            add(f"| {dag} | " + " | ".join(cells) + " |")
        add("")
        add("## Throughput and memory")
        add("")
        add("| | " + " | ".join(NAMES[e] for e in res.executors) + " |")
        add("|---" * (1 + len(res.executors)) + "|")
        rows: list[tuple[str, Callable[[dict[str, Any]], float | None], str]] = [
            (
                "fanout_100 tasks/s",
                lambda r: 100 / r["dags"]["fanout_100"]["wall"] if "fanout_100" in r["dags"] else None,
                ".2f",
            ),
            ("task-running tree, idle PSS (MB)", lambda r: r["idle"]["worker_pss"] * MB, ".0f"),
            ("processes in that tree, idle", lambda r: r["idle"]["worker_processes"], ".0f"),
            ("peak PSS during fanout_100 (MB)", peak_pss_mb, ".0f"),
            ("peak concurrent running tasks", peak_running, ".0f"),
            ("memory per running task (MB)", per_task_mb, ".1f"),
            ("whole-machine CPU per fanout_100 task (ms)", fanout_cpu_per_task_ms, ".0f"),
            *((f"  of which {part} (ms)", fanout_component_ms(part), ".0f") for part in (*COMPONENTS, "rest")),
            ("CPUs busy during fanout_100 (%)", fanout_busy_pct, ".0f"),
        ]
        for label, pick, spec in rows:
            add(f"| {label} | " + " | ".join(_spread(res.values(e, pick), spec) for e in res.executors) + " |")
        add("")
        add(
            "The task-running tree is the agent or worker process and its children; for the LocalExecutor it is "
            "the scheduler's children (its 16 executor workers, `serve-logs` and their tasks), without the "
            "scheduler itself. "
            "Memory per running task = (peak - idle PSS) ÷ peak concurrent running tasks. "
            "Memory comes from a run of its own: each deployment first runs fanout_100 once with the tree's PSS "
            "sampled every 0.5 s. That run is not timed, because the sampler takes CPU from what it observes, and "
            "it warms every executor's plane alike (a fresh API server answers its first task calls slowly). "
            "The timed runs that follow are not sampled. "
            "Whole-machine CPU is what every process (plane, database, workers, tasks) used from the return of "
            "the trigger command to the end of the timed fanout_100 run, read from `/proc/stat`, and by component from "
            "each process tree's CPU times over the same span: workers is the task-running tree above, the "
            "scheduler is counted without its children, postgres is the whole database server, rest is what no "
            "component accounts for (the benchmark's own polling, the system, and processes no parent waited for, "
            "whose CPU no tree's children times keep); CPUs busy is "
            "that CPU time over the run's wall time and the machine's CPUs. Below 100 % the run also waited on "
            "something other than the CPU, such as the scheduler, which sleeps up to "
            "`scheduler_idle_sleep_time` (1 s) after a loop that found nothing to do while the tasks it queued "
            "last run to their end."
        )
        add("")
        window = res.runs[0]["idle"]["window"] if res.runs else 0
        add(f"## Idle costs ({window:.0f} s windows, per minute)")
        add("")
        add("| | " + " | ".join(NAMES[e] for e in res.executors) + " |")
        add("|---" * (1 + len(res.executors)) + "|")
        idle_rows: list[tuple[str, Callable[[dict[str, Any]], float | None], str]] = [
            ("API server CPU s/min, plane alone", lambda r: r["idle"]["api_cpu_no_worker"] * 60 / window, ".2f"),
            ("API server CPU s/min, worker idle", lambda r: r["idle"]["api_cpu"] * 60 / window, ".2f"),
            (
                "agent / worker CPU s/min, idle",
                lambda r: None if r["idle"]["worker_cpu"] is None else r["idle"]["worker_cpu"] * 60 / window,
                ".2f",
            ),
            ("DB transactions/s, plane alone", lambda r: r["idle"]["xacts_no_worker"], ".1f"),
            ("DB transactions/s, worker idle", lambda r: r["idle"]["xacts"], ".1f"),
            ("DB transactions/s added by the idle worker", lambda r: r["idle"]["xacts_per_agent"], ".2f"),
        ]
        for label, pick, spec in idle_rows:
            add(f"| {label} | " + " | ".join(_spread(res.values(e, pick), spec) for e in res.executors) + " |")
        add("")
        add(
            "DB transactions are `xact_commit + xact_rollback` of the deployment's own database in "
            "`pg_stat_database` (pg_stat_statements is not loaded). The LocalExecutor has no separate worker: "
            "its 'worker idle' window is a second window of the same plane, a measure of the noise. The "
            "scale test below gives a cleaner per-agent figure."
        )
        add("")
    lines.extend(warm_start_section(res))
    lines.extend(ceiling_section(scheduler_ceiling))
    lines.extend(processing_section(processing))
    lines.extend(triggers_section(triggers))
    lines.extend(log_section(task_logs))
    lines.extend(scale_section(scale))
    return "\n".join(lines)


def _of(runs: list[dict[str, Any]], processor: str) -> list[dict[str, Any]]:
    return sorted((r for r in runs if r["processor"] == processor), key=lambda r: r["run"])


def _tether_over_airflow(runs: list[dict[str, Any]], pick: Callable[[dict[str, Any]], float | None]) -> list[float]:
    """Tether's figure over Airflow's, run by run (measured minutes apart)."""
    airflow = {r["run"]: pick(r) for r in _of(runs, "airflow")}
    out = []
    for r in _of(runs, "tether"):
        mine, base = pick(r), airflow.get(r["run"])
        if mine is not None and base:
            out.append(mine / base)
    return out


def _change_pct(q: float) -> Callable[[dict[str, Any]], float | None]:
    return lambda r: percentile(r["change_latencies"], q)


def _setting(variable: str, value: str) -> str:
    """``AIRFLOW__CORE__X`` = 0 as ``[core] x`` 0."""
    _, section, key = variable.split("__", 2)
    return f"`[{section.lower()}] {key.lower()}` {value}"


def processing_section(runs: list[dict[str, Any]] | None) -> list[str]:
    """The DAG-processing comparison: a table, Tether's uploads, and what was set and ran."""
    if not runs:
        return []
    lines = ["## DAG processing: Tether's dag-processor agent and Airflow's dag-processor", ""]
    lines.append("| | files | throughput (files/s) | change → version p50 / p95 (s) | Tether ÷ Airflow |")
    lines.append("|---|---|---|---|---|")
    for processor in PROCESSORS:
        mine = _of(runs, processor)
        if not mine:
            continue
        pooled = [x for r in mine for x in r["change_latencies"]]
        ratio = "-"
        if processor == "tether":
            ratio = (
                f"throughput {_spread(_tether_over_airflow(runs, lambda r: r['files_per_second']), unit='x')}, "
                f"p50 {_spread(_tether_over_airflow(runs, _change_pct(0.5)), unit='x')}, "
                f"p95 {_spread(_tether_over_airflow(runs, _change_pct(0.95)), unit='x')}"
            )
        lines.append(
            f"| {PROCESSOR_NAMES[processor]} | {mine[0]['files']} "
            f"| {_spread([r['files_per_second'] for r in mine])} "
            f"| {_fmt(percentile(pooled, 0.5))} / {_fmt(percentile(pooled, 0.95))} | {ratio} |"
        )
    lines.append("")
    tether = [r for r in _of(runs, "tether") if r.get("first_parse_bytes") is not None]
    if tether:
        lines.append("| | first parse of every file | per parse loop after it |")
        lines.append("|---|---|---|")
        per_loop = [r["after_bytes"] / r["after_loops"] / 1024 for r in tether if r["after_loops"]]
        loops = [r["after_loops"] for r in tether]
        sent = [r["after_files_sent"] for r in tether]
        lines.append(
            "| Tether's agent: results sent to the plane, compressed "
            f"| {_spread([r['first_parse_bytes'] / 1024 for r in tether], '.0f', ' KiB')} "
            f"| {_spread(per_loop, '.1f', ' KiB')} (over {_spread(loops, '.1f')} loops that sent "
            f"{_spread(sent, '.0f')} changed files) |"
        )
        lines.append("")
    first = runs[0]
    logged = {
        PROCESSOR_NAMES[p]: ", ".join(f"{k} {v}" for k, v in r["logged"].items())
        for p in PROCESSORS
        for r in _of(runs, p)[:1]
    }
    said = (
        f"both logged {next(iter(logged.values()))}"
        if len(set(logged.values())) == 1
        else "; ".join(f"{name} logged {text or 'nothing'}" for name, text in logged.items())
    )
    versions = ", ".join(f"{dist} {v}" for dist, v in first["versions"].items())
    changes = len(first["change_latencies"])
    interval = first["settings"].get("AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL", "?")
    lines.append(
        f"{versions}. {max(r['run'] for r in runs)} run(s) of each processor, alternating, each on a fresh database "
        f"copied from a migrated template, its plane an API server alone; {first['files']} generated files of one "
        "DAG each (one or two tasks). Set on both sides: "
        + ", ".join(_setting(k, v) for k, v in first["settings"].items())
        + f" (seconds); `[dag_processor] parsing_processes` left at Airflow's default ({said}). Throughput: files "
        "÷ time from the processor process's start to the `created_at` of the last serialized DAG. Change → "
        f"version: {changes} changes per run (a new description), each a random 0-{interval} s after the last "
        "one's new version, timed from the file's replacement to the `created_at` of its DAG's new `dag_version` "
        "row; p50 / p95 pooled over runs (nearest rank), ratios run by run. Each changed DAG had one queued run "
        "first, since Airflow rewrites in place a version that no task instance uses."
    )
    lines.append("")
    return lines


def _pair(values: Sequence[float]) -> str:
    return f"{_fmt(percentile(values, 0.5))} / {_fmt(percentile(values, 0.9))}"


def _ratio(mine: float | None, base: float | None, spec: str = ".2f") -> str:
    return "-" if mine is None or not base else f"{mine / base:{spec}}x"


def triggers_section(data: dict[str, list[dict[str, Any]]] | None) -> list[str]:
    """The triggerer comparison: latency from a trigger's moment to the resumed try, and the triggerer's memory."""
    if not data or not (data.get("latency") or data.get("waiting")):
        return []
    latency, waiting = data.get("latency", []), data.get("waiting", [])
    lines = ["## Triggers: Tether's triggerer agent and Airflow's triggerer", ""]
    held = waiting[0]["triggers"] if waiting else 0
    lines.append(
        "| triggerer | tasks timed | moment → resumed try p50 / p90 (s) | moment → event in DB p50 / p90 (s) "
        "| event → resumed try p50 / p90 (s) | tree idle, RSS / PSS (MiB) "
        f"| tree holding {held} waiting triggers, RSS / PSS (MiB) | processes |"
    )
    lines.append("|---" * 8 + "|")
    pooled: dict[str, dict[str, list[float]]] = {}
    memory: dict[str, dict[str, Any]] = {}
    for side in TRIGGERER_SIDES:
        mine = [r for r in latency if r["side"] == side]
        held_by = next((w for w in waiting if w["side"] == side), None)
        if not mine and held_by is None:
            continue
        pooled[side] = {key: [x for r in mine for x in r[key]] for key in ("latencies", "to_event", "event_to_start")}
        timed = sum(len(r["latencies"]) for r in mine)
        asked = sum(r["tasks"] for r in mine)
        idle = [r["idle"] for r in mine]
        idle_cell = (
            f"{_fmt(_median([i['rss'] for i in idle]), '.0f')} / {_fmt(_median([i['pss'] for i in idle]), '.0f')}"
            if idle
            else "-"
        )
        held_cell = processes = "-"
        if held_by is not None:
            memory[side] = held_by["memory"]
            held_cell = f"{held_by['memory']['rss']:.0f} / {held_by['memory']['pss']:.0f}"
            processes = str(held_by["memory"]["processes"])
        lines.append(
            f"| {TRIGGERER_NAMES[side]} | {timed} of {asked} | {_pair(pooled[side]['latencies'])} "
            f"| {_pair(pooled[side]['to_event'])} | {_pair(pooled[side]['event_to_start'])} "
            f"| {idle_cell} | {held_cell} | {processes} |"
        )
    if "tether" in pooled and "airflow" in pooled:
        cells = []
        for key in ("latencies", "to_event", "event_to_start"):
            ours, base = pooled["tether"][key], pooled["airflow"][key]
            cells.append(
                f"{_ratio(percentile(ours, 0.5), percentile(base, 0.5))} / "
                f"{_ratio(percentile(ours, 0.9), percentile(base, 0.9))}"
            )
        mem = "-"
        if "tether" in memory and "airflow" in memory:
            mem = (
                f"{_ratio(memory['tether']['rss'], memory['airflow']['rss'])} / "
                f"{_ratio(memory['tether']['pss'], memory['airflow']['pss'])}"
            )
        lines.append(f"| Tether ÷ Airflow | | {' | '.join(cells)} | | {mem} | |")
    lines.append("")
    notes = []
    first = (latency or [{}])[0]
    if latency:
        spacing = first["settings"].get("spacing", "?")
        versions = ", ".join(f"{dist} {v}" for dist, v in first["versions"].items())
        runs = max(r["run"] for r in latency)
        excluded = sum(r["excluded"] for r in latency)
        notes.append(
            f"{versions}. Both rows ran on the same plane (API server, scheduler, DAG processor, Tether's executor; "
            f"`[core] parallelism` 16, scheduler heartbeat 1 s) with the same worker, {first['settings']['worker']}; "
            "only the triggerer differs. Tether's row: the plane runs no `airflow triggerer`; one "
            "`tether-agent triggerer` runs the triggers. Airflow's row: the plane runs `airflow triggerer`. "
            f"Both at their defaults, `[triggerer] capacity` {first['settings']['capacity']}. {runs} run(s) of each, "
            "alternating, each on a fresh database copied from a migrated template."
        )
        notes.append(
            "Latency: each task of `bench/dags_triggers/deferred_wait.py` defers on Airflow's `DateTimeTrigger`, "
            f"the moments {spacing} s apart and the first set so that every task has deferred before it. Fired = "
            "the trigger's moment; resumed try = the time the resumed try's code began (its resume method reads "
            "the clock first and returns it as XCom). The split is at the task instance's `scheduled_dttm`, which "
            "Airflow's `Trigger.submit_event` sets as it writes the event, on both sides: before it, the "
            "triggerer's share (including `DateTimeTrigger` itself, which checks the time once a second in its last "
            "seconds, so up to 1 s); after it, the scheduler's, the executor's and the worker's, the same processes "
            "on both sides. p50 / p90 pooled over runs, nearest rank."
            + (f" {excluded} task(s) deferred less than 3 s before their moment and are left out." if excluded else "")
        )
    if latency or waiting:
        airflow = memory.get("airflow", {})
        server = ""
        if airflow.get("log_server_rss") is not None:
            server = (
                f" Airflow's tree includes its trigger log server (a child serving `[logging] "
                f"trigger_log_server_port`): {airflow['log_server_rss']:.0f} MiB RSS / "
                f"{airflow['log_server_pss']:.0f} MiB PSS of it; Tether's agent ships trigger logs to the plane "
                "instead."
            )
        notes.append(
            "Memory: the triggerer's process tree, the agent (or `airflow triggerer`) and every process under it, "
            "chiefly the trigger runner it forks; RSS counts pages shared between them once per process, PSS "
            "divides them; the median of samples a second apart. Idle: before the latency run, no triggers. "
            + (
                f"Holding: {held} tasks of `deferred_wait` deferred for an hour in one deployment; Tether's agent "
                "held their triggers first (the tasks deferred while it ran), then stopped, which hands its "
                "triggers back at once, and `airflow triggerer` took them all; each read "
                "after its job held every trigger (and Tether's agent reported running them) and a pause."
                if waiting
                else ""
            )
            + server
        )
    for note in notes:
        lines.append(note)
        lines.append("")
    return lines


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _start_p50s(res: Results, executor: str) -> dict[str, float | None]:
    return {dag: percentile(pooled_latencies(res, executor, dag), 0.5) for dag in DAG_IDS}


def _listing(p50s: dict[str, float | None]) -> str:
    return ", ".join(f"{dag} {_fmt(v, '.3f')} s" for dag, v in p50s.items())


#: The Edge worker's idle PSS in the report before this one, for runs without an Edge row.
EDGE_IDLE_PSS_MB = 131.0


def _runner(variant: str) -> str:
    executor = VARIANTS[variant].executor
    if executor == "local":
        return "the scheduler's LocalExecutor workers"
    if executor == "tether":
        return "one `tether-agent run` (product defaults: heartbeat 10 s, long-poll 20 s)"
    return "one `airflow edge worker --concurrency 16` (" + ", ".join(p for p in EDGE_PACKAGES if "edge3" in p) + ")"


def _settings(res: Results, variant: str) -> str:
    """The settings the runs of a row recorded, each with every value seen."""
    seen: dict[str, list[str]] = {}
    for r in res.of(variant):
        for key, value in (r.get("settings") or {}).items():
            if value not in seen.setdefault(key, []):
                seen[key].append(value)
    if not seen:
        return "`[core] parallelism` 16" if VARIANTS[variant].executor == "local" else "not recorded"
    return ", ".join(f"`{key}` {' / '.join(values)}" for key, values in seen.items())


def warm_start_section(res: Results) -> list[str]:
    """What the warm start buys: Tether with it (the default) against Tether without, run by run."""
    if "tether" not in res.executors or "tether-cold" not in res.executors:
        return []
    lines = ["## What the warm start buys", ""]
    lines.append("| | warm start on | warm start off | off ÷ on, run by run |")
    lines.append("|---|---|---|---|")
    picks: list[tuple[str, Callable[[dict[str, Any]], float | None], str]] = [
        *((f"{dag} wall (s)", wall(dag), ".2f") for dag in DAG_IDS),
        *((f"{dag} queued→start p50 (s)", latency_pct(dag, 0.5), ".3f") for dag in DAG_IDS),
        ("whole-machine CPU per fanout_100 task (ms)", fanout_cpu_per_task_ms, ".0f"),
        ("agent tree idle PSS (MB)", lambda r: r["idle"]["worker_pss"] * MB, ".0f"),
        ("processes in that tree, idle", lambda r: r["idle"]["worker_processes"], ".0f"),
        ("memory per running task (MB)", per_task_mb, ".1f"),
    ]
    for label, pick, spec in picks:
        on, off = res.values("tether", pick), res.values("tether-cold", pick)
        ratios = res.ratios("tether-cold", pick, base="tether")
        lines.append(f"| {label} | {_spread(on, spec)} | {_spread(off, spec)} | {_spread(ratios, unit='x')} |")
    lines += [
        "",
        "Warm start off (`warm_start: false`): no launcher and no spares; the agent forks itself for each task, "
        "and the task's supervisor then forks the task process, as Airflow's own executors do.",
        "",
    ]
    return lines


def ceiling_section(ceiling: dict[str, Any] | None) -> list[str]:
    if not ceiling:
        return []
    cpu = ceiling.get("machine_cpu")
    return [
        "## The scheduler's own ceiling",
        "",
        "| DAG | tasks | state | first start → last end | tasks/s | queued→start p50 | whole-machine CPU per task "
        "| scheduler CPU per task |",
        "|---|---|---|---|---|---|---|---|",
        f"| fanout_1000 | {ceiling['tasks']} | {ceiling['state']} | {ceiling['span']:.1f} s "
        f"| {ceiling['tasks_per_second']:.1f} | {ceiling['queued_to_start_p50']:.2f} s "
        f"| {_fmt(cpu and cpu / ceiling['tasks'] * 1000, '.0f', ' ms')} "
        f"| {ceiling['scheduler_cpu'] / max(ceiling['tasks'], 1) * 1000:.1f} ms |",
        "",
        f"The LocalExecutor on the executor rows' plane (`[core] parallelism` {ceiling['parallelism']}), one run "
        "of 1,000 no-op tasks with no dependencies: what one scheduler completes per second on this machine, "
        "tasks included. The scale test's dispatch ceiling is set against it.",
        "",
    ]


def target_rows(
    res: Results, scale: list[dict[str, Any]], scheduler_ceiling: dict[str, Any] | None = None
) -> list[tuple[str, str, bool]]:
    rows = []
    # The wall-time targets are Tether's with its tasks at the agent's own niceness, as the LocalExecutor's run.
    fair = "tether-nice0" if "tether-nice0" in res.executors else "tether"
    if fair in res.executors and "local" in res.executors:
        for dag, limit in (("fanout_100", 1.0), ("chain_10", 1.05)):
            ratios = res.ratios(fair, wall(dag))
            if ratios:
                mid = statistics.median(ratios)
                target = f"{dag} wall ≤ {limit:.2f}x Local ({NAMES[fair]})"
                rows.append((target, _spread(ratios, unit="x"), mid <= limit))
    for variant in [v for v in ("tether", "tether-nice0") if v in res.executors]:
        mine, local = res.values(variant, fanout_cpu_per_task_ms), res.values("local", fanout_cpu_per_task_ms)
        if mine and local:
            rows.append(
                (
                    f"whole-machine CPU per fanout_100 task ≤ Local's ({NAMES[variant]})",
                    f"{_spread(mine, '.0f', ' ms')} vs {_spread(local, '.0f', ' ms')}",
                    statistics.median(mine) <= statistics.median(local),
                )
            )
    if "tether" in res.executors:
        p50s = _start_p50s(res, "tether")
        if "local" in res.executors:
            local_p50s = _start_p50s(res, "local")
            met = all(
                v is not None and (base := local_p50s[dag]) is not None and v <= base + 0.02 for dag, v in p50s.items()
            )
            rows.append(
                (
                    "queued→start p50 ≤ Local's + 0.02 s (every DAG)",
                    f"{_listing(p50s)} (Local: {_listing(local_p50s)})",
                    met,
                )
            )
        idle = res.values("tether", lambda r: r["idle"]["worker_pss"] * MB)
        edge = res.values("edge", lambda r: r["idle"]["worker_pss"] * MB)
        if idle:
            limit, whose = (statistics.median(edge), "this run's") if edge else (EDGE_IDLE_PSS_MB, "the last report's")
            rows.append(
                (
                    f"agent tree idle PSS ≤ the Edge worker's ({whose}: {limit:.0f} MB)",
                    _spread(idle, ".0f", " MB"),
                    statistics.median(idle) <= limit,
                )
            )
        mine, local = res.values("tether", per_task_mb), res.values("local", per_task_mb)
        if mine and local:
            rows.append(
                (
                    "memory per running task ≤ LocalExecutor's",
                    f"{_spread(mine, '.1f', ' MB')} vs {_spread(local, '.1f', ' MB')}",
                    statistics.median(mine) <= statistics.median(local),
                )
            )
    if scale:
        rows.extend(scale_target_rows(scale, scheduler_ceiling))
    return rows


def saved_scheduler_ceiling(out: Path) -> dict[str, Any] | None:
    """The scheduler's own ceiling, if the run's ``results.json`` has one."""
    try:
        value = json.loads((out / "results.json").read_text()).get("scheduler_ceiling")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def write_report(
    out: Path,
    options: Any,
    results: list[Any],
    scale: list[dict[str, Any]],
    elapsed: float | None = None,
    *,
    processing: Sequence[Any] = (),
    triggers: dict[str, list[dict[str, Any]]] | None = None,
    task_logs: Sequence[Any] = (),
    scheduler_ceiling: dict[str, Any] | None = None,
) -> Path:
    if scheduler_ceiling is None:
        scheduler_ceiling = saved_scheduler_ceiling(out)
    runs = [r.as_dict() if hasattr(r, "as_dict") else r for r in results]
    opts = vars(options) if isinstance(options, argparse.Namespace) else dict(options or {})
    res = Results(runs)
    text = render(
        res,
        scale,
        opts,
        elapsed,
        [r.as_dict() if hasattr(r, "as_dict") else r for r in processing],
        triggers,
        [r.as_dict() if hasattr(r, "as_dict") else r for r in task_logs],
        scheduler_ceiling,
    )
    made = charts(out, res, scale)
    if made:
        text += "\n## Charts\n\n" + "\n".join(f"![{name}]({name})" for name in made) + "\n"
    path = out / "report.md"
    path.write_text(text + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    parser.add_argument("folder", type=Path, help="a results folder holding results.json")
    args = parser.parse_args()
    data = json.loads((args.folder / "results.json").read_text())
    print(
        write_report(
            args.folder,
            data.get("options"),
            data["results"],
            data.get("scale", []),
            data.get("elapsed"),
            processing=data.get("dag_processing", []),
            triggers=data.get("triggers"),
            task_logs=data.get("task_logs", []),
            scheduler_ceiling=data.get("scheduler_ceiling"),
        )
    )


if __name__ == "__main__":
    main()
