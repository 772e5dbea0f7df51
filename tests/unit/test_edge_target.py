"""Target grammar: where a request goes, decided strictly from the request line and Host."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.edge.target import (
    ApiTarget,
    AppTarget,
    Rejection,
    RoutingConfig,
    header_form,
    key_parts,
    parse_target,
    route_key,
)

# Every test here runs on each edge (the compiled one and the pure-Python one): tests/conftest.py.
pytestmark = pytest.mark.both_edges

SID = "0f8fad5b-d9cb-469f-a165-70867728950e"
VM = "vmid-0123456789abcdef0123"
CONFIG = RoutingConfig(
    api_hosts=("127.0.0.1", "localhost", "api.example.com"),
    sandbox_domains=("sandbox.localhost", "sandbox.example.com"),
)
OPEN_CONFIG = RoutingConfig(api_hosts=(), sandbox_domains=("sandbox.localhost",))
API = b"api.example.com"


def app(
    target: bytes, host: bytes = API, method: bytes = b"GET", config: RoutingConfig | None = None
) -> AppTarget:
    result = parse_target(method, target, host, config or CONFIG)
    assert isinstance(result, AppTarget), result
    return result


def rejected(target: bytes, host: bytes | None = API, method: bytes = b"GET") -> Rejection:
    result = parse_target(method, target, host, CONFIG)
    assert isinstance(result, Rejection), result
    return result


# --- path form -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "upstream"),
    [
        (f"/v1/app/{SID}/8080/".encode(), b"/"),
        (f"/v1/app/{SID}/8080/index.html".encode(), b"/index.html"),
        (f"/v1/app/{SID}/8080/a/b?x=1&y=%20".encode(), b"/a/b?x=1&y=%20"),
        (f"/v1/app/{SID}/8080/?q".encode(), b"/?q"),
        (f"/v1/app/{SID}/8080/a%2Fb//c;p=1".encode(), b"/a%2Fb//c;p=1"),  # byte for byte, not decoded
        (f"/v1/app/{SID}/8080/a/..b/.c/...".encode(), b"/a/..b/.c/..."),  # not dot segments
        (f"/v1/app/{SID}/8080/x?a/../b".encode(), b"/x?a/../b"),  # the query is not a path
        (f"/v1/app/{SID}/1/".encode(), b"/"),
        (f"/v1/app/{SID}/65535/".encode(), b"/"),
    ],
)
def test_path_form(target: bytes, upstream: bytes) -> None:
    result = app(target)
    assert result.kind == "path" and result.session_id == SID and result.vm_id is None
    assert result.upstream_target == upstream
    assert result.prefix == f"/v1/app/{SID}/{result.port}".encode()
    assert result.host == API


def test_path_form_port_and_host_value() -> None:
    result = app(f"/v1/app/{SID}/3000/".encode(), host=b"LocalHost:8443")
    assert result.port == 3000
    assert result.host == b"localhost:8443"


@pytest.mark.parametrize(
    ("target", "location"),
    [
        (f"/v1/app/{SID}/8080".encode(), f"/v1/app/{SID}/8080/".encode()),
        (f"/v1/app/{SID}/8080?a=1&b".encode(), f"/v1/app/{SID}/8080/?a=1&b".encode()),
    ],
)
def test_path_form_without_slash_redirects(target: bytes, location: bytes) -> None:
    result = rejected(target)
    assert (result.status, result.code, result.location) == (308, "redirect", location)


@pytest.mark.parametrize(
    "target",
    [b"/", b"/v1/sessions", b"/v1/app", b"/V1/app/x", b"/v1/apps/x", b"/docs?x=/../", b"/a/../b"],
)
def test_other_paths_go_to_the_api(target: bytes) -> None:
    assert parse_target(b"GET", target, API, CONFIG) == ApiTarget(host=API, host_name=API)


def test_open_config_any_non_sandbox_host_is_the_api() -> None:
    assert parse_target(b"GET", b"/v1/x", b"anything.test", OPEN_CONFIG) == ApiTarget(
        host=b"anything.test", host_name=b"anything.test"
    )
    result = app(f"/v1/app/{SID}/80/".encode(), host=b"whatever:1", config=OPEN_CONFIG)
    assert result.session_id == SID


@pytest.mark.parametrize("host", [b"127.0.0.2", b"intranet", b"[::2]", b"10.1.2.3:8080"])
def test_ip_and_single_label_hosts_are_not_found_when_api_hosts_are_listed(host: bytes) -> None:
    result = rejected(b"/", host=host)
    assert (result.status, result.code) == (404, "no_route")


@pytest.mark.parametrize("host", [b"other.example.com", b"Shop.Example.ORG.", b"example.com:8443"])
def test_other_names_are_custom_domain_candidates_when_api_hosts_are_listed(host: bytes) -> None:
    result = parse_target(b"GET", b"/a/b?c=1", host, CONFIG)
    assert isinstance(result, AppTarget)
    name = host.lower().partition(b":")[0].rstrip(b".")
    assert (result.kind, result.host_name, result.port, result.prefix) == ("domain", name, 0, None)
    assert result.upstream_target == b"/a/b?c=1"  # the whole target: a custom domain has no prefix


def test_custom_domain_paths_refuse_dot_segments() -> None:
    result = rejected(b"/a/%2e%2e/b", host=b"shop.example.org")
    assert (result.status, result.code) == (400, "invalid_target")


@pytest.mark.parametrize(
    "session",
    [
        "",
        SID.upper(),
        SID.replace("-", ""),
        "{" + SID + "}",
        SID[:-1],
        SID + "0",
        SID[:-1] + "g",
        SID.replace("0f8f", "%30f8f"),
        "0f8fad5b-d9cb-469f-a165-70867728950e%2f",
        "0f8fad5b-d9cb-469f-a165-70867728950e%2F8080",
        "0f8fad5b-d9cb-469f-a165-70867728950e%5c",
    ],
)
def test_bad_session_ids(session: str) -> None:
    result = rejected(f"/v1/app/{session}/8080/".encode())
    assert (result.status, result.code) == (400, "invalid_target")


def test_session_without_port() -> None:
    for target in (f"/v1/app/{SID}".encode(), f"/v1/app/{SID}?x".encode(), b"/v1/app/"):
        assert rejected(target).status == 400


BAD_PORTS = ["0", "65536", "99999", "080", "+80", "-1", "٣", "", "8O", "80a", "%38%30", "123456", " 80"]


@pytest.mark.parametrize("port", BAD_PORTS)
def test_bad_ports_path_form(port: str) -> None:
    result = rejected(f"/v1/app/{SID}/{port}/".encode())
    assert (result.status, result.code) == (400, "invalid_target")


# --- host form -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "vm_id", "port"),
    [
        (f"{VM}-8080.sandbox.localhost", VM, 8080),
        (f"{VM}-1.sandbox.example.com", VM, 1),
        (f"{VM}-65535.sandbox.example.com:443", VM, 65535),
        (f"{VM.upper()}-3000.SANDBOX.Example.COM", VM, 3000),  # host names are case-insensitive
        (f"{VM}-3000.sandbox.example.com.", VM, 3000),  # trailing dot
        (f"{VM}-3000.sandbox.example.com.:8443", VM, 3000),
        ("vmid-0123456789abcdef-80.sandbox.localhost", "vmid-0123456789abcdef", 80),  # 16 hex: minimum
    ],
)
def test_host_form(host: str, vm_id: str, port: int) -> None:
    result = app(b"/some/path?q=1", host=host.encode())
    assert result.kind == "host" and result.session_id is None and result.prefix is None
    assert (result.vm_id, result.port) == (vm_id, port)
    assert result.upstream_target == b"/some/path?q=1"
    assert result.host == host.lower().encode()


def test_host_form_forwards_the_whole_path() -> None:
    host = f"{VM}-80.sandbox.localhost".encode()
    target = f"/v1/app/{SID}/8080/x".encode()
    assert app(target, host=host).upstream_target == target
    assert app(b"/", host=host).upstream_target == b"/"


@pytest.mark.parametrize(
    "label",
    [
        f"{VM}",  # no port
        "vmid-0123456789abcde-80",  # 15 hex digits
        "vmid-0123456789abcdeg-80",
        "vm-0123456789abcdef-80",
        "0123456789abcdef-80",
        "xvmid-0123456789abcdef-80",
        "www",
        *(f"{VM}-{port}" for port in ["0", "65536", "080", "8o", "99999"]),
    ],
)
def test_host_form_names_nothing(label: str) -> None:
    result = rejected(b"/", host=f"{label}.sandbox.example.com".encode())
    assert (result.status, result.code) == (404, "no_route")


@pytest.mark.parametrize(
    "host",
    [
        f"a.{VM}-80.sandbox.localhost",  # two labels before the base domain
        f"{VM}-80.x.sandbox.localhost",
        "sandbox.localhost",
        "sandbox.example.com:80",
    ],
)
def test_sandbox_hosts_that_do_not_match_are_not_found(host: str) -> None:
    result = rejected(b"/", host=host.encode())
    assert (result.status, result.code) == (404, "no_route")


def test_nested_sandbox_domains_most_specific_wins() -> None:
    config = RoutingConfig(api_hosts=("api.example.com",), sandbox_domains=("example.com", "sb.example.com"))
    for host in (f"{VM}-80.sb.example.com", f"{VM}-80.example.com"):
        result = parse_target(b"GET", b"/", host.encode(), config)
        assert isinstance(result, AppTarget) and result.vm_id == VM
    assert isinstance(parse_target(b"GET", b"/", b"api.example.com", config), ApiTarget)


def test_host_form_label_grammar_comes_first() -> None:
    # A label ending in "-" is not a host name at all: a bad request, not a missing app.
    result = rejected(b"/", host=f"{VM}-.sandbox.example.com".encode())
    assert (result.status, result.code) == (400, "bad_host")
    # 64 hex digits fit the id grammar but not a 63-byte DNS label.
    result = rejected(b"/", host=("vmid-" + "a" * 64 + "-80.sandbox.localhost").encode())
    assert (result.status, result.code) == (400, "bad_host")


def test_host_form_rejects_dot_segments() -> None:
    result = rejected(b"/a/%2e%2E/b", host=f"{VM}-80.sandbox.localhost".encode())
    assert (result.status, result.code) == (400, "invalid_target")


# --- method and target form -------------------------------------------------------------------------


def test_connect_is_not_allowed() -> None:
    result = rejected(b"example.com:443", method=b"CONNECT")
    assert (result.status, result.code) == (405, "method_not_allowed")


@pytest.mark.parametrize(
    ("method", "target"),
    [
        (b"GET", b"http://api.example.com/"),
        (b"GET", f"http://api.example.com/v1/app/{SID}/80/".encode()),
        (b"GET", b"api.example.com:80"),
        (b"OPTIONS", b"*"),
        (b"GET", b"*"),
        (b"GET", b""),
        (b"GET", b"v1/app/"),
    ],
)
def test_non_origin_forms_are_refused(method: bytes, target: bytes) -> None:
    result = rejected(target, method=method)
    assert (result.status, result.code) == (400, "invalid_target")


@pytest.mark.parametrize(
    "suffix",
    [
        b"/./x",
        b"/../x",
        b"/a/.",
        b"/a/..",
        b"/a/../",
        b"/%2e/x",
        b"/%2E%2e/x",
        b"/.%2E/",
        b"/%2e./",
        b"/a/%2e",
        b"/a/%2E%2E",
        b"/a/..?q=1",
    ],
)
def test_dot_segments_refused_in_app_paths(suffix: bytes) -> None:
    result = rejected(f"/v1/app/{SID}/8080".encode() + suffix)
    assert (result.status, result.code) == (400, "invalid_target")


@pytest.mark.parametrize(
    "target",
    [
        b"/a\\b",
        f"/v1/app/{SID}/80/a\\b".encode(),
        f"/v1/app/{SID}/80\\a".encode(),
        b"/a#frag",
        f"/v1/app/{SID}/80/#x".encode(),
        b"/a?x#y",
        b"/a b",
        b"/a\tb",
        b"/a\r\nX: y",
        b"/a\x00",
        b"/a\x7f",
        "/caf\u00e9".encode(),
        b"/a\xff",
        b"/%",
        b"/%2",
        b"/%zz",
        b"/%2g",
        b"/x?%",
        f"/v1/app/{SID}/80/%%41".encode(),
    ],
)
def test_malformed_targets(target: bytes) -> None:
    assert rejected(target).status == 400
    assert rejected(target, host=f"{VM}-80.sandbox.localhost".encode()).status == 400


def test_backslash_in_query_is_not_a_path_matter() -> None:
    assert app(f"/v1/app/{SID}/80/?a=\\".encode()).upstream_target == b"/?a=\\"


def test_long_target() -> None:
    config = RoutingConfig(api_hosts=(), sandbox_domains=(), max_target_bytes=100)
    assert isinstance(parse_target(b"GET", b"/" + b"a" * 99, b"h", config), ApiTarget)
    result = parse_target(b"GET", b"/" + b"a" * 100, b"h", config)
    assert isinstance(result, Rejection) and (result.status, result.code) == (414, "uri_too_long")
    default = rejected(f"/v1/app/{SID}/80/".encode() + b"a" * 8192)
    assert default.status == 414


# --- Host header ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        None,
        b"",
        b" ",
        b"api example.com",
        b"user@api.example.com",
        b"api.example.com/x",
        b"api.example.com\\",
        b"api%2eexample.com",
        b"api_x.example.com",
        "\u00e9xample.com".encode(),
        b"api.example.com\x00",
        b"api.example.com:",
        b"api.example.com:0",
        b"api.example.com:65536",
        b"api.example.com:123456",
        b"api.example.com:+80",
        b"api.example.com:-1",
        b"api.example.com:8o",
        b"api.example.com:80:80",
        b"::1",
        b"[::1",
        b"[::1]x",
        b"[::1]:",
        b"[::g]",
        b"[fe80::1%25eth0]",
        b"[]",
        b"-api.example.com",
        b"api-.example.com",
        b"api..example.com",
        b".example.com",
        b"example.com..",
        b":80",
        b"a" * 64 + b".com",
        b".".join([b"a" * 63] * 4) + b".com",  # > 253
        b"localhost\r\nX: y",
    ],
)
def test_bad_host(host: bytes | None) -> None:
    result = rejected(b"/", host=host)
    assert (result.status, result.code) == (400, "bad_host")


@pytest.mark.parametrize(
    "host",
    [
        b"api.example.com",
        b"API.Example.Com",
        b"api.example.com.",
        b"api.example.com:1",
        b"api.example.com:65535",
        b"127.0.0.1:8080",
        b"localhost",
        b" localhost ",
    ],
)
def test_good_api_hosts(host: bytes) -> None:
    assert isinstance(parse_target(b"GET", b"/", host, CONFIG), ApiTarget)


def test_ipv6_host() -> None:
    config = RoutingConfig(api_hosts=("[::1]",), sandbox_domains=())
    assert parse_target(b"GET", b"/", b"[::1]:8080", config) == ApiTarget(
        host=b"[::1]:8080", host_name=b"[::1]"
    )
    assert parse_target(b"GET", b"/", b"[::1]", OPEN_CONFIG) == ApiTarget(host=b"[::1]", host_name=b"[::1]")


def test_config_names_are_normalised() -> None:
    config = RoutingConfig(api_hosts=("API.Example.com.",), sandbox_domains=("Sandbox.Example.COM",))
    assert isinstance(parse_target(b"GET", b"/", b"api.example.com", config), ApiTarget)
    assert isinstance(parse_target(b"GET", b"/", f"{VM}-80.sandbox.example.com".encode(), config), AppTarget)


# --- properties -------------------------------------------------------------------------------------

_SAFE = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:@/"
safe_rest = st.binary(max_size=60).map(lambda raw: bytes(_SAFE[b % len(_SAFE)] for b in raw))


def _has_dot_segment(rest: bytes) -> bool:
    return any(segment in (b".", b"..") for segment in rest.split(b"/"))


@given(session=st.uuids(), port=st.integers(1, 65535), rest=safe_rest)
def test_any_valid_app_url_round_trips(session: object, port: int, rest: bytes) -> None:
    target = f"/v1/app/{session}/{port}/".encode() + rest
    result = parse_target(b"GET", target, API, CONFIG)
    if _has_dot_segment(rest):
        assert isinstance(result, Rejection) and result.status == 400
        return
    assert isinstance(result, AppTarget)
    assert (result.session_id, result.port, result.upstream_target) == (str(session), port, b"/" + rest)


@given(
    target=st.binary(max_size=200),
    host=st.one_of(st.none(), st.binary(max_size=80)),
    method=st.binary(max_size=8),
)
def test_never_raises_on_arbitrary_bytes(target: bytes, host: bytes | None, method: bytes) -> None:
    for config in (CONFIG, OPEN_CONFIG):
        result = parse_target(method, target, host, config)
        assert isinstance(result, AppTarget | ApiTarget | Rejection)


@given(target=st.binary(max_size=120))
def test_never_raises_with_prefixed_garbage(target: bytes) -> None:
    for host in (API, f"{VM}-80.sandbox.localhost".encode()):
        result = parse_target(b"GET", f"/v1/app/{SID}/80".encode() + target, host, CONFIG)
        assert isinstance(result, AppTarget | ApiTarget | Rejection)
        if isinstance(result, AppTarget):
            assert result.upstream_target.startswith(b"/")
            assert all(0x21 <= b <= 0x7E for b in result.upstream_target)


INSTANCE_ID = "1c0c6b4e-2b1f-4a55-9d44-7d8f0f4b1e10"
WITH_INSTANCES = RoutingConfig(
    api_hosts=("api.example.com",),
    sandbox_domains=("sandbox.example.com",),
    instance_domains=("browser.example.com",),
)


def test_instance_hosts_route_by_instance_id() -> None:
    host = f"instance-{INSTANCE_ID}.browser.example.com:8443".encode()
    result = parse_target(b"GET", b"/json/version?x=1", host, WITH_INSTANCES)
    assert isinstance(result, AppTarget)
    assert (result.kind, result.instance_id, result.port) == ("instance", INSTANCE_ID, 0)
    assert result.upstream_target == b"/json/version?x=1"  # the whole target, as sent
    assert result.host_name == f"instance-{INSTANCE_ID}.browser.example.com".encode()


@pytest.mark.parametrize(
    "host",
    [
        b"browser.example.com",  # the bare domain
        b"instance-1C0C6B4E-2B1F-4A55-9D44-7D8F0F4B1E10x.browser.example.com",
        b"instance-1c0c6b4e2b1f4a559d447d8f0f4b1e10.browser.example.com",  # not the canonical form
        b"vmid-" + b"a" * 20 + b"-3000.browser.example.com",  # a VM host name under the instance domain
        b"x.instance-" + INSTANCE_ID.encode() + b".browser.example.com",  # one label deeper
    ],
)
def test_other_names_under_the_instance_domain_name_no_route(host: bytes) -> None:
    result = parse_target(b"GET", b"/", host, WITH_INSTANCES)
    assert isinstance(result, Rejection) and result.code == "no_route"


def test_instance_paths_with_dot_segments_are_refused() -> None:
    host = f"instance-{INSTANCE_ID}.browser.example.com".encode()
    result = parse_target(b"GET", b"/json/../x", host, WITH_INSTANCES)
    assert isinstance(result, Rejection) and result.code == "invalid_target"


# --- header form (X-Sandbox-Id and X-Sandbox-Port on the API host) --------------------------------------


def by_headers(target: bytes, *routing: tuple[bytes, bytes]) -> AppTarget | Rejection:
    api = parse_target(b"GET", target, API, CONFIG)
    assert isinstance(api, ApiTarget), api
    return header_form(target, api, list(routing))


@pytest.mark.parametrize(
    ("sandbox_id", "key"),
    [
        (SID, route_key("s", SID, 3000)),
        (VM, route_key("v", VM, 3000)),
        (f" {VM}\t", route_key("v", VM, 3000)),
    ],
)
def test_header_form_names_a_session_or_a_vm(sandbox_id: str, key: str) -> None:
    result = by_headers(b"/a/b?q=1", (b"x-sandbox-id", sandbox_id.encode()), (b"x-sandbox-port", b"3000"))
    assert isinstance(result, AppTarget), result
    assert result.kind == "header" and result.key == key and result.port == 3000
    kind, ident, _ = key_parts(key)
    assert (result.session_id, result.vm_id) == ((SID, None) if kind == "s" else (None, VM))
    assert result.route_id == ident
    # The whole target goes to the app (as in the host form), and Host stays the API host's.
    assert result.upstream_target == b"/a/b?q=1" and result.prefix is None
    assert (result.host, result.host_name) == (API, API)


@pytest.mark.parametrize(
    ("routing", "says"),
    [
        ([(b"x-sandbox-id", SID.encode())], "one X-Sandbox-Id and one X-Sandbox-Port"),
        ([(b"x-sandbox-port", b"3000")], "one X-Sandbox-Id and one X-Sandbox-Port"),
        ([(b"x-sandbox-id", SID.encode()), (b"x-sandbox-id", VM.encode()), (b"x-sandbox-port", b"80")],
         "one X-Sandbox-Id and one X-Sandbox-Port"),
        ([(b"x-sandbox-id", SID.encode()), (b"x-sandbox-port", b"080")], "X-Sandbox-Port must be"),
        ([(b"x-sandbox-id", SID.encode()), (b"x-sandbox-port", b"65536")], "X-Sandbox-Port must be"),
        ([(b"x-sandbox-id", SID.encode()), (b"x-sandbox-port", b"+80")], "X-Sandbox-Port must be"),
        ([(b"x-sandbox-id", SID.upper().encode()), (b"x-sandbox-port", b"80")], "X-Sandbox-Id must be"),
        ([(b"x-sandbox-id", VM.upper().encode()), (b"x-sandbox-port", b"80")], "X-Sandbox-Id must be"),
        ([(b"x-sandbox-id", b"vmid-0123"), (b"x-sandbox-port", b"80")], "X-Sandbox-Id must be"),
        ([(b"x-sandbox-id", b""), (b"x-sandbox-port", b"80")], "X-Sandbox-Id must be"),
    ],
)  # fmt: skip
def test_header_form_grammar(routing: list[tuple[bytes, bytes]], says: str) -> None:
    result = by_headers(b"/", *routing)
    assert isinstance(result, Rejection) and result.status == 400 and says in result.message, result


def test_header_form_refuses_dot_segments() -> None:
    result = by_headers(b"/a/../b", (b"x-sandbox-id", SID.encode()), (b"x-sandbox-port", b"80"))
    assert isinstance(result, Rejection) and "dot segments" in result.message, result


@pytest.mark.parametrize(
    ("kind", "ident", "port"),
    [("s", SID, 3000), ("v", VM, 65535), ("d", "app.customer.test", 0), ("i", SID, 0), ("d", "a b c", 7)],
)
def test_a_route_key_gives_back_its_kind_id_and_port(kind: str, ident: str, port: int) -> None:
    key = route_key(kind, ident, port)
    assert key_parts(key) == (kind, ident, port)
    assert len({key, route_key(kind, ident, port + 1), route_key("x", ident, port)}) == 3
