"""The values.yaml of the tether-agent Helm chart, made on the plane for a new set of agents.

``airflow tether agents values`` prints it, and the UI's register flow must offer the very same
file: both call ``agent_values``. What the plane knows is filled in (its URL from
``[api] base_url``, the token Secret's name, queues, slots). What only the user knows (the
secrets and XCom backends, and the plane's URL when ``[api] base_url`` is not set) is left
empty with a comment above it, and the chart refuses to install until it is filled in: a
downloaded file never installs half-configured.
"""

from __future__ import annotations

import ipaddress
import json
import re
import textwrap
from collections.abc import Sequence
from typing import NamedTuple
from urllib.parse import urlsplit

from tether import errors

DEFAULT_TOKEN_SECRET_NAME = "tether-agent-token"
DEFAULT_SLOTS = 4

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_PREFIX = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$")
_CLASS_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class MissingValue(NamedTuple):
    """A value of the file that only the user can give, and what to put there."""

    name: str
    hint: str


class AgentValues(NamedTuple):
    """The values file, the values the user still has to fill in, and warnings about the plane."""

    text: str
    missing: tuple[MissingValue, ...]
    warnings: tuple[str, ...]


SECRET_BACKEND = MissingValue(
    "secretBackend",
    "the class of the secrets backend tasks read connections and variables from, "
    "e.g. airflow.providers.hashicorp.secrets.vault.VaultBackend",
)
XCOM_BACKEND = MissingValue(
    "xcomBackend",
    "the class of the XCom backend tasks write XCom values to, "
    "e.g. airflow.providers.common.io.xcom.backend.XComObjectStorageBackend",
)
PLANE_URL = MissingValue(
    "planeURL",
    "the URL at which the agents reach this plane's Airflow API server, e.g. https://airflow.example.com",
)

HEADER = """\
# values.yaml for the tether-agent Helm chart (chart/tether-agent), made by
# `airflow tether agents values` for this plane. Values under a "Fill in" comment are
# yours to give: the chart refuses to install until they are set. Then:
#   kubectl create namespace {namespace}
#   kubectl label namespace {namespace} pod-security.kubernetes.io/enforce=restricted
#   {helm_install}

"""

PREFIX = """\
# Prefix of every object's name.
resourceNamePrefix: {prefix}
"""

PLANE_URL_KNOWN = """\
# The plane's API server, as the agents reach it (outbound HTTPS): its [api] base_url.
planeURL: {plane_url}

"""

PLANE_URL_UNKNOWN = """\
{fill_in}
# The plane cannot say: its [api] base_url is not set.
planeURL: ""

"""

BODY = """\
# The namespace exists before the install, since the token Secret goes there first.
namespace: {namespace}
createNamespace: false
{prefix}
# The agent token, from an existing Secret with key `token`. Create the token with
#   airflow tether tokens create --name {namespace}
# and the Secret with
#   kubectl -n {namespace} create secret generic {secret_name} --from-literal=token=<the token>
agentTokenSecretName: {secret_name}

# Secrets and XCom values stay with the agents, so both backends are yours to give.
{secret_backend}
# Keyword arguments of the secrets backend, e.g. {{url: "https://vault:8200", mount_point: airflow}}.
secretBackendKwargs: {{}}
{xcom_backend}
# Airflow settings of the XCom backend as {{section: {{option: value}}}},
# e.g. {{common.io: {{xcom_objectstorage_path: "s3://bucket/xcom"}}}}.
xcomBackendSettings: {{}}

# Where the agents get DAG files: [dag_processor] dag_bundle_config_list as a list of
# {{name, classpath, kwargs}} (empty: Airflow's default, the dags folder of the image).
dagBundleConfigList: []

workers:
  - name: default
    queues: [{queues}]
    replicas: 1
    slots: {slots}
"""


def helm_install_command(namespace: str, chart: str = "<chart>") -> str:
    """The ``helm install`` line that installs agents with the values file in ``namespace``."""
    return f"helm install tether-agent {chart} -n {namespace} -f values.yaml"


def _quoted(text: str) -> str:
    """A YAML scalar that reads back as exactly this text (a JSON string is one)."""
    return json.dumps(text)


def _fill_in(value: MissingValue) -> str:
    """The comment above a value the user has to fill in."""
    return textwrap.fill(f"Fill in: {value.hint}.", width=96, initial_indent="# ", subsequent_indent="# ")


def _backend(value: MissingValue, given: str) -> str:
    """The backend's line, under a "Fill in" comment while the user has not given it."""
    if given:
        return f"{value.name}: {_quoted(given)}"
    return f'{_fill_in(value)}\n{value.name}: ""'


def _refuse(message: str) -> errors.Invalid:
    return errors.Invalid(message, reason="invalid_agent_values")


def _is_loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def agent_values(
    *,
    plane_url: str | None,
    namespace: str,
    queues: Sequence[str],
    slots: int = DEFAULT_SLOTS,
    agent_token_secret_name: str = DEFAULT_TOKEN_SECRET_NAME,
    resource_name_prefix: str = "",
    secret_backend: str = "",
    xcom_backend: str = "",
) -> AgentValues:
    """Build the values file for agents in ``namespace`` serving ``queues``.

    Args:
        plane_url: the plane's ``[api] base_url`` (``configured_plane_url()``); None or empty
            when it is not set, and ``planeURL`` is then left for the user.
        namespace: Kubernetes namespace the agents go to.
        queues: queues the agents serve; blanks are dropped.
        slots: task slots per agent.
        agent_token_secret_name: the Secret holding the agent token under the key ``token``.
        resource_name_prefix: prefix of every object's name (empty: the release name).
        secret_backend: class of the agents' secrets backend (empty: left for the user).
        xcom_backend: class of the agents' XCom backend (empty: left for the user).

    Raises:
        tether.errors.Invalid: a namespace, queue, slots or Secret name the chart would refuse.
    """
    if len(namespace) > 63 or not _DNS_LABEL.match(namespace):
        raise _refuse(
            f"namespace {namespace!r} is not a Kubernetes namespace name: use at most 63 lower-case "
            "letters, digits and '-', starting and ending with a letter or digit"
        )
    queue_names = [q.strip() for q in queues if q.strip()]
    if not queue_names:
        raise _refuse("queues is empty: name at least one queue the agents serve, e.g. default")
    if slots < 1:
        raise _refuse(f"slots is {slots}: set it to 1 or more, the number of tasks an agent runs at once")
    if len(agent_token_secret_name) > 253 or not _DNS_SUBDOMAIN.match(agent_token_secret_name):
        raise _refuse(
            f"agentTokenSecretName {agent_token_secret_name!r} is not a Kubernetes Secret name: use "
            "lower-case letters, digits, '-' and '.'"
        )
    if len(resource_name_prefix) > 20 or not _PREFIX.match(resource_name_prefix):
        raise _refuse(
            f"resourceNamePrefix {resource_name_prefix!r} is not a name prefix the chart takes: use at most 20 "
            "lower-case letters, digits and '-', starting and ending with a letter or digit"
        )
    for option, given in (("secretBackend", secret_backend), ("xcomBackend", xcom_backend)):
        if given and not _CLASS_PATH.match(given):
            raise _refuse(f"{option} {given!r} is not a dotted Python path, e.g. package.module.ClassName")

    missing: list[MissingValue] = []
    warnings: list[str] = []
    url = (plane_url or "").strip().rstrip("/")
    if url:
        plane_url_block = PLANE_URL_KNOWN.format(plane_url=_quoted(url))
        host = urlsplit(url).hostname or ""
        if _is_loopback(host):
            warnings.append(
                f"[api] base_url is {url}, a loopback address agents in another network cannot reach: "
                "set planeURL to the URL at which they reach the API server"
            )
    else:
        missing.append(PLANE_URL)
        plane_url_block = PLANE_URL_UNKNOWN.format(fill_in=_fill_in(PLANE_URL))
        warnings.append(
            "[api] base_url is not set on this plane, so planeURL is left empty: fill it in, "
            "and set [api] base_url so the next values file has it"
        )
    missing += [value for value, given in ((SECRET_BACKEND, secret_backend), (XCOM_BACKEND, xcom_backend)) if not given]

    text = (
        HEADER.format(namespace=namespace, helm_install=helm_install_command(namespace))
        + plane_url_block
        + BODY.format(
            namespace=namespace,
            secret_name=agent_token_secret_name,
            prefix=PREFIX.format(prefix=_quoted(resource_name_prefix)) if resource_name_prefix else "",
            secret_backend=_backend(SECRET_BACKEND, secret_backend),
            xcom_backend=_backend(XCOM_BACKEND, xcom_backend),
            queues=", ".join(_quoted(q) for q in queue_names),
            slots=slots,
        )
    )
    return AgentValues(text=text, missing=tuple(missing), warnings=tuple(warnings))


def configured_plane_url() -> str | None:
    """The plane's public URL as Airflow knows it: ``[api] base_url``, or None when it is not set."""
    from airflow.configuration import conf

    value = conf.get("api", "base_url", fallback=None)
    return value or None
