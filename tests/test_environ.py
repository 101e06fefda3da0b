"""Environ building, request checks and start_response, in memory (no socket)."""

import pytest

from django_comet.evloop import start_response
from django_comet.evloop.environ import EnvironBuilder, split_target
from django_comet.evloop.proxies import TrustedProxies
from django_comet.evloop.request_checks import BadRequest, Limits, check_request
from django_comet.evloop.start_response import AppError, StartResponse, asks_to_close


def environ(target="/", headers=(), body=b"", method="GET", **kw):
    """The environ of one request, from a one-off EnvironBuilder."""
    builder = EnvironBuilder(server=("127.0.0.1", 8000), **kw)
    return builder.build(method, target, "HTTP/1.1", list(headers), body, ("10.0.0.1", 5555))


@pytest.mark.parametrize(
    "target, expected",
    [
        ("/a/b?x=1", ("/a/b", "x=1")),
        ("/a?x=1#frag", ("/a", "x=1")),
        ("/a#frag", ("/a", "")),
        ("/a#frag?x=1", ("/a", "")),  # a query inside the fragment is the fragment's
        ("http://example.com/p#f?q", ("/p", "")),
        ("http://example.com/p?q", ("/p", "q")),
        ("http://example.com", ("/", "")),
        ("http://example.com?q=1", ("/", "q=1")),
        ("*", ("*", "")),
    ],
)
def test_split_target(target, expected):
    assert split_target(target) == expected


@pytest.mark.parametrize("target", ["relative/path", "?://h/p", "x?://h/p", "1x://h/p"])
def test_split_target_refuses_nonsense(target):
    """Only a URI with a scheme is absolute-form: "?://h/p" was taken for one, routed
    to /p where a front proxy saw no path at all."""
    with pytest.raises(BadRequest):
        split_target(target)


def test_pep3333_basics():
    env = environ("/caf%C3%A9%2Fx?a=%20", [(b"Host", b"h"), (b"X-Thing", b"  v  ")])
    assert env["PATH_INFO"] == "/caf\u00c3\u00a9/x"  # bytes decoded as latin-1
    assert env["QUERY_STRING"] == "a=%20"
    assert env["SCRIPT_NAME"] == ""
    assert env["HTTP_HOST"] == "h"
    assert env["HTTP_X_THING"] == "v"
    assert env["REMOTE_ADDR"] == "10.0.0.1" and env["REMOTE_PORT"] == "5555"
    assert env["SERVER_NAME"] == "127.0.0.1" and env["SERVER_PORT"] == "8000"
    assert env["wsgi.version"] == (1, 0)
    assert env["wsgi.input"].read() == b""
    assert "CONTENT_LENGTH" not in env


def test_raw_latin1_target_bytes_survive():
    assert environ("/\u00c3\u00a0 k")["PATH_INFO"] == "/\u00c3\u00a0 k"


def test_repeated_headers_and_cookies():
    env = environ(
        headers=[(b"Accept", b"a"), (b"accept", b"b"), (b"Cookie", b"x=1"), (b"Cookie", b"y=2")]
    )
    assert env["HTTP_ACCEPT"] == "a, b"
    assert env["HTTP_COOKIE"] == "x=1; y=2"


def test_underscore_headers_are_dropped():
    env = environ(headers=[(b"X-Forwarded_For", b"evil"), (b"X-Forwarded-For", b"good")])
    assert env["HTTP_X_FORWARDED_FOR"] == "good"


def test_content_length_is_the_body_length_even_when_chunked():
    env = environ(
        method="POST",
        headers=[(b"Transfer-Encoding", b"chunked"), (b"Content-Type", b"text/plain")],
        body=b"hello",
    )
    assert env["CONTENT_LENGTH"] == "5"
    assert env["CONTENT_TYPE"] == "text/plain"
    assert env["wsgi.input"].read() == b"hello"
    # De-chunked: an app that saw the header (Bottle) decoded the body again.
    assert "HTTP_TRANSFER_ENCODING" not in env


@pytest.mark.parametrize(
    "target, script_name, path_info",
    [
        ("/app/x", "/app", "/x"),
        ("/app", "/app", ""),  # the mount point itself
        ("/application", "", "/application"),  # not under /app: a whole segment or nothing
    ],
)
def test_script_name_is_split_off(target, script_name, path_info):
    env = environ(target, script_name="/app")
    assert (env["SCRIPT_NAME"], env["PATH_INFO"]) == (script_name or "/app", path_info)


def test_header_values_lose_their_surrounding_tabs_and_spaces():
    assert environ(headers=[(b"X-A", b"\t v \t")])["HTTP_X_A"] == "v"


@pytest.mark.parametrize(
    "version, headers, status",
    [
        ((1, 1), [], 400),  # no Host
        ((1, 1), [(b"Host", b"a"), (b"Host", b"b")], 400),
        ((1, 1), [(b"Host", b"a"), (b"Content-Length", b"-0")], 400),
        ((1, 1), [(b"Host", b"a"), (b"Content-Length", b"3"), (b"Content-Length", b"2")], 400),
        ((1, 0), [(b"Transfer-Encoding", b"chunked")], 400),
        ((1, 1), [(b"Host", b"a"), (b"Transfer-Encoding", b"gzip")], 400),
        ((1, 1), [(b"Host", b"a"), (b"Transfer-Encoding", b"chunked, gzip")], 400),
        ((1, 1), [(b"Host", b"a"), (b"Transfer-Encoding", b"chunked, chunked")], 400),
        ((1, 1), [(b"Host", b"a"), (b"Transfer-Encoding", b"gzip, chunked")], 501),
        (
            (1, 1),
            [(b"Host", b"a"), (b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")],
            400,
        ),
        (
            (1, 1),
            [(b"Host", b"a"), (b"Transfer-Encoding", b"gzip"), (b"Transfer-Encoding", b"chunked")],
            501,
        ),
        ((2, 0), [(b"Host", b"a")], 505),
        ((1, 1), [(b"Host", b"a"), (b"Bad Name", b"x")], 400),
        ((1, 1), [(b"Host", b"a b")], 400),  # RFC 9112 3.2: an invalid Host is a 400
        ((1, 1), [(b"Host", b"a/b")], 400),
        ((1, 1), [(b"Host", b"a:8o")], 400),
        ((1, 0), [(b"Host", b"a\xe9")], 400),
    ],
)
def test_check_request_refuses(version, headers, status):
    with pytest.raises(BadRequest) as info:
        check_request("GET", b"/", version, headers)
    assert info.value.status == status


@pytest.mark.parametrize("method", ["HEAD", "TRACE"])
def test_a_head_with_a_body_of_any_length_is_refused_and_one_of_zeros_is_not(method):
    """A length of over 4,300 digits is beyond Python's int(): it raised, a 500 and a
    traceback of the server's (found by a fuzzing review)."""
    for length in (b"1", b"1" * 5000, b"0" * 4300 + b"1"):
        with pytest.raises(BadRequest) as info:
            check_request(method, b"/", (1, 1), [(b"Host", b"a"), (b"Content-Length", length)])
        assert info.value.status == 400
    for length in (b"0", b"0" * 5000):
        check_request(method, b"/", (1, 1), [(b"Host", b"a"), (b"Content-Length", length)])


@pytest.mark.parametrize("value", [b"abc\x1b[2Jdef", b"\x01", b"a\x0bb", b"a\x7f", b"a\rb"])
def test_a_header_value_with_a_control_character_is_refused(value):
    """start_response refuses them in a response header: an app echoing a request's
    value failed, a 500 logged as the app's error, for the client's mistake (found by a
    PEP 3333 differential review; gunicorn and waitress answer 400)."""
    with pytest.raises(BadRequest, match="control character") as info:
        check_request("GET", b"/", (1, 1), [(b"Host", b"a"), (b"X-Request-Id", value)])
    assert info.value.status == 400
    check_request("GET", b"/", (1, 1), [(b"Host", b"a"), (b"X-Request-Id", b"a\tb \xe9")])


@pytest.mark.parametrize("target", [b"/caf\xc3\xa9", b"/?q=\xff", b"/\x7f"])
def test_a_target_that_is_not_ascii_is_refused(target):
    """Raw UTF-8 reached Django decoded as UTF-8, where gunicorn and waitress answer 400
    and a proxy in front may have read the bytes otherwise (RFC 9112 3.2: a URI)."""
    with pytest.raises(BadRequest, match="percent-encode") as info:
        check_request("GET", target, (1, 1), [(b"Host", b"a")])
    assert info.value.status == 400
    check_request("GET", b"/caf%C3%A9", (1, 1), [(b"Host", b"a")])


def test_check_request_refuses_connect():
    """CONNECT asks for a tunnel: this is no proxy (501, as for methods it does not know)."""
    with pytest.raises(BadRequest) as info:
        check_request("CONNECT", b"example.com:443", (1, 1), [(b"Host", b"example.com:443")])
    assert info.value.status == 501


def test_check_request_limits_hold_at_their_edge():
    """Each limit lets through a request right at it and refuses one over it; a header
    line counts its name, its value and four bytes (": " and the line's end)."""
    limits = Limits(target=10, header_bytes=20, header_count=3)
    host = [(b"Host", b"a")]
    check_request("GET", b"/" + b"a" * 9, (1, 1), host, limits)
    check_request("GET", b"/", (1, 1), [(b"Host", b"a" * 12)], limits)  # 4 + 12 + 4
    check_request("GET", b"/", (1, 1), [*host, (b"A", b"1"), (b"B", b"1")], Limits(10, 99, 3))
    for target, headers, limit, status in [
        (b"/" + b"a" * 10, host, limits, 414),
        (b"/", [(b"Host", b"a" * 13)], limits, 431),
        (b"/", [*host, (b"A", b"1"), (b"B", b"1"), (b"C", b"1")], Limits(10, 99, 3), 431),
    ]:
        with pytest.raises(BadRequest) as info:
            check_request("GET", target, (1, 1), headers, limit)
        assert info.value.status == status


def test_check_request_accepts():
    check_request(
        "GET", b"/", (1, 1), [(b"Host", b"a"), (b"Content-Length", b"3"), (b"content-length", b"3")]
    )
    check_request("GET", b"/", (1, 0), [])
    check_request("POST", b"/", (1, 1), [(b"Host", b"a"), (b"Transfer-Encoding", b" Chunked ")])
    check_request("OPTIONS", b"*", (1, 1), [(b"Host", b"a")])
    check_request("POST", b"/", (1, 1), [(b"Host", b"a"), (b"Content-Length", b"\t5")])
    for host in (b"", b"example.com:8080", b"127.0.0.1", b"[::1]:80", b"my_host.local.", b"x:"):
        check_request("GET", b"/", (1, 1), [(b"Host", host)])
    with pytest.raises(BadRequest):
        check_request("GET", b"*", (1, 1), [(b"Host", b"a")])
    with pytest.raises(BadRequest):  # an absolute form with no host, however spelt
        check_request("GET", b"HTTP://:80/", (1, 1), [(b"Host", b"a")])


def test_start_response_validates():
    start = StartResponse()
    write = start("200 OK", [("Content-Type", "text/plain")])
    assert (start.code, start.reason) == (200, b"OK")
    assert start.encoded == [(b"Content-Type", b"text/plain")]
    write(b"x")
    assert start.written == [b"x"]
    with pytest.raises(AppError):
        start("200 OK", [])  # twice without exc_info
    for status, headers in [
        ("OK", []),
        ("2000 OK", []),
        ("200 OK\r\nX: y", []),
        ("200 OK", [("X-A", "a\r\nb")]),
        ("200 OK", [("Bad Name", "a")]),
        ("200 OK", [("Content-Length", "ten")]),
        ("200 OK", [("Content-Length", "\u0663")]),  # a digit, but not an ASCII one
        ("200 OK", [("Content-Length", "\uff13")]),
        ("200 OK", [("Content-Length", "\u00b2")]),
        ("200 OK", [("Content-Length", "5"), ("Content-Length", "3")]),  # which one?
        ("200 OK", [("X-U", "\u20ac")]),
        ("200 OK", [("X-V", "a\x0bb")]),  # no control character but the tab
        ("200 O\x1bK", []),
        ("999 Weird", []),  # codes are 100-599
        ("600 Nope", []),
    ]:
        with pytest.raises(AppError):
            StartResponse()(status, headers)


def test_start_response_checks_a_header_list_seen_before_as_well():
    """Header lists are cached as they were encoded: one put together from values each
    seen before must be checked whole all the same, and an app's own Date seen each
    time (else a second Date would go out)."""
    StartResponse()("200 OK", [("Content-Length", "5")])
    StartResponse()("200 OK", [("Content-Length", "3")])
    with pytest.raises(AppError):
        StartResponse()("200 OK", [("Content-Length", "5"), ("Content-Length", "3")])
    for _ in range(2):
        start = StartResponse()
        start("200 OK", [("Date", "Tue, 01 Jan 2030 00:00:00 GMT")])
        assert start.dated


def test_write_takes_bytes_only():
    write = StartResponse()("200 OK", [])
    with pytest.raises(AppError):
        write("text")


def test_start_response_takes_tabs_and_latin1_in_values():
    start = StartResponse()
    start("599 Network\tTimeout", [("X-T", "a\tb \xe9")])
    assert start.encoded == [(b"X-T", b"a\tb \xe9")]


def test_start_response_exc_info():
    start = StartResponse()
    start("200 OK", [])(b"partial")  # (buffered: nothing is sent yet)
    try:
        raise ValueError("x")
    except ValueError:
        import sys

        start("500 Internal Server Error", [], sys.exc_info())  # headers not sent: replaces
        assert start.code == 500
        assert start.written == []  # the error page, not the end of another answer
        start.headers_sent = True
        with pytest.raises(ValueError):
            start("500 Internal Server Error", [], sys.exc_info())


@pytest.mark.parametrize(
    "value, closes",
    [("close", True), ("Close", True), ("TE,\tclose", True), ("keep-alive, closed", False)],
)
def test_asks_to_close(value, closes):
    assert asks_to_close(value) is closes


def test_start_response_keeps_framing_to_itself(caplog, monkeypatch):
    """An app's hop-by-hop headers are dropped, and said once each: a Transfer-Encoding
    of a body the app chunked itself went out silently as part of the content (found
    by a PEP 3333 differential review)."""
    monkeypatch.setattr(start_response, "_dropped_said", set())
    start = StartResponse()
    start(
        "200 OK",
        [
            ("Content-Length", "5"),
            ("Connection", "close"),
            ("Keep-Alive", "x"),
            ("Transfer-Encoding", "chunked"),
            ("X-Mine", "v"),
        ],
    )
    assert start.encoded == [(b"X-Mine", b"v")]
    assert start.length == 5
    assert start.close is True
    said = [r.getMessage() for r in caplog.records if "was dropped" in r.getMessage()]
    assert len(said) == 2
    assert "'transfer-encoding' header ('chunked') was dropped" in said[1]
    StartResponse()("200 OK", [("Transfer-Encoding", "chunked")])
    assert len([r for r in caplog.records if "was dropped" in r.getMessage()]) == 2


def test_forwarded_headers_from_a_trusted_proxy():
    from django_comet.evloop.environ import apply_forwarded

    env = environ(
        headers=[(b"X-Forwarded-For", b"198.51.100.1, 10.0.0.2"), (b"X-Forwarded-Proto", b"HTTPS")]
    )
    apply_forwarded(env, TrustedProxies(["10.0.0.0/24"]))
    assert env["REMOTE_ADDR"] == "198.51.100.1"
    assert env["wsgi.url_scheme"] == "https"


def test_the_client_is_the_nearest_hop_no_trusted_proxy_vouches_for():
    """A client may send its own X-Forwarded-For, which a proxy appends to: the hops to
    its left are the client's say.  The port is the proxy's, so none is given."""
    from django_comet.evloop.environ import apply_forwarded

    env = environ(headers=[(b"X-Forwarded-For", b"6.6.6.6, 203.0.113.7")])
    apply_forwarded(env, TrustedProxies(["10.0.0.1"]))
    assert (env["REMOTE_ADDR"], env["REMOTE_PORT"]) == ("203.0.113.7", "")


def test_a_forwarded_hop_that_is_no_address_leaves_the_peers():
    from django_comet.evloop.environ import apply_forwarded

    env = environ(headers=[(b"X-Forwarded-For", b"unknown, <script>")])
    before = env["REMOTE_ADDR"]
    apply_forwarded(env, TrustedProxies(["10.0.0.1"]))
    assert env["REMOTE_ADDR"] == before


def test_trusted_proxies_must_be_ip_addresses_or_networks():
    from django.test import override_settings

    from django_comet.conf import comet_settings

    good = ["10.0.0.1", "::1", "10.0.0.0/8", "fd00::/8", "0:0:0:0:0:0:0:1"]
    with override_settings(COMET_TRUSTED_PROXIES=[*good, "proxy.local", "10.0.0.1/8", 7]):
        assert comet_settings.errors() == [
            "COMET_TRUSTED_PROXIES holds 'proxy.local', which is no IP address or network",
            "COMET_TRUSTED_PROXIES holds '10.0.0.1/8', which has host bits set (10.0.0.0/8?)",
            "COMET_TRUSTED_PROXIES holds 7, which is no IP address or network",
        ]


def test_trusted_proxies_are_compared_as_addresses_and_networks():
    """Load balancers sit in a subnet, not at fixed addresses; and a proxy written in
    IPv6's long form matched nothing, silently (found by a review behind nginx)."""
    proxies = TrustedProxies(
        ["10.1.0.0/16", "0:0:0:0:0:0:0:1", "192.0.2.7", "::ffff:192.0.2.8", "::ffff:172.16.0.0/108"]
    )
    for trusted in (
        *("10.1.2.3", "::1", "192.0.2.7", "::ffff:192.0.2.7", "::ffff:10.1.0.9", "192.0.2.8"),
        *("172.16.3.4", "::ffff:172.16.3.4"),  # (an IPv4-mapped network is the IPv4 one)
    ):
        assert trusted in proxies, trusted
    for not_trusted in ("10.2.0.1", "::2", "192.0.2.9", "unknown", "10.1.2.3:80", "", "172.32.0.1"):
        assert not_trusted not in proxies, not_trusted
    everyone = TrustedProxies(["::/0"])  # (a mapped peer is in it, as an IPv6 address)
    assert "::ffff:10.0.0.5" in everyone and "10.0.0.5" not in everyone
    assert not TrustedProxies() and TrustedProxies(["::1"])
    assert TrustedProxies(["::1"]) == TrustedProxies(["0::1"])
    with pytest.raises(ValueError, match=r"'proxy\.local', which is no IP address or network"):
        TrustedProxies(["proxy.local"])


def test_the_scheme_is_the_one_the_nearest_proxy_set():
    """A proxy that appends to X-Forwarded-Proto leaves the client's value first."""
    from django_comet.evloop.environ import apply_forwarded

    env = environ(headers=[(b"X-Forwarded-Proto", b"https, http")])
    apply_forwarded(env, TrustedProxies(["10.0.0.1"]))
    assert env["wsgi.url_scheme"] == "http"


def test_an_absolute_form_targets_host_ends_where_its_checked_authority_does():
    """The server checks the authority up to a "#" (a fragment); the host was taken
    past it, after an "@": "http://good#@evil{}/" gave Django "evil{}" (found by a
    security review)."""
    env = environ("http://good.example#@evil{}<x>/x", headers=[(b"Host", b"other")])
    assert env["HTTP_HOST"] == "good.example"


def test_a_body_past_what_string_at_takes_is_copied_whole(monkeypatch):
    """``ctypes.string_at`` takes its length as a C int: a body of 4 GiB and 5 bytes
    reached the app as 5 bytes.  Past 2 GiB the body is copied another way (tried
    here with the limit lowered: 2 GiB is too much memory for a test)."""
    import ctypes

    from django_comet.evloop import request

    data = bytes(range(256)) * 4
    buffer = ctypes.create_string_buffer(data, len(data))
    string_at = ctypes.string_at

    def string_at_as_if_its_int_were_small(address, length):  # wraps as a C int would
        return string_at(address, length % 100)

    monkeypatch.setattr(request, "STRING_AT_LIMIT", 100)
    monkeypatch.setattr(ctypes, "string_at", string_at_as_if_its_int_were_small)
    assert request.copy_out(ctypes.addressof(buffer), len(data)) == data
    assert request.copy_out(ctypes.addressof(buffer), 99) == data[:99]
    assert request.copy_out(ctypes.addressof(buffer), 100) == data[:100]  # (the limit)
