"""Where the server may send its own requests (SPEC R31, PROTOCOL.md v1.1).

The engine calls every host's ``agent_url`` (health checks, VM start/stop/migrate) and
asks neighbours to probe a host's ``address``. Both come from the agent, so both are
checked against the networks an installation allows:

* setting ``HADASH_AGENT_NETWORKS``: a list of CIDR strings (``["10.0.0.0/8",
  "fd00::/8"]``); unset or ``None`` means :data:`DEFAULT_AGENT_NETWORKS` (loopback and
  the private ranges). Settings read it from the environment and may import the
  default from here (this module imports nothing but the standard library at load
  time);
* link-local (``169.254.0.0/16``, ``fe80::/10`` — cloud metadata services live there),
  unspecified (``0.0.0.0``, ``::``), multicast and broadcast addresses are **never**
  allowed, even when a listed network contains them;
* an IPv4-mapped IPv6 address (``::ffff:10.0.0.1``) is judged as the IPv4 address;
* a DNS name is resolved and **every** address it resolves to must be allowed. This
  happens at ``connect`` and again before each server→agent call
  (``hosts.agent_http``), so a name that later resolves elsewhere is refused then.
  (Between that check and the HTTP client's own lookup a name could still change —
  use IP literals where that matters.)

Pure functions apart from the DNS lookup; nothing here touches the database.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from functools import lru_cache
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Loopback and the private ranges: RFC 1918, IPv6 unique-local (RFC 4193).
DEFAULT_AGENT_NETWORKS: tuple[str, ...] = (
    "127.0.0.0/8",
    "::1/128",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "fc00::/7",
)

# Never allowed, whatever HADASH_AGENT_NETWORKS says.
LINK_LOCAL = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"))

MAX_URL_LENGTH = 1024
# A base path: segments of unreserved characters, optionally ending in "/".
_BASE_PATH = re.compile(r"(?:/[A-Za-z0-9._~-]+)*/?")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


class AddressRefused(ValueError):
    """An agent_url or address the server must not call; ``str()`` says why."""


def parse_networks(values) -> tuple[IPNetwork, ...]:
    """CIDR strings → networks. Raises ValueError naming a bad entry (settings use
    this to fail at start-up rather than at the first connect)."""
    if isinstance(values, str):
        values = [v for v in re.split(r"[\s,]+", values) if v]
    out = []
    for value in values:
        try:
            out.append(ipaddress.ip_network(str(value).strip(), strict=False))
        except ValueError as exc:
            raise ValueError(
                f"HADASH_AGENT_NETWORKS: {value!r} is not a network in CIDR notation "
                f"(e.g. 10.0.0.0/8): {exc}"
            ) from None
    return tuple(out)


@lru_cache(maxsize=8)
def _networks(values: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    return parse_networks(values)


def agent_networks() -> tuple[IPNetwork, ...]:
    """The allowed networks in force (``settings.HADASH_AGENT_NETWORKS`` or the
    default)."""
    from django.conf import settings

    configured = getattr(settings, "HADASH_AGENT_NETWORKS", None)
    if configured is None:
        configured = DEFAULT_AGENT_NETWORKS
    elif isinstance(configured, str):
        configured = tuple(v for v in re.split(r"[\s,]+", configured) if v)
    return _networks(tuple(str(v) for v in configured))


def _describe(networks: tuple[IPNetwork, ...]) -> str:
    return ", ".join(str(n) for n in networks) or "none"


def ip_problem(ip: IPAddress, networks: tuple[IPNetwork, ...] | None = None) -> str | None:
    """Why the server must not call ``ip``, or None when it may."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in n for n in LINK_LOCAL) or ip.is_link_local:
        return f"{ip} is link-local, which is never allowed"
    if ip.is_unspecified:
        return f"{ip} is the unspecified address"
    if ip.is_multicast:
        return f"{ip} is a multicast address"
    if isinstance(ip, ipaddress.IPv4Address) and ip == ipaddress.IPv4Address("255.255.255.255"):
        return f"{ip} is the broadcast address"
    networks = agent_networks() if networks is None else networks
    if not any(ip.version == n.version and ip in n for n in networks):
        return f"{ip} is outside HADASH_AGENT_NETWORKS ({_describe(networks)})"
    return None


def _resolve(name: str) -> list[IPAddress]:
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as exc:
        raise AddressRefused(f"{name!r} does not resolve ({exc})") from None
    out: list[IPAddress] = []
    for info in infos:
        try:
            ip = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        except ValueError:
            continue
        if ip not in out:
            out.append(ip)
    if not out:
        raise AddressRefused(f"{name!r} resolves to no address")
    return out


def host_problem(host: str, networks: tuple[IPNetwork, ...] | None = None, *,
                 resolve: bool = True) -> str | None:
    """Why the server must not call the host ``host`` (an IP literal or a DNS name),
    or None when it may. A DNS name is resolved (``resolve=False``: only its form is
    checked) and every address it resolves to must be allowed."""
    if not host:
        return "no host given"
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        ip = None
    if ip is not None:
        return ip_problem(ip, networks)
    name = host.rstrip(".")
    labels = name.split(".")
    if (
        len(name) > 253
        or not all(_LABEL.fullmatch(label) for label in labels)
        # inet_aton would read "127.1" or "0x7f000001" as an address: not a DNS name
        or labels[-1].isdigit()
        or labels[-1].lower().startswith("0x")
    ):
        return f"{host!r} is neither an IP address nor a DNS name"
    if not resolve:
        return None
    try:
        addresses = _resolve(name)
    except AddressRefused as exc:
        return str(exc)
    for ip in addresses:
        problem = ip_problem(ip, networks)
        if problem:
            return f"{host} resolves to {problem}"
    return None


def url_problem(url: str, networks: tuple[IPNetwork, ...] | None = None, *,
                resolve: bool = True) -> str | None:
    """Why ``url`` is not an agent_url the server may call (R31), or None.

    http or https; no user or password; no query and no fragment (not even an empty
    ``?`` or ``#``); a path only as a base path (``/agents/kvm-01``) — every path the
    server requests is its own, appended to it; the host inside the allowed networks."""
    if not isinstance(url, str) or not url:
        return "must be an http:// or https:// URL"
    if len(url) > MAX_URL_LENGTH:
        return f"is too long ({len(url)} characters, at most {MAX_URL_LENGTH})"
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url) or not url.isascii():
        return "must be plain ASCII without spaces or control characters"
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError on a bad port
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    if parts.scheme not in ("http", "https"):
        return "must be an http:// or https:// URL"
    if "@" in parts.netloc or parts.username is not None or parts.password is not None:
        return "must not contain a user or password"
    if "?" in url:
        return "must not have a query (?…)"
    if "#" in url:
        return "must not have a fragment (#…)"
    if not parts.hostname:
        return "must name a host"
    if port == 0:
        return "must not use port 0"
    if not _BASE_PATH.fullmatch(parts.path) or any(
        seg in (".", "..") for seg in parts.path.split("/")
    ):
        return ("may have a path only as a base path (letters, digits and . _ ~ - "
                "between slashes, no . or .. segments)")
    problem = host_problem(parts.hostname, networks, resolve=resolve)
    if problem:
        return f"host not allowed: {problem}"
    return None


def address_problem(address: str, networks: tuple[IPNetwork, ...] | None = None, *,
                    resolve: bool = True) -> str | None:
    """Why a host's ``address`` (what neighbours probe in check-on-host) is not
    allowed, or None. Empty means "not given" and is allowed (nothing is probed)."""
    if address == "":
        return None
    return host_problem(address, networks, resolve=resolve)
