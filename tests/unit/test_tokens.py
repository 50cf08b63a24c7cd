from __future__ import annotations

import math

import pytest

from tether.plane import tokens


def test_issued_token_has_prefix_id_and_256_bits_of_secret() -> None:
    issued = tokens.issue()
    assert issued.text.startswith("tether_")
    assert tokens.parse_id(issued.text) == issued.id
    secret = issued.text.split("_", 2)[2]
    # 43 base64url characters carry 258 bits; the generator draws 32 random bytes.
    assert len(secret) * math.log2(64) >= 256


def test_only_the_hash_is_kept_and_it_matches_only_the_token() -> None:
    issued = tokens.issue()
    assert issued.text not in issued.secret_hash
    assert tokens.matches(issued.text, issued.secret_hash)
    other = tokens.issue()
    assert not tokens.matches(other.text, issued.secret_hash)


def test_tokens_are_unique() -> None:
    assert len({tokens.issue().text for _ in range(200)}) == 200


@pytest.mark.parametrize(
    "text",
    ["", "tether_", "Bearer x", "tether_zzzzzzzzzz_" + "a" * 43, "tether_0123456789_short", "x" * 10_000],
)
def test_malformed_tokens_are_refused_without_echoing_them(text: str) -> None:
    with pytest.raises(tokens.MalformedToken) as info:
        tokens.parse_id(text)
    assert text[8:] not in str(info.value) or not text[8:]


def test_short_form_never_shows_the_secret() -> None:
    issued = tokens.issue()
    short = tokens.short_form(issued.id)
    assert short.startswith(f"tether_{issued.id}")
    assert issued.text.split("_", 2)[2] not in short
