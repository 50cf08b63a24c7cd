"""Agent token text: ``tether_<id>_<secret>``.

The prefix makes a leaked token recognisable (secret scanners, logs); the short
id finds its row without revealing anything; the secret is 32 random bytes
(256 bits). Only a SHA-256 of the whole text is stored: with that much entropy a
slow password hash buys nothing and would cost every agent request.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

PREFIX = "tether_"
_ID_BYTES = 5
_SECRET_BYTES = 32
_PATTERN = re.compile(r"^tether_(?P<id>[0-9a-f]{10})_(?P<secret>[A-Za-z0-9_-]{43})$")


class MalformedToken(ValueError):
    """The text is not shaped like an agent token."""


@dataclass(frozen=True)
class IssuedToken:
    id: str
    text: str
    secret_hash: str

    @property
    def short(self) -> str:
        return short_form(self.id)


def short_form(token_id: str) -> str:
    """What may be shown of a token after creation: prefix and id, never the secret."""
    return f"{PREFIX}{token_id}_…"


def hash_token(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def issue() -> IssuedToken:
    token_id = secrets.token_hex(_ID_BYTES)
    secret = base64.urlsafe_b64encode(secrets.token_bytes(_SECRET_BYTES)).decode().rstrip("=")
    text = f"{PREFIX}{token_id}_{secret}"
    return IssuedToken(id=token_id, text=text, secret_hash=hash_token(text))


def parse_id(text: str) -> str:
    """Return the token id, or raise MalformedToken without echoing the secret."""
    match = _PATTERN.match(text)
    if not match:
        raise MalformedToken("the bearer token is not a Tether agent token (expected tether_<id>_<secret>)")
    return match.group("id")


def matches(text: str, secret_hash: str) -> bool:
    return hmac.compare_digest(hash_token(text), secret_hash)
