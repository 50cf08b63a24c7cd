from __future__ import annotations

import pytest

from tether import errors
from tether.plane.netaccess import allowed, client_address, parse_cidr, parse_cidrs


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("10.1.2.3/8", "10.0.0.0/8"),
        ("192.0.2.7", "192.0.2.7/32"),
        (" 2001:db8::/32 ", "2001:db8::/32"),
        ("::1", "::1/128"),
    ],
)
def test_cidrs_are_parsed_and_normalised(text: str, expected: str) -> None:
    assert str(parse_cidr(text)) == expected


@pytest.mark.parametrize(
    "text", ["", "10.0.0.0/33", "300.1.1.1", "10.0.0", "example.com", "2001:db8::/129", "1.2.3.4/x"]
)
def test_invalid_cidrs_are_refused_naming_the_text(text: str) -> None:
    with pytest.raises(errors.Invalid) as info:
        parse_cidr(text)
    assert repr(text) in info.value.detail
    assert info.value.status_code == 422


def test_duplicates_collapse() -> None:
    assert [str(n) for n in parse_cidrs(["10.0.0.0/8", "10.9.9.9/8", "::1"])] == ["10.0.0.0/8", "::1/128"]


def test_empty_list_allows_any_address() -> None:
    assert allowed("203.0.113.9", [])
    assert allowed("2001:db8::1", [])


def test_ipv4_and_ipv6_ranges_are_enforced() -> None:
    ranges = parse_cidrs(["203.0.113.0/24", "2001:db8::/32"])
    assert allowed("203.0.113.9", ranges)
    assert allowed("2001:db8:1::5", ranges)
    assert not allowed("198.51.100.1", ranges)
    assert not allowed("2001:db9::1", ranges)
    assert not allowed("not-an-address", ranges)
    # An IPv4 client seen through a dual-stack socket is matched as IPv4.
    assert allowed("::ffff:203.0.113.9", ranges)


PROXIES = parse_cidrs(["10.0.0.0/8"])


def test_forwarded_for_is_ignored_from_an_untrusted_peer() -> None:
    assert client_address("198.51.100.7", "203.0.113.9", PROXIES) == "198.51.100.7"


def test_forwarded_for_is_believed_from_a_trusted_proxy() -> None:
    assert client_address("10.1.1.1", "203.0.113.9", PROXIES) == "203.0.113.9"


def test_the_nearest_untrusted_hop_is_the_client() -> None:
    # The client wrote a fake first hop; the proxies appended what they saw.
    assert client_address("10.1.1.1", "1.1.1.1, 203.0.113.9, 10.2.2.2", PROXIES) == "203.0.113.9"


def test_all_hops_trusted_falls_back_to_the_peer() -> None:
    assert client_address("10.1.1.1", "10.3.3.3", PROXIES) == "10.1.1.1"


def test_no_trusted_proxies_means_the_socket_decides() -> None:
    assert client_address("127.0.0.1", "203.0.113.9", []) == "127.0.0.1"
