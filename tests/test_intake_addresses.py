"""URL and address policy for image fetches: tables of refused and accepted inputs."""

from __future__ import annotations

import ipaddress

import pytest

from guard.config import FetchConfig
from guard.errors import InvalidRequest
from guard.intake.addresses import ParsedURL, address_allowed, parse_image_url

DEFAULT = FetchConfig()

REFUSED_URLS = [
    ("file", "file:///etc/passwd"),
    ("ftp", "ftp://example.com/a.png"),
    ("gopher", "gopher://example.com:70/_x"),
    ("javascript", "javascript:alert(1)"),
    ("no-scheme", "//example.com/a.png"),
    ("relative", "/a.png"),
    ("no-slashes", "http:example.com/a.png"),
    ("empty-host", "http:///a.png"),
    ("userinfo", "http://user@example.com/"),
    ("userinfo-password", "http://user:pw@example.com/"),
    ("empty-userinfo", "http://@example.com/"),
    ("userinfo-to-loopback", "http://example.com@127.0.0.1/"),
    ("backslash-userinfo", "http://example.com\\@127.0.0.1/"),
    ("backslash-path", "http://127.0.0.1\\example.com/"),
    ("space", "http://example.com/a b.png"),
    ("tab-in-host", "http://exam\tple.com/"),
    ("newline", "http://example.com/\na.png"),
    ("nul", "http://example.com\x00.evil/"),
    ("c1-control", "http://example.com/\x85"),
    ("nbsp", "http://example.com/\xa0"),
    ("hex-ipv4", "http://0x7f000001/"),
    ("decimal-ipv4", "http://2130706433/"),
    ("short-ipv4", "http://127.1/"),
    ("octal-ipv4", "http://0177.0.0.1/"),
    ("leading-zero-ipv4", "http://127.0.0.01/"),
    ("zero", "http://0/"),
    ("hex-label", "http://0x7f.0.0.1/"),
    ("five-labels", "http://1.2.3.4.5/"),
    ("ipv4-trailing-dot", "http://127.0.0.1./"),
    ("name-trailing-dot", "http://example.com./"),
    ("numeric-tld", "http://example.123/"),
    ("empty-label", "http://a..example.com/"),
    ("percent-host", "http://%31%32%37.0.0.1/"),
    ("ipv6-zone", "http://[fe80::1%25eth0]/"),
    ("ipv6-unclosed", "http://[::1/"),
    ("ipv6-junk", "http://[::1]x/"),
    ("ipv4-in-brackets", "http://[127.0.0.1]/"),
    ("port-zero", "http://example.com:0/"),
    ("port-too-big", "http://example.com:65536/"),
    ("port-plus", "http://example.com:+80/"),
    ("port-empty", "http://example.com:/"),
    ("port-letters", "http://example.com:8o/"),
    ("ideographic-dot", "http://example\u3002com/"),
    ("bad-host-char", "http://exa!mple.com/"),
]


@pytest.mark.parametrize("url", [u for _, u in REFUSED_URLS], ids=[i for i, _ in REFUSED_URLS])
def test_refused_urls(url: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_image_url(url, DEFAULT, param="messages[0].content[1].image_url.url", index=1)
    assert info.value.param == "messages[0].content[1].image_url.url"
    assert info.value.message.startswith("image 1: ")
    assert "127" not in info.value.message  # the message never echoes the URL


V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address
P = ParsedURL
ACCEPTED_URLS = [
    ("plain", "http://example.com/a.png", P("http", "example.com", 80, "/a.png", "example.com")),
    ("https", "https://example.com", P("https", "example.com", 443, "/", "example.com")),
    ("case-and-fragment", "HTTP://Img.Example.COM/A.png?x=1#frag",
     P("http", "img.example.com", 80, "/A.png?x=1", "img.example.com")),
    ("explicit-default-port", "https://example.com:443/a",
     P("https", "example.com", 443, "/a", "example.com")),
    ("other-port", "http://example.com:8080/a",
     P("http", "example.com", 8080, "/a", "example.com:8080")),
    ("idna", "http://bücher.example/a.png",
     P("http", "xn--bcher-kva.example", 80, "/a.png", "xn--bcher-kva.example")),
    ("underscore", "http://my_bucket.example.com/a",
     P("http", "my_bucket.example.com", 80, "/a", "my_bucket.example.com")),
    ("ipv4", "http://8.8.8.8/a", P("http", "8.8.8.8", 80, "/a", "8.8.8.8", V4("8.8.8.8"))),
    ("ipv6", "http://[2606:4700:4700::1111]:8080/a",
     P("http", "2606:4700:4700::1111", 8080, "/a", "[2606:4700:4700::1111]:8080",
       V6("2606:4700:4700::1111"))),
    ("percent-path", "http://example.com/a%20b.png",
     P("http", "example.com", 80, "/a%20b.png", "example.com")),
]  # fmt: skip


@pytest.mark.parametrize(
    ("url", "expected"), [c[1:] for c in ACCEPTED_URLS], ids=[c[0] for c in ACCEPTED_URLS]
)
def test_accepted_urls(url: str, expected: ParsedURL) -> None:
    assert parse_image_url(url, DEFAULT, param="p") == expected


def test_parsed_url_round_trips() -> None:
    parsed = parse_image_url("http://[::1]:8080/x?y=1", DEFAULT, param="p")
    assert parsed.url == "http://[::1]:8080/x?y=1"
    assert parse_image_url(parsed.url, DEFAULT, param="p") == parsed


ALLOW_DOMAINS = [
    ("exact", "http://images.example.com/a", True),
    ("subdomain", "http://cdn.images.example.com/a", True),
    ("uppercase", "http://CDN.Images.Example.com/a", True),
    ("idna-entry", "http://xn--bcher-kva.example/a", True),
    ("suffix-not-label", "http://evilimages.example.com/a", False),
    ("parent", "http://example.com/a", False),
    ("other", "http://example.org/a", False),
    ("ip-literal-listed", "http://93.184.215.14/a", True),
    ("ip-literal-suffix", "http://1.93.184.215.14/a", False),
    ("ip-literal-unlisted", "http://8.8.8.8/a", False),
]


@pytest.mark.parametrize(
    ("url", "allowed"), [c[1:] for c in ALLOW_DOMAINS], ids=[c[0] for c in ALLOW_DOMAINS]
)
def test_allow_domains(url: str, allowed: bool) -> None:
    cfg = FetchConfig(allow_domains=["Images.Example.com.", "bücher.example", "93.184.215.14"])
    if allowed:
        parse_image_url(url, cfg, param="p")
    else:
        with pytest.raises(InvalidRequest, match=r"allowed domains|invalid host"):
            parse_image_url(url, cfg, param="p")


ADDRESSES = [
    ("loopback", "127.0.0.1", False),
    ("loopback-other", "127.255.0.9", False),
    ("private-10", "10.0.0.1", False),
    ("private-172", "172.16.5.4", False),
    ("private-192", "192.168.1.1", False),
    ("metadata", "169.254.169.254", False),
    ("cgnat", "100.64.0.1", False),
    ("unspecified", "0.0.0.0", False),
    ("this-network", "0.1.2.3", False),
    ("multicast", "224.0.0.1", False),
    ("multicast-global", "239.255.255.250", False),
    ("reserved", "240.0.0.1", False),
    ("broadcast", "255.255.255.255", False),
    ("documentation", "192.0.2.1", False),
    ("benchmark", "198.18.0.1", False),
    ("v6-loopback", "::1", False),
    ("v6-unspecified", "::", False),
    ("v6-link-local", "fe80::1", False),
    ("v6-unique-local", "fc00::1", False),
    ("v6-site-local", "fec0::1", False),
    ("v6-multicast", "ff0e::1", False),
    ("v6-documentation", "2001:db8::1", False),
    ("mapped-private", "::ffff:10.0.0.1", False),
    ("mapped-loopback", "::ffff:127.0.0.1", False),
    ("compatible-loopback", "::127.0.0.1", False),
    ("6to4-loopback", "2002:7f00:1::", False),
    ("6to4-private", "2002:a00:1::1", False),
    ("nat64-private", "64:ff9b::a00:1", False),
    ("nat64-metadata", "64:ff9b::a9fe:a9fe", False),
    ("nat64-local-use", "64:ff9b:1::808:808", False),
    ("teredo", "2001:0:4136:e378:8000:63bf:3fff:fdd2", False),
    ("public-v4", "8.8.8.8", True),
    ("public-v4-other", "93.184.215.14", True),
    ("public-v6", "2606:4700:4700::1111", True),
    ("mapped-public", "::ffff:8.8.8.8", True),
    ("6to4-public", "2002:808:808::1", True),
    ("nat64-public", "64:ff9b::808:808", True),
]


@pytest.mark.parametrize(
    ("address", "allowed"), [c[1:] for c in ADDRESSES], ids=[c[0] for c in ADDRESSES]
)
def test_address_allowed(address: str, allowed: bool) -> None:
    assert address_allowed(ipaddress.ip_address(address), DEFAULT) is allowed


ALLOW_NETWORKS = [
    ("listed", "10.1.2.3", True),
    ("listed-mapped", "::ffff:10.1.2.3", True),
    ("listed-nat64", "64:ff9b::a01:203", True),
    ("outside", "10.2.0.1", False),
    ("loopback-still-refused", "127.0.0.1", False),
    ("listed-v6", "fd00::5", True),
    ("v6-outside", "fd01::5", False),
    ("public-still-allowed", "8.8.8.8", True),
]


@pytest.mark.parametrize(
    ("address", "allowed"), [c[1:] for c in ALLOW_NETWORKS], ids=[c[0] for c in ALLOW_NETWORKS]
)
def test_allow_networks(address: str, allowed: bool) -> None:
    cfg = FetchConfig(allow_networks=["10.1.0.0/16", "fd00::/120"])
    assert address_allowed(ipaddress.ip_address(address), cfg) is allowed


def test_scoped_ipv6_refused() -> None:
    cfg = FetchConfig(allow_networks=["fe80::/10"])
    assert address_allowed(ipaddress.ip_address("fe80::1"), cfg)
    assert not address_allowed(ipaddress.ip_address("fe80::1%eth0"), cfg)


@pytest.mark.parametrize(
    "url",
    ["http://[::ffff:127.0.0.1]/", "http://[::FFFF:7f00:1]/", "http://[::1]/", "http://10.0.0.1/"],
)
def test_ip_literal_urls_parse_but_are_refused_by_address(url: str) -> None:
    parsed = parse_image_url(url, DEFAULT, param="p")
    assert parsed.ip is not None
    assert not address_allowed(parsed.ip, DEFAULT)
