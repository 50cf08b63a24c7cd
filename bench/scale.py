"""The scale test: N simulated agents against one API server, measured from outside.

For each N a fresh database and a lone ``airflow api-server`` (one worker, as
the plane runs by default); the load generator runs as its own process so its
CPU is not the API server's. While it measures, this process samples the API
server's CPU and RSS, the database's connections and its transactions.
"""

from __future__ import annotations

import json
import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.deploy import Postgres, log, make_plane
from bench.measure import tree_cpu, tree_rss
from bench.stats import percentile
from tether.embedded import spawn


def one_scale(pg: Postgres, template: str, work: Path, agents: int, duration: float) -> dict[str, Any]:
    name = pg.create(f"bench_scale_{agents}", template=template)
    plane = make_plane("tether", work / f"scale-{agents}", pg.url(name))
    try:
        plane.home.mkdir(parents=True, exist_ok=True)
        token_file = plane.home / "token"
        token_file.write_text(plane.create_token("bench-scale"))
        plane.start(("api-server",))
        out = plane.home / "loadgen.json"
        ready = out.with_suffix(".measuring")
        argv = [sys.executable, "-m", "bench.loadgen", "--url", plane.url, "--token-file", str(token_file)]
        argv += ["--agents", str(agents), "--duration", str(duration), "--out", str(out)]
        env = {**plane.env, "PYTHONPATH": str(Path(__file__).parent.parent)}
        gen = spawn("loadgen", argv, env, plane.home / "logs")
        plane.processes["loadgen"] = gen
        limit = time.monotonic() + 240
        while not ready.exists():
            if not gen.alive() or time.monotonic() > limit:
                raise RuntimeError(f"the load generator did not start measuring:\n{gen.tail()}")
            time.sleep(0.5)
        api = [plane.processes["api-server"].pid]
        cpu0, x0, started = tree_cpu(api), pg.xact_commit(name), time.monotonic()
        rss_peak = connections_peak = 0.0
        connections: list[int] = []
        while gen.alive() and time.monotonic() - started < duration:
            rss_peak = max(rss_peak, tree_rss(api))
            conns = pg.connections(name)
            connections.append(conns)
            connections_peak = max(connections_peak, conns)
            time.sleep(1.0)
        elapsed = time.monotonic() - started
        cpu, xacts = tree_cpu(api) - cpu0, pg.xact_commit(name) - x0
        gen.popen.wait(timeout=120)
        if not out.exists():
            raise RuntimeError(f"the load generator wrote no result:\n{gen.tail()}")
        result: dict[str, Any] = json.loads(out.read_text())
        handled = handler_times(plane.processes["api-server"].log_path, since=float(ready.read_text()))
        result.update(
            handler_heartbeat_p50=percentile(handled, 0.50),
            handler_heartbeat_p99=percentile(handled, 0.99),
            api_cpu_cores=cpu / elapsed,
            api_rss_peak=rss_peak,
            db_connections_peak=connections_peak,
            db_connections_mean=sum(connections) / len(connections) if connections else 0,
            db_xacts_per_agent_second=xacts / elapsed / agents,
        )
        return result
    finally:
        plane.stop()
        pg.drop(name)


_HANDLED = re.compile(r"^(\S+) .*POST /tether/v1/agents/\S+/heartbeat -> \d+ in ([0-9.]+) ms")


def handler_times(log_path: Path, *, since: float) -> list[float]:
    """Heartbeat durations the API server logged itself (inside Tether's app) since ``since``, in seconds.

    Set against the client's figures they show where time goes: in Tether's
    handler, or before it (the API server's event loop and Airflow's middleware).
    """
    times = []
    with log_path.open(errors="replace") as lines:
        for line in lines:
            match = _HANDLED.match(line)
            if match is None:
                continue
            try:
                at = datetime.fromisoformat(match.group(1).replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
            if at >= since:
                times.append(float(match.group(2)) / 1000)
    return times


def scale_test(pg: Postgres, template: str, work: Path, counts: list[int], *, duration: float) -> list[dict[str, Any]]:
    results = []
    for agents in counts:
        log(f"scale: {agents} simulated agents for {duration:.0f}s")
        result = one_scale(pg, template, work, agents, duration)
        log(
            f"scale: {agents} agents: heartbeat p50 {_ms(result['heartbeat_p50'])} p99 {_ms(result['heartbeat_p99'])}, "
            f"lease overrun p99 {_ms(result['lease_overrun_p99'])}, errors {sum(result['errors'].values())}, "
            f"API CPU {result['api_cpu_cores']:.2f} cores, RSS {result['api_rss_peak']:.0f} MiB, "
            f"DB connections peak {result['db_connections_peak']:.0f}"
        )
        results.append(result)
    return results


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"
