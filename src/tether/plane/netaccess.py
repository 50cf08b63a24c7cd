"""Which address an agent calls from, and whether it may.

The address is the socket's peer, unless that peer is a trusted reverse proxy:
then the nearest ``X-Forwarded-For`` hop that is not itself a trusted proxy is
the client. An untrusted peer's ``X-Forwarded-For`` is ignored entirely - any
client can write that header.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from tether import errors

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_cidr(text: str) -> Network:
    """Parse one IPv4/IPv6 address or CIDR range; refuse with the offending text."""
    candidate = text.strip()
    try:
        network = ipaddress.ip_network(candidate, strict=False)
    except ValueError:
        raise errors.Invalid(
            f"{text!r} is not an IPv4 or IPv6 address or CIDR range (e.g. 203.0.113.0/24, 2001:db8::/32)",
            reason="invalid_cidr",
        ) from None
    return network


def parse_cidrs(texts: Iterable[str]) -> list[Network]:
    networks: list[Network] = []
    for text in texts:
        network = parse_cidr(text)
        if network not in networks:
            networks.append(network)
    return networks


def _address(text: str) -> Address | None:
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _within(address: Address, networks: Sequence[Network]) -> bool:
    return any(address.version == network.version and address in network for network in networks)


def client_address(peer: str | None, forwarded_for: str | None, trusted_proxies: Sequence[Network]) -> str:
    """The address the plane attributes a request to."""
    peer_address = _address(peer or "")
    if peer_address is None:
        return peer or "unknown"
    if not forwarded_for or not _within(peer_address, trusted_proxies):
        return str(peer_address)
    # Walk from the nearest hop outwards; the first hop we do not trust is the client.
    for hop in reversed([h for h in forwarded_for.split(",") if h.strip()]):
        hop_address = _address(hop)
        if hop_address is None:
            return hop.strip()[:64]
        if not _within(hop_address, trusted_proxies):
            return str(hop_address)
    return str(peer_address)


def allowed(address: str, ranges: Sequence[Network]) -> bool:
    """True when ``ranges`` is empty (any address) or holds ``address``."""
    if not ranges:
        return True
    parsed = _address(address)
    return parsed is not None and _within(parsed, ranges)
