"""A stand-in Kubernetes API server on loopback: pods and events of namespaces, listed and watched.

It answers the calls ``tether-agent sentinel`` makes through the official
``kubernetes`` client as the Kubernetes API documents them: ``GET
/api/v1/namespaces/{ns}/pods`` and ``.../events`` return a ``PodList`` /
``EventList`` with a ``resourceVersion`` (pods filtered by ``labelSelector``);
with ``watch=true`` the response is a chunked stream of ``{"type", "object"}``
lines for every change after ``resourceVersion``, held open until
``timeoutSeconds``, and a version older than the changes kept gets a 410
``Expired`` status event, after which a client must list again. Requests need
the bearer token of the kubeconfig it writes.
"""

from __future__ import annotations

import copy
import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

TOKEN = "standin-service-account-token"
KINDS = {"pods": ("Pod", "PodList"), "events": ("Event", "EventList")}


def now_text() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def pod(
    name: str,
    *,
    namespace: str = "agents",
    labels: dict[str, str] | None = None,
    phase: str = "Running",
    ready: bool = True,
    restarts: int = 0,
    last_terminated: str | None = None,
    waiting: str | None = None,
) -> dict[str, Any]:
    """A Pod as the API returns it, with one container named agent."""
    state: dict[str, Any] = (
        {"waiting": {"reason": waiting, "message": f"{waiting} for container agent"}}
        if waiting
        else {"running": {"startedAt": now_text()}}
    )
    last: dict[str, Any] = {}
    if last_terminated:
        code = 137 if last_terminated == "OOMKilled" else 1
        last = {
            "terminated": {
                "exitCode": code,
                "reason": last_terminated,
                "startedAt": now_text(),
                "finishedAt": now_text(),
                "containerID": "containerd://" + uuid.uuid4().hex,
            }
        }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": str(uuid.uuid4()),
            "labels": labels or {},
            "creationTimestamp": now_text(),
        },
        "spec": {"containers": [{"name": "agent", "image": "registry.corp.internal/tether-agent:0.2.0"}]},
        "status": {
            "phase": phase,
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": now_text()},
                {"type": "Ready", "status": "True" if ready else "False", "lastTransitionTime": now_text()},
            ],
            "containerStatuses": [
                {
                    "name": "agent",
                    "ready": ready,
                    "restartCount": restarts,
                    "image": "registry.corp.internal/tether-agent:0.2.0",
                    "imageID": "registry.corp.internal/tether-agent@sha256:" + "0" * 64,
                    "started": not waiting,
                    "state": state,
                    "lastState": last,
                }
            ],
        },
    }


def event(pod_name: str, reason: str, *, namespace: str = "agents", kind: str = "Warning") -> dict[str, Any]:
    """A core/v1 Event about a pod, as the kubelet writes them."""
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {
            "name": f"{pod_name}.{uuid.uuid4().hex[:16]}",
            "namespace": namespace,
            "uid": str(uuid.uuid4()),
            "creationTimestamp": now_text(),
        },
        "involvedObject": {"kind": "Pod", "namespace": namespace, "name": pod_name, "apiVersion": "v1"},
        "reason": reason,
        "message": f"{reason} of container agent in pod {pod_name}",
        "type": kind,
        "count": 1,
        "firstTimestamp": now_text(),
        "lastTimestamp": now_text(),
        "source": {"component": "kubelet", "host": "node-1"},
        "reportingComponent": "kubelet",
        "reportingInstance": "node-1",
    }


class StandInApi:
    """The stand-in server's state: objects by (resource, namespace, name), and the changes made to them."""

    def __init__(self) -> None:
        self.version = 100
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        #: (resource version, resource, namespace, type, object)
        self.changes: list[tuple[int, str, str, str, dict[str, Any]]] = []
        #: Changes older than this version are forgotten: a watch from before it gets 410.
        self.oldest = self.version
        self.requests: list[tuple[str, str | None]] = []
        #: 410 Expired answers sent to watches.
        self.expired = 0
        #: While set, new watches wait before they look at their version.
        self.paused = False
        self.watch_generation = 0
        self.cond = threading.Condition()
        handler = type("Handler", (_Handler,), {"api": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def kubeconfig(self, path: Path) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
            "users": [{"name": "sentinel", "user": {"token": TOKEN}}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "sentinel"}}],
            "current-context": "standin",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    def put(self, resource: str, obj: dict[str, Any]) -> None:
        """Add or replace an object (by name), as a controller's write would."""
        with self.cond:
            self.version += 1
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = str(self.version)
            key = (resource, obj["metadata"]["namespace"], obj["metadata"]["name"])
            if key in self.objects:
                obj["metadata"]["uid"] = self.objects[key]["metadata"]["uid"]
            kind = "MODIFIED" if key in self.objects else "ADDED"
            self.objects[key] = obj
            self.changes.append((self.version, resource, key[1], kind, obj))
            self.cond.notify_all()

    def delete(self, resource: str, namespace: str, name: str) -> None:
        with self.cond:
            self.version += 1
            obj = self.objects.pop((resource, namespace, name))
            obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(self.version)}}
            self.changes.append((self.version, resource, namespace, "DELETED", obj))
            self.cond.notify_all()

    def compact(self) -> None:
        """Forget every change so far: watches from an older version must list again (410 Expired)."""
        with self.cond:
            self.oldest = self.version
            self.changes.clear()
            self.cond.notify_all()

    def end_watches(self) -> None:
        """End every open watch, as an API server does at its timeout or on a restart."""
        with self.cond:
            self.watch_generation += 1
            self.cond.notify_all()

    def pause_watches(self, paused: bool) -> None:
        with self.cond:
            self.paused = paused
            self.cond.notify_all()

    def watches(self, resource: str) -> int:
        return sum(1 for path, _ in self.requests if f"/{resource}" in path and "watch=true" in path)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _matches(labels: dict[str, str], selector: str | None) -> bool:
    if not selector:
        return True
    for term in selector.split(","):
        key, _, value = term.partition("=")
        if labels.get(key.strip()) != value.strip():
            return False
    return True


class _Handler(BaseHTTPRequestHandler):
    api: StandInApi
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send_json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.api.requests.append((self.path, self.headers.get("Authorization")))
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self._send_json(401, _status(401, "Unauthorized", "Unauthorized"))
            return
        url = urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        if len(parts) != 5 or parts[:3] != ["api", "v1", "namespaces"] or parts[4] not in KINDS:
            self._send_json(404, _status(404, "NotFound", f"the server could not find {url.path}"))
            return
        namespace, resource = parts[3], parts[4]
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        selector = query.get("labelSelector")
        if query.get("watch") in ("true", "1"):
            self._watch(resource, namespace, selector, int(query.get("resourceVersion") or 0), query)
            return
        with self.api.cond:
            items = [
                obj
                for (res, ns, _), obj in sorted(self.api.objects.items())
                if res == resource and ns == namespace and _matches(obj["metadata"].get("labels") or {}, selector)
            ]
            version = self.api.version
        self._send_json(
            200,
            {
                "kind": KINDS[resource][1],
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(version)},
                "items": items,
            },
        )

    def _watch(self, resource: str, namespace: str, selector: str | None, since: int, query: dict[str, str]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        deadline = time.monotonic() + float(query.get("timeoutSeconds") or 30)
        for line in self._changes(resource, namespace, selector, since, deadline):
            data = (json.dumps(line) + "\n").encode()
            try:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()
            except OSError:
                return
        try:
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass

    def _changes(
        self, resource: str, namespace: str, selector: str | None, since: int, deadline: float
    ) -> Iterator[dict[str, Any]]:
        api = self.api
        seen = since
        with api.cond:
            while api.paused:
                api.cond.wait(0.5)
            generation = api.watch_generation
        while time.monotonic() < deadline:
            with api.cond:
                if api.watch_generation != generation:
                    return
                if seen < api.oldest:
                    api.expired += 1
                    yield {"type": "ERROR", "object": _status(410, "Expired", f"too old resource version: {seen}")}
                    return
                fresh = [c for c in api.changes if c[0] > seen]
                if not fresh:
                    api.cond.wait(min(0.5, max(0.0, deadline - time.monotonic())))
                    continue
            for version, res, ns, kind, obj in fresh:
                seen = version
                if res == resource and ns == namespace and _matches(obj["metadata"].get("labels") or {}, selector):
                    yield {"type": kind, "object": obj}


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
