"""The triggerer comparison of the benchmark suite: its options, its arithmetic, its memory reading and its table."""

from __future__ import annotations

import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
from bench.cli import parse_args
from bench.deploy import EXECUTORS
from bench.report import triggers_section
from bench.triggers import Resumed, split_latencies, tree_memory_once

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_only_triggers_runs_the_triggerer_comparison_alone() -> None:
    args = parse_args(["--only", "triggers"])
    assert args.triggers and args.executors == []
    assert args.dag_processing == "off" and args.scale_counts == []
    assert (args.trigger_workload.tasks, args.trigger_workload.waiting) == (100, 1000)


def test_only_triggers_keeps_what_else_is_asked_for() -> None:
    args = parse_args(["--only", "triggers", "--dag-processing", "on", "--scale", "20"])
    assert args.dag_processing == "on" and args.scale_counts == [20]


def test_the_whole_suite_includes_triggers_and_naming_executors_leaves_them_out() -> None:
    whole = parse_args([])
    assert whole.triggers and whole.executors == list(EXECUTORS)
    assert {"tether-nice0", "tether-cold", "edge-poll1"} <= set(whole.executors)
    assert whole.ceiling == "on"
    assert whole.dag_processing == "on" and whole.scale_counts == [100, 1000, 5000]
    executors = parse_args(["--only", "local,tether"])
    assert not executors.triggers and executors.dag_processing == "on"


def test_quick_mode_uses_small_counts() -> None:
    args = parse_args(["--only", "triggers", "--quick"])
    assert args.trigger_runs == 1
    assert (args.trigger_workload.tasks, args.trigger_workload.waiting) == (10, 50)


def test_an_unknown_name_is_refused() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--only", "trigger"])


def _row(moment: float, deferred: float, resumed: float, event: float | None) -> Resumed:
    return Resumed(
        moment=T0 + timedelta(seconds=moment),
        deferred=T0 + timedelta(seconds=deferred),
        resumed=T0 + timedelta(seconds=resumed),
        event=None if event is None else T0 + timedelta(seconds=event),
    )


def test_latency_runs_from_the_moment_to_the_resumed_try_split_at_the_event() -> None:
    rows = [_row(100, 10, 101.5, 100.5), _row(101, 11, 103.0, 102.0), _row(102, 101, 103.0, 102.2)]
    latencies, to_event, event_to_start, excluded = split_latencies(rows)
    # The last task deferred a second before its moment: its trigger may not have been running in time.
    assert excluded == 1
    assert latencies == [1.5, 2.0]
    assert to_event == [0.5, 1.0]
    assert event_to_start == [1.0, 1.0]


def test_a_process_tree_s_memory_counts_its_children_and_finds_a_log_server() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = (
        "import socket, sys, time; s = socket.socket(); "
        f"s.bind(('127.0.0.1', {port})); s.listen(); print('up', flush=True); time.sleep(60)"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {server!r}])"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert parent.stdout is not None and parent.stdout.readline().strip() == "up"
        alone = tree_memory_once(parent.pid)
        found = tree_memory_once(parent.pid, port)
    finally:
        parent.kill()
        parent.wait(10)
    assert alone.processes == 2 and alone.rss > 0 and 0 < alone.pss <= alone.rss
    assert alone.log_server_rss is None
    assert found.log_server_rss is not None and 0 < found.log_server_rss < found.rss


def _latency(side: str, latencies: list[float], rss: float) -> dict[str, object]:
    return {
        "side": side,
        "run": 1,
        "tasks": len(latencies) + 1,
        "latencies": latencies,
        "to_event": [x / 2 for x in latencies],
        "event_to_start": [x / 2 for x in latencies],
        "excluded": 1,
        "defer_margin": 12.0,
        "state": "success",
        "idle": {"rss": rss, "pss": rss / 2, "processes": 2, "log_server_rss": None, "log_server_pss": None},
        "settings": {"worker": "one worker", "capacity": "1000", "spacing": "1"},
        "versions": {"apache-airflow-core": "3.3.2"},
    }


def test_the_table_has_a_row_per_triggerer_and_their_ratio() -> None:
    memory = {"rss": 300.0, "pss": 200.0, "processes": 2, "log_server_rss": None, "log_server_pss": None}
    data = {
        "latency": [_latency("tether", [1.0, 2.0, 3.0], 250.0), _latency("airflow", [2.0, 4.0, 6.0], 300.0)],
        "waiting": [
            {"side": "tether", "triggers": 1000, "memory": memory},
            {
                "side": "airflow",
                "triggers": 1000,
                "memory": {**memory, "rss": 400.0, "processes": 3, "log_server_rss": 90.0, "log_server_pss": 40.0},
            },
        ],
    }
    text = "\n".join(triggers_section(data))
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert "holding 1000 waiting triggers" in rows[0]
    tether, airflow, ratio = rows[1:4]
    assert tether.startswith("| Tether") and "| 3 of 4 | 2.00 / 3.00 |" in tether and "| 300 / 200 | 2 |" in tether
    assert airflow.startswith("| Airflow") and "| 4.00 / 6.00 |" in airflow and "| 400 / 200 | 3 |" in airflow
    assert ratio.startswith("| Tether ÷ Airflow")
    assert "| 0.50x / 0.50x | 0.50x / 0.50x | 0.50x / 0.50x |" in ratio and "0.75x / 1.00x" in ratio
    assert "90 MiB RSS" in text and "3 task(s) deferred less than 3 s" not in text
    assert "2 task(s) deferred less than 3 s" in text


def test_no_triggerer_measurements_no_section() -> None:
    assert triggers_section(None) == []
    assert triggers_section({"latency": [], "waiting": []}) == []
