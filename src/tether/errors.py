"""Tether's exceptions.

TetherError
 ├── ConfigError            a setting is missing or invalid (agent or plane)
 ├── ProtocolError          the other side broke the protocol
 └── PlaneError             a request the plane refuses; carries the HTTP status it maps to
      ├── Unauthorized      401: no, malformed, unknown, expired or revoked agent token
      ├── Forbidden         403: address outside the allowed IP ranges
      ├── NotFound          404: no such agent or job (a deleted agent re-registers)
      ├── Conflict          409: the state forbids it (name taken, not the holder, lease expired)
      └── Invalid           422: well-formed but unacceptable input (limits, bad CIDR)
"""

from __future__ import annotations


class TetherError(Exception):
    """Root of every error Tether raises on purpose."""


class ConfigError(TetherError):
    pass


class ProtocolError(TetherError):
    pass


class PlaneError(TetherError):
    status_code = 400

    def __init__(self, detail: str, *, reason: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.reason = reason


class Unauthorized(PlaneError):
    status_code = 401


class Forbidden(PlaneError):
    status_code = 403


class NotFound(PlaneError):
    status_code = 404


class Conflict(PlaneError):
    status_code = 409


class Invalid(PlaneError):
    status_code = 422
