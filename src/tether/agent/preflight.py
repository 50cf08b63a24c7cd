"""``tether-agent check``: verify, with the settings ``run`` would use, that the agent can work.

Each check reports ✓ or ✗ with what to do about a ✗. The plane checks go
through the same client (proxy, CA bundle, client certificate) as ``run``; the
Airflow checks load the same Task SDK configuration the tasks will see.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import tether
from tether import protocol
from tether.agent import sdk_internals
from tether.agent.client import PlaneClient, make_http_client
from tether.agent.settings import AgentSettings, insecure_plane_url
from tether.errors import PlaneRefused, PlaneUnavailable


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    #: Passed, with something the operator should know (a feature off, its fallback in use).
    notice: bool = False

    def render(self) -> str:
        mark = "✗" if not self.ok else "!" if self.notice else "✓"
        line = f"{mark} {self.name}: {self.detail}"
        return line if self.ok or not self.fix else f"{line}\n    fix: {self.fix}"


def _protocol_check(health: protocol.Health) -> CheckResult:
    """Whether the plane serves this agent's protocol revision (ADR 5)."""
    ours = protocol.PROTOCOL_VERSION
    mine = f"this agent speaks protocol {ours} (Tether {tether.__version__})"
    plane = f"the plane runs Tether {health.version}"
    if health.protocol < ours:
        return CheckResult(
            "protocol version",
            False,
            f"{plane}, which speaks protocol {health.protocol} at most; {mine}",
            "upgrade the plane first: a plane serves agents of its own and the previous minor release",
        )
    if health.oldest_protocol > ours:
        return CheckResult(
            "protocol version",
            False,
            f"{plane} and serves protocol {health.oldest_protocol} and newer; {mine}",
            f"upgrade this agent to Tether {protocol.release_of(health.oldest_protocol)} or newer",
        )
    return CheckResult("protocol version", True, f"{plane}, which serves protocol {ours}")


def _failure(name: str, exc: BaseException, fix: str) -> CheckResult:
    return CheckResult(name, False, f"{type(exc).__name__}: {exc}".strip(), fix)


async def _plane_checks(settings: AgentSettings, client: PlaneClient) -> list[CheckResult]:
    results = []
    proxy = os.environ.get("HTTPS_PROXY" if settings.plane_url.startswith("https") else "HTTP_PROXY") or os.environ.get(
        ("HTTPS_PROXY" if settings.plane_url.startswith("https") else "HTTP_PROXY").lower()
    )
    via = f" via proxy {proxy}" if proxy else ""
    ca = f", CA bundle {settings.ca_bundle}" if settings.ca_bundle else ""
    try:
        health = await client.health()
    except (PlaneUnavailable, PlaneRefused) as exc:
        results.append(
            CheckResult(
                "plane reachable",
                False,
                f"{settings.plane_url}{via}{ca}: {exc}",
                "check --plane-url, the proxy variables (HTTP_PROXY, HTTPS_PROXY, NO_PROXY) and --ca-bundle; "
                "the plane's API server must serve /tether (Tether installed there)",
            )
        )
        return results
    results.append(
        CheckResult("plane reachable", True, f"{settings.plane_url}{via}{ca} answers (Tether {health.version})")
    )
    results.append(_protocol_check(health))
    try:
        answer = await client.preflight()
    except PlaneRefused as exc:
        fix = {
            401: "create a token on the plane (airflow tether tokens create --name NAME) and give it to this agent",
            403: "add this address to the plane's allowed IP ranges (airflow tether allowed-ip-ranges add CIDR)",
        }.get(exc.status, "see the plane's answer above")
        results.append(CheckResult("agent token accepted", False, exc.detail, fix))
    except PlaneUnavailable as exc:
        results.append(_failure("agent token accepted", exc, "retry when the plane is reachable"))
    else:
        results.append(
            CheckResult(
                "agent token accepted",
                True,
                f"token {answer.token_name!r} accepted from address {answer.address}",
            )
        )
    return results


def secrets_check() -> CheckResult:
    name = "secrets backend"
    try:
        from airflow.sdk.configuration import ensure_secrets_loaded

        # The chain the task supervisor loads on a worker: the configured backend, then
        # environment variables (the Execution API backend needs a running task).
        backends = ensure_secrets_loaded(
            default_backends=["airflow.secrets.environment_variables.EnvironmentVariablesBackend"]
        )
        probe = f"tether_preflight_{uuid.uuid4().hex[:8]}"
        for backend in backends:
            # A lookup of a name nobody uses: answering "nothing" proves the backend works.
            backend.get_connection(probe)
    except Exception as exc:
        return _failure(name, exc, "check [workers] secrets_backend and secrets_backend_kwargs (AIRFLOW__WORKERS__...)")
    names = ", ".join(type(b).__name__ for b in backends)
    return CheckResult(name, True, f"answering: {names}")


def xcom_check() -> CheckResult:
    name = "XCom backend"
    try:
        from airflow.sdk.execution_time.xcom import resolve_xcom_backend

        backend = resolve_xcom_backend()
        # serialize_value is where custom backends write to their store and return a reference.
        backend.serialize_value(
            value={"tether": "preflight"},
            key="tether_preflight",
            dag_id="tether_preflight",
            task_id="tether_preflight",
            run_id=f"tether_preflight_{uuid.uuid4().hex[:8]}",
            map_index=-1,
        )
    except Exception as exc:
        return _failure(name, exc, "check [core] xcom_backend (AIRFLOW__CORE__XCOM_BACKEND) and its settings")
    return CheckResult(name, True, f"{backend.__module__}.{backend.__qualname__} wrote a test value")


def _bundle_checks() -> list[CheckResult]:
    try:
        from airflow.dag_processing.bundles.manager import DagBundlesManager

        manager = DagBundlesManager()
        bundles = list(manager.get_all_dag_bundles())
    except Exception as exc:
        fix = "check [dag_processor] dag_bundle_config_list (AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST)"
        return [_failure("DAG bundles", exc, fix)]
    if not bundles:
        return [CheckResult("DAG bundles", False, "none configured", "set [dag_processor] dag_bundle_config_list")]
    results = []
    for bundle in bundles:
        name = f"DAG bundle {bundle.name!r}"
        try:
            bundle.initialize()
            path = bundle.path
            if not path.exists():
                raise FileNotFoundError(f"{path} does not exist")
        except Exception as exc:
            results.append(_failure(name, exc, "check the bundle's settings and that its source is reachable"))
        else:
            results.append(CheckResult(name, True, f"initialised at {path}"))
    return results


def _sdk_checks() -> list[CheckResult]:
    """The Task SDK features that rely on its private parts: on, or off with the fallback in use."""
    results = []
    for feature, reason in sdk_internals.check().items():
        name = f"Task SDK feature {feature.value}"
        if reason is None:
            results.append(CheckResult(name, True, "on"))
        else:
            detail = f"off: {reason}; {sdk_internals.FALLBACKS[feature]}"
            results.append(CheckResult(name, True, detail, notice=True))
    return results


@contextmanager
def _quiet_airflow_logs() -> Iterator[None]:
    import logging

    previous = logging.root.level
    logging.root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logging.root.setLevel(previous)


def _transport_check(settings: AgentSettings) -> CheckResult | None:
    if not insecure_plane_url(settings):
        return None
    return CheckResult(
        "plane URL",
        True,
        f"{settings.plane_url} is plain HTTP (--allow-insecure-http): the token crosses the network in the clear",
        notice=True,
    )


async def run_checks(settings: AgentSettings, client: PlaneClient | None = None) -> list[CheckResult]:
    own_client = client is None
    client = client or PlaneClient(make_http_client(settings))
    transport = _transport_check(settings)
    try:
        results = ([transport] if transport else []) + await _plane_checks(settings, client)
    finally:
        if own_client:
            await client.aclose()
    local: list[Callable[[], CheckResult | list[CheckResult]]] = [
        secrets_check,
        xcom_check,
        _bundle_checks,
        _sdk_checks,
    ]
    with _quiet_airflow_logs():
        for check in local:
            outcome = await asyncio.to_thread(check)
            results.extend(outcome if isinstance(outcome, list) else [outcome])
    return results
