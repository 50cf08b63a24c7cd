"""Execution API tokens the agent API hands out, signed as Airflow's executors sign theirs."""

from __future__ import annotations

import functools
import uuid
from typing import Any

from tether import protocol


@functools.cache
def _token_generator() -> Any:
    """Airflow's generator of Execution API tokens, as its executors make it; signed with the API server's key."""
    from airflow.api_fastapi.auth.tokens import JWTGenerator, get_signing_args
    from airflow.configuration import conf

    return JWTGenerator(
        valid_for=conf.getint("execution_api", "jwt_expiration_time"),
        audience=conf.get_mandatory_list_value("execution_api", "jwt_audience")[0],
        issuer=conf.get("api_auth", "jwt_issuer", fallback=None),
        **get_signing_args(make_secret_key_if_needed=False),
    )


def execution_token(subject: uuid.UUID) -> tuple[str, int]:
    """An ``execution``-scoped token for ``subject`` (a triggerer agent process, a callback); its life in s."""
    generator = _token_generator()
    token = generator.generate(extras={"sub": str(subject), "scope": "execution"})
    return str(token), int(generator.valid_for)


def with_execution_tokens(leases: list[protocol.Lease]) -> list[protocol.Lease]:
    """Callbacks' workloads with a token their Connection and Variable lookups may use.

    Airflow gives a callback a ``workload``-scoped token, which its Execution API
    refuses for Connections and Variables; a task exchanges its own for an
    ``execution`` one when it starts, a callback cannot. The callback's job gets
    one here, when an agent leases it.
    """
    for lease in leases:
        workload = lease.workload
        if workload.get("type") == "ExecuteCallback" and isinstance(workload.get("callback"), dict):
            workload["token"], _ = execution_token(uuid.UUID(str(workload["callback"]["id"])))
    return leases
