"""Tether's exceptions.

TetherError
 ├── ConfigError            a setting is missing or invalid (agent or plane)
 ├── PlaneUnavailable       the agent got no usable answer from the plane; it retries with backoff
 │    └── ProtocolError     an answer the agent cannot read as the protocol's (a proxy's page, a broken body)
 ├── PlaneRefused           the plane answered the agent 4xx: the same request will not succeed
 └── PlaneError             a request the plane refuses (raised on the plane); carries the HTTP status it maps to
      ├── VersionRefused    400: a protocol revision outside what the plane serves (ADR 5)
      ├── Unauthorized      401: no, malformed, unknown, expired or revoked agent token
      ├── Forbidden         403: address outside the allowed IP ranges
      ├── NotFound          404: no such agent or job (a deleted agent re-registers)
      ├── Conflict          409: the state forbids it (name taken, not the holder, lease expired)
      ├── TooLarge          413: a body over its route's limit
      └── Invalid           422: well-formed but unacceptable input (limits, bad CIDR)
"""

from __future__ import annotations


class TetherError(Exception):
    """Root of every error Tether raises on purpose."""


class ConfigError(TetherError):
    pass


class PlaneUnavailable(TetherError):
    """The plane could not be reached, answered 5xx, or answered something unreadable; worth retrying."""


class ProtocolError(PlaneUnavailable):
    """An answer that does not follow the protocol: retried like an outage, since a proxy in between or a
    plane being replaced can produce one, and the next answer may be fine."""


class PlaneRefused(TetherError):
    """The plane answered 4xx: retrying the same request will not help."""

    def __init__(self, status: int, detail: str, reason: str) -> None:
        super().__init__(f"{status} {reason}: {detail}")
        self.status = status
        self.detail = detail
        self.reason = reason


class PlaneError(TetherError):
    status_code = 400

    def __init__(self, detail: str, *, reason: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.reason = reason


class VersionRefused(PlaneError):
    status_code = 400


class Unauthorized(PlaneError):
    status_code = 401


class Forbidden(PlaneError):
    status_code = 403


class NotFound(PlaneError):
    status_code = 404


class Conflict(PlaneError):
    status_code = 409


class TooLarge(PlaneError):
    status_code = 413


class Invalid(PlaneError):
    status_code = 422
