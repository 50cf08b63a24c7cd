"""``tether-agent``: thin command line over ``tether.agent``."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import tether
from tether.agent import settings as agent_settings
from tether.errors import ConfigError

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tether-agent", description="Tether remote execution agent")
    parser.add_argument("--version", action="version", version=f"tether-agent {tether.__version__}")
    parser.add_argument("--verbose", action="store_true", help="Show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="Register with the plane and run tasks until stopped")
    agent_settings.add_arguments(run)
    run.add_argument(
        "--print-settings",
        action="store_true",
        help="Validate the settings, print them (token redacted) and exit",
    )
    dag_processor = commands.add_parser(
        "dag-processor",
        help="Register in the dag-processor role and parse the DAG bundles here until stopped",
        description="Runs Airflow's DAG processor on this agent's bundles "
        "([dag_processor] dag_bundle_config_list) and sends the plane what it needs to schedule and show them.",
    )
    agent_settings.add_arguments(dag_processor)
    dag_processor.add_argument(
        "--print-settings",
        action="store_true",
        help="Validate the settings, print them (token redacted) and exit",
    )
    triggerer = commands.add_parser(
        "triggerer",
        help="Register in the triggerer role and run the triggers of deferred tasks here until stopped",
        description="Runs Airflow's trigger runner on the triggers the plane assigns this agent (at most "
        "trigger_capacity at once), with this agent's code, connections and secrets backends.",
    )
    agent_settings.add_arguments(triggerer)
    triggerer.add_argument(
        "--print-settings",
        action="store_true",
        help="Validate the settings, print them (token redacted) and exit",
    )
    sentinel = commands.add_parser(
        "sentinel",
        help="Report the agents' pods, as Kubernetes sees them, and the backends to the plane until stopped",
        description="Watches the agent pods and events of one Kubernetes namespace and reports their phase, "
        "readiness, restarts and reasons, and whether the secrets and XCom backends answer, every interval the "
        "plane gives. Needs a token of scope sentinel and get/list/watch on pods and events.",
    )
    agent_settings.add_arguments(sentinel)
    sentinel.add_argument(
        "--namespace",
        default=os.environ.get("TETHER_SENTINEL_NAMESPACE", ""),
        help="Namespace of the agent pods (TETHER_SENTINEL_NAMESPACE; default: the sentinel pod's own)",
    )
    sentinel.add_argument(
        "--selector",
        default=os.environ.get("TETHER_SENTINEL_SELECTOR", "app.kubernetes.io/component=agent"),
        help="Label selector of the agent pods (TETHER_SENTINEL_SELECTOR)",
    )
    sentinel.add_argument(
        "--print-settings",
        action="store_true",
        help="Validate the settings, print them (token redacted) and exit",
    )
    check = commands.add_parser(
        "check", help="Preflight: verify the token, the plane, the secrets and XCom backends and the DAG bundles"
    )
    agent_settings.add_arguments(check)
    return parser


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = agent_settings.load(args)
    except ConfigError as exc:
        print(f"tether-agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check":
        return asyncio.run(_check(settings))
    if args.print_settings:
        print(json.dumps(settings.redacted(), indent=2))
        return 0
    _configure_logging(settings.log_level)
    if agent_settings.insecure_plane_url(settings):
        logging.getLogger("tether.agent").warning(
            "The plane URL %s is plain HTTP (--allow-insecure-http): the agent token and every call cross the "
            "network in the clear",
            settings.plane_url,
        )
    if args.command == "dag-processor":
        from tether.agent import dag_processor

        return dag_processor.run(settings)
    if args.command == "triggerer":
        return _triggerer(settings)
    if args.command == "sentinel":
        from tether.agent import sentinel

        return sentinel.run(settings, args.namespace or None, args.selector)
    return asyncio.run(_run(settings))


def _task_log_folder() -> Path:
    """Where the Task SDK writes task logs on this agent: Airflow's ``[logging] base_log_folder``."""
    from airflow.configuration import conf

    return Path(conf.get("logging", "base_log_folder")).expanduser().resolve()


def _triggerer(settings: agent_settings.AgentSettings) -> int:
    from tether.agent.runner import task_sdk_tls_environment

    # Read by the Task SDK's Execution API client when it is first imported, as in the worker role.
    os.environ.update(
        task_sdk_tls_environment(
            ca_bundle=settings.ca_bundle, client_cert=settings.client_cert, client_key=settings.client_key
        )
    )
    from tether.agent import triggerer

    return triggerer.run(settings, log_folder=_task_log_folder(), execution_api_url=settings.execution_api_url)


async def _check(settings: agent_settings.AgentSettings) -> int:
    from tether.agent.preflight import run_checks

    print(f"tether-agent {tether.__version__} preflight for agent {settings.name!r} -> {settings.plane_url}")
    results = await run_checks(settings)
    for result in results:
        print(result.render())
    failed = sum(not r.ok for r in results)
    print(f"preflight: {len(results) - failed} of {len(results)} checks passed")
    return 1 if failed else 0


async def _run(settings: agent_settings.AgentSettings) -> int:
    from tether.agent.agent import Agent
    from tether.agent.client import PlaneClient, make_http_client
    from tether.agent.health import AgentMetrics
    from tether.agent.runner import MIN_SPARES, ForkRunner

    log = logging.getLogger("tether.agent")
    client = PlaneClient(make_http_client(settings))
    runner = ForkRunner(
        execution_api_url=settings.execution_api_url,
        ca_bundle=settings.ca_bundle,
        client_cert=settings.client_cert,
        client_key=settings.client_key,
        task_nice=settings.task_nice,
        min_spares=min(MIN_SPARES, settings.slots) if settings.warm_start else 0,
        max_spares=settings.slots if settings.warm_start else 0,
    )
    metrics = AgentMetrics()
    metrics.sdk_features(runner.availability)
    agent = Agent(
        settings=settings,
        client=client,
        runner=runner,
        metrics=metrics,
        task_log_folder=_task_log_folder(),
    )
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            log.info("%s received: draining (send it again to stop at once)", sig.name)
            agent.stop()
        else:
            log.warning("%s received again: terminating running tasks now", sig.name)
            agent.stop(force=True)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await agent.run()
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
