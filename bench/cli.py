"""``python -m bench``: deploy each executor in turn and run the DAGs; compare DAG processing; run the scale test.

Then write the report.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from bench.dag_processing import PROCESSORS, ProcessingRun, Workload, measure_processor, summary
from bench.deploy import BENCH, EXECUTORS, VARIANTS, Postgres, deployed, ensure_edge_venv, log, prepare_template
from bench.measure import DeploymentResult, measure
from bench.scale import add_options as add_scale_options
from bench.scale import plan_from as scale_plan
from bench.task_logs import MODES as LOG_MODES
from bench.task_logs import LogRun, LogWorkload, measure_logs
from bench.task_logs import summary as log_summary
from bench.triggers import SIDES, LatencyRun, TriggerWorkload, WaitingMemory, measure_latency, measure_waiting

PG_ADMIN_URL = os.environ.get("TETHER_BENCH_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    # Five, not three: on a shared two-core machine one executor's fanout_100 wall
    # varies by a third from run to run, and the target is a 10 % ratio.
    parser.add_argument("--runs", type=int, default=5, help="runs per executor, alternating (default 5)")
    parser.add_argument("--quick", action="store_true", help="a fast smoke: 1 run, short windows, scale 20 agents")
    parser.add_argument(
        "--only",
        default=",".join((*EXECUTORS, "triggers")),
        help="executor rows to measure (local; tether, tether-nice0: tasks at the agent's niceness, tether-cold: "
        "warm start off; edge, edge-poll1: 1 s job poll), and 'triggers' for the triggerer comparison (default: "
        "all of them; 'none': none). '--only triggers' alone also turns DAG processing and the scale test off "
        "unless they are asked for",
    )
    add_scale_options(parser)
    parser.add_argument("--idle-window", type=float, default=30.0, help="seconds of each idle measurement window")
    parser.add_argument("--dag-timeout", type=float, default=600.0, help="longest wait for one DAG run")
    parser.add_argument(
        "--dag-processing",
        choices=("on", "off"),
        default=None,
        help="compare Tether's dag-processor agent with Airflow's dag-processor on 500 DAG files (default on)",
    )
    parser.add_argument(
        "--dag-processing-runs", type=int, default=3, help="runs of each DAG processor, alternating (default 3)"
    )
    parser.add_argument(
        "--trigger-tasks", type=int, default=100, help="deferred tasks timed per triggerer (default 100)"
    )
    parser.add_argument(
        "--waiting-triggers", type=int, default=1000, help="waiting triggers held while memory is read (default 1000)"
    )
    parser.add_argument(
        "--trigger-runs", type=int, default=1, help="latency runs of each triggerer, alternating (default 1)"
    )
    parser.add_argument(
        "--task-logs",
        choices=("on", "off"),
        default=None,
        help="measure shipping task logs to the plane against keeping them on the agent (default on)",
    )
    parser.add_argument("--task-log-runs", type=int, default=2, help="runs of each log mode, alternating (default 2)")
    parser.add_argument(
        "--ceiling",
        choices=("on", "off"),
        default=None,
        help="measure the scheduler's own ceiling: the LocalExecutor on a fan-out of 1,000 no-op tasks "
        "(default on, off with --quick)",
    )
    parser.add_argument("--out", type=Path, default=None, help="report folder (default bench/results/<date>)")
    parser.add_argument("--pg-url", default=PG_ADMIN_URL, help="PostgreSQL admin URL (env TETHER_BENCH_PG_URL)")
    args = parser.parse_args(argv)
    named = [] if args.only == "none" else [e.strip() for e in args.only.split(",") if e.strip()]
    unknown = set(named) - {*EXECUTORS, "triggers"}
    if unknown:
        parser.error(
            f"--only: unknown name(s) {', '.join(sorted(unknown))}; choose from {', '.join(EXECUTORS)}, triggers"
        )
    args.triggers = "triggers" in named
    args.executors = [e for e in named if e != "triggers"]
    triggers_alone = args.triggers and not args.executors
    if args.dag_processing is None:
        args.dag_processing = "off" if triggers_alone else "on"
    if args.scale is None:
        args.scale = "none" if triggers_alone else "100,1000,5000"
    if args.task_logs is None:
        args.task_logs = "off" if triggers_alone else "on"
    if args.ceiling is None:
        args.ceiling = "off" if triggers_alone or args.quick else "on"
    args.scale_counts = [] if args.scale == "none" else [int(n) for n in args.scale.split(",") if n.strip()]
    args.workload = Workload()
    args.log_workload = LogWorkload()
    args.trigger_workload = TriggerWorkload(tasks=args.trigger_tasks, waiting=args.waiting_triggers)
    if args.quick:
        args.workload = Workload(files=100, changes=5)
        args.log_workload = LogWorkload(lines=2_000, ticks=20)
        args.task_log_runs = 1
        args.dag_processing_runs = 1
        args.runs = 1
        args.idle_window = min(args.idle_window, 5.0)
        args.scale_counts = [min(n, 20) for n in args.scale_counts[:1]]
        args.trigger_runs = 1
        args.trigger_workload = TriggerWorkload(
            tasks=min(args.trigger_tasks, 10), waiting=min(args.waiting_triggers, 50), settle=5.0, samples=3
        )
    args.scale_workers_list, args.scale_plan = scale_plan(args, parser)
    if min(args.runs, args.dag_processing_runs, args.trigger_runs, args.task_log_runs) < 1:
        parser.error("--runs, --dag-processing-runs, --trigger-runs and --task-log-runs must be at least 1")
    if args.trigger_workload.tasks < 1 or args.trigger_workload.waiting < 1:
        parser.error("--trigger-tasks and --waiting-triggers must be at least 1")
    return args


def raise_fd_limit() -> None:
    """A thousand simulated agents hold two connections each, on both ends of loopback."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_fd_limit()
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    out: Path = args.out or BENCH / "results" / datetime.now(UTC).strftime("%Y-%m-%d_%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    pg = Postgres(args.pg_url)
    results: list[DeploymentResult] = []
    processing: list[ProcessingRun] = []
    task_logs: list[LogRun] = []
    scale: list[dict[str, object]] = []
    triggers: Triggers = Triggers()
    ceiling: dict[str, Any] | None = None
    work = Path(tempfile.mkdtemp(prefix="tether-bench-"))
    log(f"writing to {out}; work folder {work}")
    try:
        bases = list(dict.fromkeys(VARIANTS[name].executor for name in args.executors))
        if "edge" in bases:
            ensure_edge_venv()
        templates = {}
        for executor in bases:
            log(f"migrating a template database for {executor}")
            templates[executor] = prepare_template(executor, pg, work)

        def tether_template(purpose: str) -> str:
            if "tether" not in templates:
                log(f"migrating a template database for {purpose}")
                templates["tether"] = prepare_template("tether", pg, work)
            return templates["tether"]

        for run in range(1, args.runs + 1):
            for name in args.executors:
                variant = VARIANTS[name]
                log(f"run {run}/{args.runs}: {name}")
                with deployed(variant, pg, templates[variant.executor], work, run) as deployment:
                    results.append(
                        measure(deployment, pg, run=run, idle_window=args.idle_window, timeout=args.dag_timeout)
                    )
                _save(out, args, results, processing, scale, triggers, task_logs, ceiling)
        if args.triggers:
            template = tether_template("the triggerer comparison")
            for run in range(1, args.trigger_runs + 1):
                for side in SIDES:
                    log(f"triggers, run {run}/{args.trigger_runs}: {side}")
                    triggers.latency.append(measure_latency(side, pg, template, work, run, args.trigger_workload))
                    _save(out, args, results, processing, scale, triggers, task_logs, ceiling)
            log(f"triggers: {args.trigger_workload.waiting} waiting triggers, Tether's agent then Airflow's triggerer")
            triggers.waiting.extend(measure_waiting(pg, template, work, 1, args.trigger_workload))
            _save(out, args, results, processing, scale, triggers, task_logs, ceiling)
        if args.dag_processing == "on":
            template = tether_template("DAG processing")
            for run in range(1, args.dag_processing_runs + 1):
                for processor in PROCESSORS:
                    log(f"DAG processing, run {run}/{args.dag_processing_runs}: {processor}")
                    processing.append(measure_processor(processor, pg, template, work, run, args.workload))
                    log(f"  {summary(processing[-1])}")
                    _save(out, args, results, processing, scale, triggers, task_logs, ceiling)
        if args.task_logs == "on":
            template = tether_template("task logs")
            for run in range(1, args.task_log_runs + 1):
                for mode in LOG_MODES:
                    log(f"task logs, run {run}/{args.task_log_runs}: {mode}")
                    task_logs.append(measure_logs(mode, pg, template, work, run, args.log_workload))
                    log(f"  {log_summary(task_logs[-1])}")
                    _save(out, args, results, processing, scale, triggers, task_logs, ceiling)
        if args.ceiling == "on":
            from bench.ceiling import scheduler_ceiling

            if "local" not in templates:
                log("migrating a template database for the scheduler's ceiling")
                templates["local"] = prepare_template("local", pg, work)
            ceiling = scheduler_ceiling(pg, templates["local"], work, timeout=args.dag_timeout).as_dict()
            _save(out, args, results, processing, scale, triggers, task_logs, ceiling)
        if args.scale_counts:
            from bench.scale import scale_test

            template = tether_template("the scale test")
            scale.extend(scale_test(pg, template, work, args.scale_counts, args.scale_workers_list, args.scale_plan))
            _save(out, args, results, processing, scale, triggers, task_logs, ceiling)
    except KeyboardInterrupt:
        log("interrupted; cleaning up")
        return 130
    except Exception as exc:
        # What was measured before the failure still makes a report; the failure is in it and in the exit code.
        log(f"failed: {exc!r}; the report covers what was measured before")
        status = 1
    else:
        status = 0
    finally:
        pg.cleanup()
    from bench.report import write_report

    report = write_report(
        out,
        args,
        results,
        scale,
        time.monotonic() - started,
        processing=processing,
        triggers=triggers.as_dict(),
        task_logs=task_logs,
        scheduler_ceiling=ceiling,
    )
    if triggers.latency or triggers.waiting:
        from bench.report import triggers_section

        print("\n".join(triggers_section(triggers.as_dict())), flush=True)
    log(f"done in {(time.monotonic() - started) / 60:.1f} min: {report}")
    return status


@dataclass
class Triggers:
    """What the triggerer comparison measured so far."""

    latency: list[LatencyRun] = field(default_factory=list)
    waiting: list[WaitingMemory] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[dict[str, Any]]]:
        return {"latency": [r.as_dict() for r in self.latency], "waiting": [w.as_dict() for w in self.waiting]}


def _save(
    out: Path,
    args: argparse.Namespace,
    results: list[DeploymentResult],
    processing: list[ProcessingRun],
    scale: list[dict[str, object]],
    triggers: Triggers,
    task_logs: list[LogRun],
    ceiling: dict[str, Any] | None,
) -> None:
    data = {
        "options": {k: _plain(v) for k, v in vars(args).items()},
        "results": [r.as_dict() for r in results],
        "dag_processing": [r.as_dict() for r in processing],
        "scale": scale,
        "triggers": triggers.as_dict(),
        "task_logs": [r.as_dict() for r in task_logs],
        "scheduler_ceiling": ceiling,
    }
    (out / "results.json").write_text(json.dumps(data, indent=1, default=str))


def _plain(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    return value


if __name__ == "__main__":
    sys.exit(main())
