"""Who is a trusted proxy: addresses and networks (``COMET_TRUSTED_PROXIES``,
``--trusted-proxies``) whose X-Forwarded-For / X-Forwarded-Proto are believed.

Pure: tested in memory.  Addresses are compared as addresses, not as text: a proxy
written ``0:0:0:0:0:0:0:1`` is ``::1``, and an IPv4 proxy reaching a server bound to
``::`` (``::ffff:10.0.0.1``) is its IPv4 address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

# Peers looked up and remembered (a server sees few: its proxies, its clients).
_REMEMBERED = 1000

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def proxy_network(entry: str) -> _Network | None:
    """``entry`` (an address, or a network such as ``10.0.0.0/8``) as a network; None
    when it is neither."""
    try:
        network = ipaddress.ip_network(entry.strip())
    except (ValueError, TypeError):
        return None
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen == 128:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.ip_network(mapped)
    return network


class TrustedProxies:
    """``address in proxies``: whether a peer's (or a hop's) address is trusted."""

    def __init__(self, entries: Iterable[str] = ()):
        networks = []
        for entry in entries:
            network = proxy_network(entry)
            if network is None:
                raise ValueError(f"{entry!r} is no IP address or network")
            networks.append(network)
        self.networks = tuple(networks)
        self._seen: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TrustedProxies) and set(self.networks) == set(other.networks)

    def __hash__(self) -> int:
        return hash(frozenset(self.networks))

    def __repr__(self) -> str:
        return f"TrustedProxies({[str(n) for n in self.networks]!r})"

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, str):
            return False
        trusted = self._seen.get(address)
        if trusted is None:
            trusted = self._look_up(address)
            if len(self._seen) >= _REMEMBERED:
                self._seen.clear()
            self._seen[address] = trusted
        return trusted

    def _look_up(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:  # ("unknown", a hop with a port: never a trusted proxy)
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.networks)
