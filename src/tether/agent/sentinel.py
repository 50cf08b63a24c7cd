"""``tether-agent sentinel``: tells the plane how the agents' pods are doing, as Kubernetes sees them.

It keeps a mirror of the pods (by label selector) and the events of one namespace
- a list, then a watch from its resource version, as Kubernetes clients do, and a
new list when the watch ends or fails - and every interval the plane gives (30 s
by default) sends the plane one report: each pod's phase, readiness, restarts,
last termination reason (OOMKilled, Error), waiting reason (CrashLoopBackOff,
ImagePullBackOff) and latest warning event's reason, and whether the secrets and
XCom backends configured here answer. Reasons only: no message, log, code or data
leaves the cluster. Its token needs the ``sentinel`` scope, which leases nothing.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tether import protocol
from tether.agent.settings import AgentSettings

log = logging.getLogger("tether.sentinel")

#: Where a pod finds its own namespace.
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
#: Seconds a watch is asked to stay open before the server ends it and a new one starts.
WATCH_SECONDS = 300
#: Seconds between reports until the plane says otherwise.
DEFAULT_INTERVAL = 30.0
#: Seconds each backend check may take.
BACKEND_TIMEOUT = 15.0


def kubernetes_api() -> Any:
    """A ``CoreV1Api`` configured as a pod's service account (in a cluster) or from the kubeconfig (outside)."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]
    return client.CoreV1Api()


def own_namespace(default: str = "default") -> str:
    try:
        return NAMESPACE_FILE.read_text().strip() or default
    except OSError:
        return default


@dataclass
class Mirror:
    """The objects one list call returns, kept current by watching from the list's resource version."""

    list_call: Callable[..., Any]
    namespace: str
    label_selector: str | None = None
    objects: dict[str, Any] = field(default_factory=dict)
    #: Set once the first list has arrived.
    synced: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"mirror-{self.list_call.__name__}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def snapshot(self) -> list[Any]:
        with self._lock:
            return list(self.objects.values())

    def _kwargs(self) -> dict[str, Any]:
        return {"label_selector": self.label_selector} if self.label_selector else {}

    def _run(self) -> None:
        """List, then watch from the list's version, and from each change's as the watch goes on; a watch
        that ends is started again from the last version seen, and one refused (410 Gone: the server no
        longer has that version) or failing is followed by a new list."""
        from kubernetes import watch

        delay = 1.0
        version: str | None = None
        while not self._stop.is_set():
            try:
                if version is None:
                    listed = self.list_call(self.namespace, **self._kwargs())
                    with self._lock:
                        self.objects = {item.metadata.uid: item for item in listed.items}
                    self.synced.set()
                    version = listed.metadata.resource_version
                stream = watch.Watch().stream(  # type: ignore[no-untyped-call]
                    self.list_call,
                    self.namespace,
                    resource_version=version,
                    timeout_seconds=WATCH_SECONDS,
                    **self._kwargs(),
                )
                for event in stream:
                    if self._stop.is_set():
                        return
                    kind, item = event["type"], event["object"]
                    if kind == "ERROR" or getattr(item, "metadata", None) is None:
                        log.info("Watching %s in %s ended (%s); listing again", self._what, self.namespace, item)
                        version = None
                        break
                    with self._lock:
                        if kind == "DELETED":
                            self.objects.pop(item.metadata.uid, None)
                        else:
                            self.objects[item.metadata.uid] = item
                    version = item.metadata.resource_version or version
                delay = 1.0
            except Exception as exc:  # the API server away, a refused call (410 included): list again
                log.warning("Reading %s in %s failed (%s); listing again", self._what, self.namespace, exc)
                version = None
                self._stop.wait(delay)
                delay = min(delay * 2, 60.0)

    @property
    def _what(self) -> str:
        return self.list_call.__name__.removeprefix("list_namespaced_")


def _pod_report(pod: Any, warnings: dict[str, str]) -> protocol.PodReport:
    status = pod.status
    containers = list(status.container_statuses or []) if status else []
    init = list(status.init_container_statuses or []) if status else []
    waiting = next(
        (
            c.state.waiting.reason
            for c in [*init, *containers]
            if c.state and c.state.waiting and c.state.waiting.reason
        ),
        None,
    )
    terminated = next(
        (
            c.last_state.terminated.reason
            for c in containers
            if c.last_state and c.last_state.terminated and c.last_state.terminated.reason
        ),
        None,
    )
    conditions = {c.type: c.status for c in (status.conditions or [])} if status else {}
    labels = pod.metadata.labels or {}
    return protocol.PodReport(
        name=pod.metadata.name,
        group=labels.get("tether-agent/worker") or labels.get("tether-agent/role"),
        phase=(status.phase if status else None) or "Unknown",
        ready=conditions.get("Ready") == "True",
        restarts=sum(int(c.restart_count or 0) for c in containers),
        last_termination=terminated,
        waiting=waiting,
        warning=warnings.get(pod.metadata.name),
    )


def _latest_warnings(events: list[Any]) -> dict[str, str]:
    """Pod name -> the reason of its latest Warning event."""
    latest: dict[str, tuple[float, str]] = {}
    for event in events:
        involved = event.involved_object
        if event.type != "Warning" or involved is None or involved.kind != "Pod" or not event.reason:
            continue
        moment = event.last_timestamp or event.event_time or event.metadata.creation_timestamp
        at = moment.timestamp() if moment is not None else 0.0
        if involved.name not in latest or at >= latest[involved.name][0]:
            latest[involved.name] = (at, event.reason)
    return {name: reason for name, (_, reason) in latest.items()}


def backend_checks() -> list[protocol.BackendCheck]:
    """Whether the secrets and XCom backends configured here answer (the preflight's checks), each time-bounded."""
    from tether.agent.preflight import secrets_check, xcom_check

    out = []
    for name, check in (("secrets", secrets_check), ("xcom", xcom_check)):
        answer: list[Any] = []
        worker = threading.Thread(target=lambda c=check, a=answer: a.append(c()), daemon=True)
        worker.start()
        worker.join(BACKEND_TIMEOUT)
        if not answer:
            out.append(protocol.BackendCheck(name=name, ok=False, detail=f"no answer within {BACKEND_TIMEOUT:.0f}s"))
        else:
            result = answer[0]
            out.append(protocol.BackendCheck(name=name, ok=result.ok, detail=str(result.detail)[:256]))
    return out


@dataclass
class Sentinel:
    settings: AgentSettings
    namespace: str
    pods: Mirror
    events: Mirror
    check_backends: Callable[[], list[protocol.BackendCheck]] = backend_checks
    interval: float = DEFAULT_INTERVAL
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)

    def report(self) -> protocol.SentinelReport:
        warnings = _latest_warnings(self.events.snapshot())
        pods = sorted((_pod_report(p, warnings) for p in self.pods.snapshot()), key=lambda p: p.name)
        return protocol.SentinelReport(
            name=self.settings.name,
            namespace=self.namespace,
            pods=pods[:1000],
            backends=self.check_backends(),
        )

    def stop(self) -> None:
        self._stopped.set()

    async def run(self) -> int:
        from tether.agent.client import PlaneClient, backoff_for, make_http_client

        client = PlaneClient(make_http_client(self.settings))
        backoff = backoff_for(self.settings)
        self.pods.start()
        self.events.start()
        await asyncio.to_thread(self.pods.synced.wait, 30)
        await asyncio.to_thread(self.events.synced.wait, 5)
        log.info("Sentinel watching the agent pods of namespace %s (%s)", self.namespace, self.pods.label_selector)
        try:
            while not self._stopped.is_set():
                delay = self.interval
                try:
                    body = await asyncio.to_thread(self.report)
                    answer = await client.sentinel.report(body)
                    self.interval = delay = max(1.0, answer.interval)
                    backoff.reset()
                    log.info("Reported %d pod(s) of %s; next report in %.0fs", len(body.pods), self.namespace, delay)
                except Exception as exc:  # the plane away or refusing: the next report is due anyway
                    delay = backoff.next_delay()
                    log.warning("Could not report to the plane (%s); trying again in %.0fs", exc, delay)
                try:
                    await asyncio.wait_for(self._stopped.wait(), delay)
                except TimeoutError:
                    pass
        finally:
            self.pods.stop()
            self.events.stop()
            await client.aclose()
        return 0


def make(settings: AgentSettings, namespace: str | None, selector: str) -> Sentinel:
    api = kubernetes_api()
    ns = namespace or own_namespace()
    return Sentinel(
        settings=settings,
        namespace=ns,
        pods=Mirror(api.list_namespaced_pod, ns, label_selector=selector),
        events=Mirror(api.list_namespaced_event, ns),
    )


def run(settings: AgentSettings, namespace: str | None, selector: str) -> int:
    import signal

    async def main() -> int:
        sentinel = make(settings, namespace, selector)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, sentinel.stop)
        return await sentinel.run()

    return asyncio.run(main())
