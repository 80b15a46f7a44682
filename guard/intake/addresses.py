"""Which image URLs and network addresses the guard may fetch from (pure: no network).

Two questions, asked on every hop of every fetch:

* :func:`parse_image_url`: is this URL well-formed, unambiguous and allowed by policy? It is
  parsed once, by ``httpx.URL`` (the same parser the fetch client uses), and refused whenever
  the raw text could be read two ways (userinfo, ``%`` in the host, odd ports, legacy IPv4
  spellings such as ``0x7f000001`` or ``127.1`` that some resolvers expand to loopback).
* :func:`address_allowed`: may the guard open a connection to this resolved address? Only
  globally routable unicast addresses, or addresses inside operator-listed networks.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

import httpx

from guard.config import FetchConfig
from guard.errors import InvalidRequest

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_PORTS = {"http": 80, "https": 443}

# A label that WHATWG/inet_aton would read as a number: decimal, octal (leading 0) or hex.
_NUMERIC_LABEL = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)")
_HOST_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")

# IPv6 ranges that Python's ``is_global`` (3.11) still calls global but that must not be
# fetched from: site-local (deprecated, routed like private) and local-use NAT64 (RFC 8215).
_V6_NOT_PUBLIC = (
    ipaddress.IPv6Network("fec0::/10"),
    ipaddress.IPv6Network("64:ff9b:1::/48"),
)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_V4_COMPATIBLE = ipaddress.IPv6Network("::/96")


@dataclass(frozen=True)
class ParsedURL:
    """A validated http(s) URL, split into what a fetch needs.

    ``host`` is lowercase ASCII (IDNA-encoded) or an IP literal (IPv6 without brackets);
    ``ip`` is set when the host is an IP literal; ``target`` is the request target (path and
    query, at least ``/``, no fragment); ``host_header`` is the ``Host`` header value.
    """

    scheme: str
    host: str
    port: int
    target: str
    host_header: str
    ip: IPAddress | None = None

    @property
    def url(self) -> str:
        """The canonical URL (used to resolve relative redirects)."""
        return f"{self.scheme}://{self.host_header}{self.target}"


def url_text_ok(text: str) -> bool:
    """False if ``text`` holds a backslash, whitespace or a control character.

    Parsers disagree about all of these (``\\`` is ``/`` to browsers and WHATWG, tabs and
    newlines are silently dropped), so a URL holding one is never fetched.
    """
    return not any(
        c == "\\" or c.isspace() or ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in text
    )


def parse_image_url(
    url: str, cfg: FetchConfig, *, param: str, index: int | None = None
) -> ParsedURL:
    """Parse and check an image URL; raise :class:`InvalidRequest` if it may not be fetched."""
    prefix = f"image {index}: " if index is not None else "image: "

    def refuse(why: str) -> InvalidRequest:
        return InvalidRequest(prefix + why, param=param)

    if not url_text_ok(url):
        raise refuse("URL contains whitespace, control characters or backslashes")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, UnicodeError, ValueError):
        raise refuse("invalid URL") from None
    scheme = parsed.scheme
    if scheme not in DEFAULT_PORTS:
        raise refuse("URL scheme must be http or https")
    # The authority as RFC 3986 delimits it in the raw text: "scheme://" up to / ? or #.
    # httpx drops an empty userinfo ("http://@host/") and reads ":+80" as a port, so the raw
    # text is cross-checked against what httpx saw; any disagreement means ambiguity.
    if url[: len(scheme) + 3].lower() != scheme + "://":
        raise refuse("invalid URL")
    rest = url[len(scheme) + 3 :]
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "@" in authority or parsed.userinfo:
        raise refuse("URL must not contain credentials")
    if "%" in authority:
        raise refuse("invalid host in URL")
    try:
        raw_host, port = _split_authority(authority, DEFAULT_PORTS[scheme])
    except ValueError:
        raise refuse("invalid port in URL") from None
    if (parsed.port or DEFAULT_PORTS[scheme]) != port:
        raise refuse("invalid port in URL")
    if not raw_host:
        raise refuse("URL has no host")

    host = parsed.raw_host.decode("ascii")
    ip: IPAddress | None = None
    if raw_host.startswith("["):
        try:
            ip = ipaddress.IPv6Address(host)
            same = ip == ipaddress.IPv6Address(raw_host[1:-1])
        except ValueError:
            raise refuse("invalid host in URL") from None
        if not same:
            raise refuse("invalid host in URL")
        host = ip.compressed
    else:
        if raw_host.lower() not in (host, parsed.host):
            raise refuse("invalid host in URL")
        ip = _ipv4_literal(host)
        if ip is None and not _valid_hostname(host):
            raise refuse("invalid host in URL")

    if cfg.allow_domains and not _domain_allowed(host, ip, cfg.allow_domains):
        raise refuse("URL host is not in the allowed domains")

    shown = f"[{host}]" if isinstance(ip, ipaddress.IPv6Address) else host
    host_header = shown if port == DEFAULT_PORTS[scheme] else f"{shown}:{port}"
    target = parsed.raw_path.decode("ascii") or "/"
    return ParsedURL(scheme, host, port, target, host_header, ip)


def _split_authority(authority: str, default_port: int) -> tuple[str, int]:
    """Split ``host[:port]``; ValueError if the port is malformed or out of range."""
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise ValueError("unclosed bracket")
        host, tail = authority[: end + 1], authority[end + 1 :]
    else:
        host, colon, port_text = authority.partition(":")
        tail = colon + port_text
    if not tail:
        return host, default_port
    digits = tail[1:]
    # ASCII digits only: int() would also take "+80", " 80" or Unicode digits.
    if tail[0] != ":" or not (digits.isascii() and digits.isdigit()) or len(digits) > 5:
        raise ValueError("bad port")
    port = int(digits)
    if not 1 <= port <= 65535:
        raise ValueError("port out of range")
    return host, port


def _ipv4_literal(host: str) -> ipaddress.IPv4Address | None:
    """The address if ``host`` is a canonical dotted quad, else None.

    None also for legacy spellings ("127.1", "0x7f000001"): :func:`_valid_hostname` then
    refuses them, because their last label is numeric.
    """
    labels = host.split(".")
    if not _NUMERIC_LABEL.fullmatch(labels[-1]):
        return None
    try:
        ip = ipaddress.IPv4Address(host)  # refuses leading zeros, short and hex forms
    except ValueError:
        return None
    return ip if str(ip) == host else None


def _valid_hostname(host: str) -> bool:
    if len(host) > 253:
        return False
    labels = host.split(".")
    # WHATWG and inet_aton read a host whose last label is numeric as an IPv4 address
    # ("127.1", "0x7f.1", "2130706433"); no real TLD is numeric, so such names are refused.
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        return False
    return all(_HOST_LABEL.fullmatch(label) for label in labels)


def _domain_allowed(host: str, ip: IPAddress | None, allowed: list[str]) -> bool:
    if ip is not None:  # an IP literal matches only an identical entry, never a suffix
        return any(_normalize_domain(d) == host for d in allowed)
    for entry in allowed:
        domain = _normalize_domain(entry)
        if domain and (host == domain or host.endswith("." + domain)):
            return True
    return False


def _normalize_domain(domain: str) -> str:
    """IDNA-encode a configured domain with the same parser that reads URLs."""
    try:
        return httpx.URL(f"http://{domain}/").raw_host.decode("ascii").strip(".")
    except (httpx.InvalidURL, UnicodeError, ValueError):
        return ""


def address_allowed(ip: IPAddress, cfg: FetchConfig) -> bool:
    """True if the guard may connect to ``ip``: global unicast, or inside allow_networks.

    IPv6 addresses that carry an IPv4 address (6to4, Teredo, NAT64, IPv4-compatible) are
    allowed only if the IPv4 address is allowed too, since traffic may end up there.
    IPv4-mapped addresses (``::ffff:a.b.c.d``) *are* that IPv4 address on a dual-stack socket,
    so they are judged exactly as it.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return False
        if ip.ipv4_mapped is not None:
            return address_allowed(ip.ipv4_mapped, cfg)
    if not (_is_public(ip) or any(ip in net for net in cfg.allow_networks)):
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        return all(address_allowed(v4, cfg) for v4 in _embedded_ipv4(ip))
    return True


def _is_public(ip: IPAddress) -> bool:
    # is_global alone is not enough: Python calls multicast (224/4, ff0e::/16) global.
    if ip.is_multicast or ip.is_unspecified or ip.is_loopback or ip.is_link_local:
        return False
    if ip.is_private or not ip.is_global:
        return False
    if isinstance(ip, ipaddress.IPv4Address):
        return not ip.is_reserved
    return not any(ip in net for net in _V6_NOT_PUBLIC)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    found: list[ipaddress.IPv4Address] = []
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)  # (server, client): both receive the traffic
    if ip in _NAT64 or ip in _V4_COMPATIBLE:
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    return found
