"""Agent settings: one name per option, from a flag, the environment or a file.

Precedence is flag > environment (``TETHER_<NAME>``) > file (``--config``,
YAML, keys in snake_case) > default. Everything is validated here, once; a bad
value raises ``ConfigError`` with one sentence naming the option.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tether.errors import ConfigError
from tether.protocol import TaskLogs

ENV_PREFIX = "TETHER_"


@dataclass(frozen=True)
class Option:
    name: str
    help: str
    default: Any = None
    parse: Callable[[str], Any] = str
    secret: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


def _csv(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _labels(text: str) -> dict[str, str]:
    labels = {}
    for item in _csv(text):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{item!r} is not key=value")
        labels[key.strip()] = value.strip()
    return labels


def _seconds(text: str) -> timedelta:
    value = float(text)
    if value < 0:
        raise ValueError("must not be negative")
    return timedelta(seconds=value)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be 1 or more")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be a TCP port (0-65535)")
    return value


def _nice(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 19:
        raise ValueError("must be from 0 to 19")
    return value


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        raise ValueError("must be true or false")
    return value in ("true", "1", "yes", "on")


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
    return level


OPTIONS: tuple[Option, ...] = (
    Option("plane_url", "Base URL of the Airflow API server, e.g. https://airflow.example.com"),
    Option("token", "Agent token (prefer token_file: values in flags and environment can leak)", secret=True),
    Option("token_file", "File holding the agent token"),
    Option("name", "Agent name, unique among live agents (default: the host name)"),
    Option("queues", "Comma-separated queues this agent serves", default="default", parse=_csv),
    Option("slots", "Task slots; a task takes pool_slots of them", default="4", parse=_positive_int),
    Option("labels", "Comma-separated key=value labels", default="", parse=_labels),
    Option("drain_timeout", "Seconds running tasks get to finish after SIGTERM", default="540", parse=_seconds),
    Option(
        "task_nice",
        "Niceness tasks run with above the agent's (0-19), so the agent and the tasks' supervisors keep the CPU "
        "they need to start, watch and report tasks while tasks use all of it (0: the agent's own)",
        default="10",
        parse=_nice,
    ),
    Option(
        "warm_start",
        "Keep warm spare processes ready, each with its task process forked ahead, so a task starts without "
        "a fork of the agent (false: fork the agent for each task; fewer processes, slower starts)",
        default="true",
        parse=_bool,
    ),
    Option("health_host", "Address of the /healthz, /readyz and /metrics server", default="0.0.0.0"),
    Option(
        "health_port",
        "Port of the /healthz, /readyz and /metrics server (0: none)",
        default="8790",
        parse=_port,
    ),
    Option("ca_bundle", "PEM file of CA certificates that sign the plane's certificate"),
    Option("client_cert", "PEM client certificate presented to the plane"),
    Option("client_key", "PEM key of the client certificate"),
    Option("execution_api_url", "Airflow Execution API URL (default: <plane_url>/execution/)"),
    Option(
        "task_logs",
        "ship: send task logs to the plane as they are written, for Airflow's log views; local: keep them here "
        "(and in the agent's own Airflow remote logging), the plane's log view saying where they are",
        default="ship",
        parse=lambda text: TaskLogs(text.strip().lower()),
    ),
    Option(
        "share_dag_source",
        "dag-processor role: send the source of the DAG files it parses, for the plane's Code tab (the plane "
        "keeps it only where [tether] store_dag_source is on)",
        default="false",
        parse=_bool,
    ),
    Option(
        "trigger_capacity",
        "triggerer role: most triggers this agent runs at once (Airflow's [triggerer] capacity)",
        default="1000",
        parse=_positive_int,
    ),
    Option(
        "allow_insecure_http",
        "Allow an http:// plane URL that is not a loopback address: the agent token then crosses the network "
        "in the clear (logged as a warning at start and in tether-agent check)",
        default="false",
        parse=_bool,
    ),
    Option("log_level", "DEBUG, INFO, WARNING or ERROR", default="INFO", parse=_log_level),
    Option(
        "max_backoff",
        "Longest pause, in seconds, between retries to an unreachable plane",
        default="30",
        parse=_seconds,
    ),
)

_BY_NAME = {option.name: option for option in OPTIONS}


@dataclass(frozen=True, kw_only=True)
class AgentSettings:
    plane_url: str
    token: str = field(repr=False)
    name: str
    queues: tuple[str, ...] = ("default",)
    slots: int = 4
    labels: Mapping[str, str] = field(default_factory=dict)
    drain_timeout: timedelta = timedelta(seconds=540)
    task_nice: int = 10
    warm_start: bool = True
    health_host: str = "0.0.0.0"
    health_port: int = 8790
    ca_bundle: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    execution_api_url: str = ""
    log_level: str = "INFO"
    max_backoff: timedelta = timedelta(seconds=30)
    share_dag_source: bool = False
    task_logs: TaskLogs = TaskLogs.SHIP
    trigger_capacity: int = 1000
    allow_insecure_http: bool = False
    token_file: Path | None = None

    def redacted(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "token":
                value = value[: value.find("_", len("tether_")) + 1] + "…" if value else ""
            elif isinstance(value, timedelta):
                value = value.total_seconds()
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = dict(value)
            out[f.name] = value
        return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML file of settings (env TETHER_CONFIG)")
    for option in OPTIONS:
        default_note = f" (default: {option.default})" if option.default not in (None, "") else ""
        parser.add_argument(option.flag, dest=option.name, help=f"{option.help}{default_note} [env {option.env}]")


def _read_file(path: str) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read the settings file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"the settings file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"the settings file {path} must hold a mapping of option: value")
    unknown = sorted(set(data) - set(_BY_NAME))
    if unknown:
        raise ConfigError(f"the settings file {path} has unknown options: {', '.join(unknown)}")
    return {k: "" if v is None else (",".join(map(str, v)) if isinstance(v, list) else str(v)) for k, v in data.items()}


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` names this machine only: ``localhost`` or a loopback address."""
    if not host:
        return False
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def insecure_plane_url(settings: AgentSettings) -> bool:
    """Whether the agent calls the plane over plain HTTP across a network (allowed by --allow-insecure-http)."""
    parsed = urlparse(settings.plane_url)
    return parsed.scheme == "http" and not is_loopback(parsed.hostname)


def _check_private(path: Path) -> None:
    """Refuse a token file others may read or anyone but its owner may change.

    Group read is allowed: Kubernetes mounts a Secret group-readable by the pod's
    ``fsGroup`` (the chart sets ``defaultMode: 0440``).
    """
    mode = path.stat().st_mode
    if mode & (stat.S_IROTH | stat.S_IWOTH | stat.S_IWGRP):
        raise ConfigError(
            f"the agent token file {path} may be read or changed by other users (mode {stat.S_IMODE(mode):04o}): "
            f"run chmod 600 {path}"
        )


def load(args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None) -> AgentSettings:
    environ = os.environ if environ is None else environ
    flags = vars(args) if args is not None else {}
    config_path = flags.get("config") or environ.get(ENV_PREFIX + "CONFIG")
    from_file = _read_file(config_path) if config_path else {}

    raw: dict[str, str | None] = {}
    for option in OPTIONS:
        value = flags.get(option.name)
        if value is None:
            value = environ.get(option.env)
        if value is None:
            value = from_file.get(option.name)
        raw[option.name] = value

    values: dict[str, Any] = {}
    for option in OPTIONS:
        text = raw[option.name]
        if text is None or text == "":
            text = option.default
        if text is None:
            values[option.name] = None
            continue
        try:
            values[option.name] = option.parse(text)
        except ValueError as exc:
            shown = "<hidden>" if option.secret else repr(text)
            raise ConfigError(f"{option.flag} / {option.env}: {shown} is invalid: {exc}") from None

    plane_url = values["plane_url"]
    if not plane_url:
        raise ConfigError("the plane URL is required: pass --plane-url or set TETHER_PLANE_URL")
    parsed = urlparse(plane_url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(f"--plane-url / TETHER_PLANE_URL: {plane_url!r} must be an http(s) URL with a host")
    plane_url = plane_url.rstrip("/")
    if parsed.scheme == "http" and not is_loopback(parsed.hostname) and not values["allow_insecure_http"]:
        raise ConfigError(
            f"--plane-url / TETHER_PLANE_URL: {plane_url!r} is plain HTTP, so the agent token would cross the "
            "network in the clear. Use https://, or, if the network is yours to trust, --allow-insecure-http / "
            "TETHER_ALLOW_INSECURE_HTTP=true"
        )

    token, token_file = values["token"], values["token_file"]
    if bool(token) == bool(token_file):
        raise ConfigError(
            "exactly one agent token source is required: --token / TETHER_TOKEN or --token-file / TETHER_TOKEN_FILE"
        )
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the agent token file {token_file}: {exc.strerror}") from None
        if not token:
            raise ConfigError(f"the agent token file {token_file} is empty")
        _check_private(Path(token_file))

    for name in ("ca_bundle", "client_cert", "client_key"):
        if values[name] and not Path(values[name]).is_file():
            raise ConfigError(f"{_BY_NAME[name].flag} / {_BY_NAME[name].env}: no file at {values[name]}")
    if bool(values["client_cert"]) != bool(values["client_key"]):
        raise ConfigError("--client-cert and --client-key go together: give both or neither")
    if not values["queues"]:
        raise ConfigError("--queues / TETHER_QUEUES: at least one queue is required")

    return AgentSettings(
        plane_url=plane_url,
        token=token,
        token_file=Path(token_file) if token_file else None,
        name=values["name"] or socket.gethostname(),
        queues=values["queues"],
        slots=values["slots"],
        labels=values["labels"],
        drain_timeout=values["drain_timeout"],
        task_nice=values["task_nice"],
        warm_start=values["warm_start"],
        health_host=values["health_host"],
        health_port=values["health_port"],
        ca_bundle=Path(values["ca_bundle"]) if values["ca_bundle"] else None,
        client_cert=Path(values["client_cert"]) if values["client_cert"] else None,
        client_key=Path(values["client_key"]) if values["client_key"] else None,
        execution_api_url=values["execution_api_url"] or f"{plane_url}/execution/",
        log_level=values["log_level"],
        max_backoff=values["max_backoff"],
        share_dag_source=values["share_dag_source"],
        task_logs=values["task_logs"],
        trigger_capacity=values["trigger_capacity"],
        allow_insecure_http=values["allow_insecure_http"],
    )
