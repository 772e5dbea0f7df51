"""Configuration: one frozen dataclass tree from config/gateway.toml plus GATEWAY_<SECTION>_<KEY> env.

This is the only module that reads the environment. Loading validates and has no side effects.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gateway.state.redis_url import RedisUrlError, has_hash_tag, parse_cluster_url, parse_sentinel_url

ENV_PREFIX = "GATEWAY_"
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent.parent / "config" / "gateway.toml"


MAX_WORKERS = 64
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DOMAIN_RE = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(?:\.{_LABEL})+")
_CATALOG_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ROOTFS_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
# Debian policy 5.6.7: lower case letters, digits, + - and . (at least two characters, a letter or a
# digit first).
_DEBIAN_PACKAGE_RE = re.compile(r"[a-z0-9][a-z0-9+.-]+")
_DEBIAN_SUITE_RE = re.compile(r"[a-z][a-z0-9-]{0,63}")


def comma_list(value: str) -> tuple[str, ...]:
    """A comma-separated setting: its items stripped and lower-cased, empty ones dropped."""
    return tuple(part.strip().lower() for part in value.split(",") if part.strip())


class ConfigError(ValueError):
    """The configuration is invalid; the message names the setting."""


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "127.0.0.1:8080"
    data_dir: str = "data"
    # Base URL clients use to reach this gateway; app URLs are built from it.
    public_url: str = "http://127.0.0.1:8080"
    shutdown_grace_s: float = 10.0
    # Edge processes sharing the listener (SO_REUSEPORT): this process plus workers - 1 children.
    workers: int = 1

    @property
    def host(self) -> str:
        return split_host_port(self.listen)[0]

    @property
    def port(self) -> int:
        return split_host_port(self.listen)[1]


@dataclass(frozen=True)
class RedisConfig:
    # Empty: start an embedded redis-server on a unix socket inside data_dir.
    url: str = ""
    key_prefix: str = "gw:"
    call_timeout_s: float = 2.0
    server_binary: str = "redis-server"


@dataclass(frozen=True)
class ApiConfig:
    max_body_bytes: int = 1024 * 1024
    # Where direct (host-form) app URLs live: vmid-<id>-<port>.<sandbox_domain>, with the scheme and
    # port of server.public_url. *.localhost resolves to loopback, so the default works out of the box.
    sandbox_domain: str = "sandbox.localhost"


# edge.implementation's values (gateway/edge/impl.py selects by them).
EDGE_IMPLEMENTATIONS = ("auto", "compiled", "pure")


@dataclass(frozen=True)
class EdgeConfig:
    # Host names (comma-separated) that serve the API and path-form app URLs; empty: any host that is
    # not under a sandbox domain.
    api_hosts: str = ""
    # Where `gateway edge` sends API requests: the control plane's HOST:PORT (`gateway api`) or unix
    # socket path. Empty: <data_dir>/api.sock, the control plane of `gateway serve` on this machine.
    api_upstream: str = ""
    # Extra base domains for host-form app URLs, besides api.sandbox_domain (comma-separated).
    extra_sandbox_domains: str = ""
    # Peers whose X-Forwarded-* / Forwarded headers are trusted (comma-separated IPs): a load balancer.
    trusted_proxies: str = ""
    header_timeout_s: float = 10.0
    # Idle keep-alive on the client side; the upstream side's is shorter (the edge closes first).
    keepalive_timeout_s: float = 75.0
    upstream_connect_timeout_s: float = 5.0
    upstream_first_byte_timeout_s: float = 60.0
    # No bytes either way for this long ends a streaming response (0: never, so SSE and long polls
    # may stay quiet) or an upgraded connection such as a WebSocket.
    stream_idle_timeout_s: float = 0.0
    tunnel_idle_timeout_s: float = 3600.0
    # A client that takes none of the output pending for it for this long is dropped, with the VM's
    # side of its exchange (0: never). Quiet streams with nothing pending are not affected.
    send_timeout_s: float = 60.0
    # A WebSocket frame, or a message (the sum of its fragments), over these closes the connection with
    # 1009 both ways (0: no limit). Protocol errors (an unmasked client frame...) close with 1002.
    ws_max_frame_bytes: int = 16 * 2**20
    ws_max_message_bytes: int = 64 * 2**20
    # Redis unreachable: routes the edge knew keep being served this long from the first failed lookup,
    # then requests get 503 until Redis is back (0: fail closed at once).
    redis_grace_s: float = 30.0
    # Largest request body for app URLs (413); 0: no limit. The API has its own (api.max_body_bytes).
    max_body_bytes: int = 0
    max_header_count: int = 100
    max_header_bytes: int = 32768
    max_target_bytes: int = 8192
    # Open client connections per edge process; beyond it new ones get 503 and are closed.
    max_connections: int = 10000
    # Requests in flight and open tunnels (WebSockets...) to one VM, per edge process; beyond it a request
    # gets 429 with Retry-After. 0: no cap.
    max_exchanges_per_vm: int = 0
    # API requests per second per API key, per edge process (a token bucket of api_burst_per_key);
    # beyond it 429 with Retry-After. 0: no limit.
    api_rate_per_key: float = 0.0
    api_burst_per_key: int = 20
    # HTTP/2 from clients: ALPN h2 on the TLS listener and h2c with prior knowledge on the plain one; each
    # connection takes at most http2_max_streams streams at once.
    http2: bool = True
    http2_max_streams: int = 128
    # How often each edge process adds the bytes, requests and client activity it saw per VM to the
    # VMs' records (usage, last_activity): an idle_timeout_s acts up to this much late.
    traffic_flush_s: float = 1.0
    # Which edge runs (gateway/edge/impl.py): "auto" the compiled one when it is built and current, else
    # the pure-Python one; "compiled" refuses to start without it; "pure" never uses it.
    implementation: str = "auto"  # one of EDGE_IMPLEMENTATIONS

    # The comma-separated settings, parsed once (per config object) for every caller.
    @functools.cached_property
    def api_host_names(self) -> tuple[str, ...]:
        return comma_list(self.api_hosts)

    @functools.cached_property
    def extra_sandbox_domain_names(self) -> tuple[str, ...]:
        return comma_list(self.extra_sandbox_domains)

    @functools.cached_property
    def trusted_proxy_addresses(self) -> frozenset[str]:
        return frozenset(comma_list(self.trusted_proxies))

    split = staticmethod(comma_list)  # its older name


@dataclass(frozen=True)
class VmsConfig:
    # "auto": netns when root on Linux, else process.
    driver: str = "auto"
    default_lifetime_s: int = 300
    # The spec's bounds for vm_lifetime_seconds; tests lower the minimum to see expiry quickly.
    min_lifetime_s: int = 20
    max_lifetime_s: int = 86400
    default_memory_mb: int = 512
    default_vcpu_count: int = 2
    # How long the record of a killed VM (and its session) stays readable.
    retention_s: int = 86400
    boot_timeout_s: float = 30.0
    reaper_interval_s: float = 0.5
    # A suspended VM (POST /v1/vms/{id}/suspend, or auto_suspend at the end of its lifetime) is kept this
    # long for a resume, then ended like an expired one.
    max_suspended_s: int = 7 * 86400
    # How long an edge holds a request for a suspended auto_resume VM while it resumes.
    wake_timeout_s: float = 60.0
    # The shortest idle_timeout_s a VM may ask for (the longest is max_lifetime_s; 0 asks for none).
    min_idle_timeout_s: int = 60


NETNS_MIN_DISK_MB = 16
NETNS_MIN_PIDS = 16


@dataclass(frozen=True)
class NetnsConfig:
    cidr: str = "172.30.0.0/16"
    # Each VM gets a /30: host side .1, VM side .2.
    name_prefix: str = "gw"
    cgroup_name: str = "gateway"
    # The OCI runtime that starts each VM (runc; crun where cgroup v2 is unified).
    runtime: str = "runc"
    # Each VM's writable layer over its image: an ext4 file system of this size (its disk limit).
    disk_mb: int = 2048
    # Processes and threads a VM may have at once (a fork bomb stops there).
    pids_max: int = 1024
    # A VM's root is host uid/gid id_base + slot * 65536 (65536 ids per slot, none of them the host's).
    id_base: int = 1_000_000_000


@dataclass(frozen=True)
class QemuConfig:
    # Private range for VM addresses. The guest half (the lower /n+1) holds the VMs' addresses, the
    # host half the host side of each VM's veth; blackholed as a whole like netns.cidr.
    cidr: str = "172.29.0.0/16"
    name_prefix: str = "gq"
    cgroup_name: str = "gateway-qemu"
    # The boot image, kernel and initramfs (`gateway image build --qemu`); empty: <data_dir>/images/qemu.
    image_dir: str = ""
    # "auto": KVM when a probe VM boots under it (the result is kept per host kernel and image),
    # otherwise TCG (software emulation); or "kvm" / "tcg".
    accel: str = "auto"
    # The in-guest agent's port (POST /execute goes there, with the VM's own token).
    agent_port: int = 49983
    # The first VM of each shape (vCPUs, memory) is saved right after it boots, and later VMs of that
    # shape resume that template instead of booting (then get their own token, env and entropy).
    boot_templates: bool = True
    qemu_binary: str = "qemu-system-x86_64"
    # Each QEMU runs as host uid/gid id_base + 1 + slot (the KVM probe as id_base), with no capabilities;
    # none of these ids may belong to an account or a subordinate-id range of the host.
    id_base: int = 2_000_000


@dataclass(frozen=True)
class ProcessConfig:
    cidr: str = "127.100.0.0/16"
    # Conventional port put in $PORT for apps that read it.
    app_port: int = 8080
    # The process driver isolates nothing: VM code runs as the gateway's user, on the host. As root it
    # refuses to start unless this is true (development only).
    allow_root: bool = False


@dataclass(frozen=True)
class TlsConfig:
    # HOST:PORT of the TLS listener (the edge and the API over HTTPS); empty: no TLS.
    listen: str = ""
    # A TLS handshake must complete within this.
    handshake_timeout_s: float = 10.0
    # With TLS on, plain HTTP on server.listen answers 308 to https:// except for these path prefixes
    # (comma-separated).
    redirect_http: bool = True
    plain_http_paths: str = "/.well-known/acme-challenge/"
    # The port in those redirects (0: tls.listen's port; 443 is left out of URLs).
    public_port: int = 0
    # Key that encrypts private keys stored in Redis (a Fernet key: 32 bytes, url-safe base64); give it
    # as GATEWAY_TLS_STORAGE_KEY or in storage_key_file. Neither: <data_dir>/tls/storage.key is made on
    # first start (fine for one machine; share one key between machines).
    storage_key: str = ""
    storage_key_file: str = ""
    # Where the self-signed certificate served by default (no SNI, or a name without a certificate) is
    # made on first start.
    certs_dir: str = "certs"

    @functools.cached_property
    def plain_http_path_list(self) -> tuple[str, ...]:
        return comma_list(self.plain_http_paths)


@dataclass(frozen=True)
class AcmeConfig:
    # The ACME directory (e.g. https://acme-v02.api.letsencrypt.org/directory); empty: no issuance.
    directory_url: str = ""
    email: str = ""
    # A CA file trusted for the ACME server's HTTPS (a private ACME server); empty: the system's.
    ca_bundle: str = ""
    # Where zones and their name servers are looked up (comma-separated IPs; empty: the system's
    # resolvers), on this port; authoritative servers are asked on authoritative_port.
    dns_resolvers: str = ""
    dns_port: int = 53
    authoritative_port: int = 53
    propagation_timeout_s: float = 120.0
    # RFC 2136 updates (TSIG) for the operator's own certificates: the API hosts and the sandbox
    # wildcards. The secret comes from GATEWAY_ACME_RFC2136_KEY_SECRET.
    rfc2136_server: str = ""
    rfc2136_key_name: str = ""
    rfc2136_key_algorithm: str = "hmac-sha256"
    rfc2136_key_secret: str = ""
    # How often every certificate is checked for renewal (and failed ones retried when their back-off
    # allows).
    check_interval_s: float = 3600.0
    # Custom domains without credentials (dns_provider "delegated" or none): the customer adds
    # _acme-challenge.<domain> CNAME <hash>.<delegation_zone>, a zone the rfc2136 key may update.
    # Empty: the delegated mode is off.
    delegation_zone: str = ""
    # A released custom domain's certificate is deleted this long after (a domain moved or re-added
    # within it keeps its certificate).
    domain_grace_s: float = 86400.0
    # API base URLs for dns-lexicon providers, "name=url" comma-separated (an API proxy, or tests'
    # local stand-in); empty: each provider's own.
    lexicon_api_endpoints: str = ""
    # Customers' own RFC 2136 servers may be loopback, private or link-local addresses. Off: a
    # customer could otherwise point the gateway's TCP connections at its own network (Redis, the VM
    # range, a metadata service). On only where customers' DNS servers are on a private network.
    customer_dns_private_ok: bool = False

    @functools.cached_property
    def dns_resolver_list(self) -> tuple[str, ...]:
        return comma_list(self.dns_resolvers)

    def lexicon_endpoints(self) -> dict[str, str]:
        pairs = (item.partition("=") for item in self.lexicon_api_endpoints.split(",") if item.strip())
        return {name.strip().lower(): url.strip() for name, _, url in pairs}


@dataclass(frozen=True)
class ExecuteConfig:
    # The official SDK waits its client timeout (300 s by default) for an execute without a timeout.
    default_timeout_s: float = 300.0
    max_timeout_s: float = 3600.0
    max_output_bytes: int = 1024 * 1024
    # Commands running at once in one VM (POST /execute and /execute_async); beyond it: 429.
    max_concurrent_per_vm: int = 16


@dataclass(frozen=True)
class ImageConfig:
    """One entry of the browser-instance image catalog: what a VM of this image runs."""

    description: str = ""
    # argv the VM runs as its init (the image's program); "{python}" stands for this gateway's Python.
    command: tuple[str, ...] = ()
    # The port inside the VM that the instance's access_url reaches; the VM counts as started once it
    # accepts connections there.
    port: int = 0
    # VM drivers that can run it; on any other, creating it is refused with ``unavailable``.
    drivers: tuple[str, ...] = ()
    unavailable: str = ""
    # The root file system image ([images.definitions.<name>]) its VM runs on, where the driver has them.
    rootfs: str = "default"


@dataclass(frozen=True)
class SizeConfig:
    vcpu_count: int = 1
    memory_mb: int = 1024


@dataclass(frozen=True)
class LogConfig:
    # "text": human-readable lines (development); "json": one JSON object per line (production).
    format: str = "text"
    level: str = "info"
    # One line per request through the edge (request id, route, ids, status, bytes, times), on stderr
    # with the application log. Never a query string, header value, token or key.
    access_log: bool = True


DEFAULT_PUBLIC_REPOS = (
    "pypi.org,files.pythonhosted.org,registry.npmjs.org,registry.yarnpkg.com,deb.debian.org,"
    "security.debian.org,archive.ubuntu.com,security.ubuntu.com,ports.ubuntu.com,crates.io,index.crates.io,"
    "static.crates.io,proxy.golang.org,sum.golang.org"
)


@dataclass(frozen=True)
class EgressConfig:
    # VMs reach the network only through the egress proxy and resolver (netns and qemu drivers). Off:
    # VMs have no way out at all.
    enabled: bool = False
    # Where the host's nftables redirects a VM's new TCP connections and its DNS (on its veth's address).
    proxy_port: int = 15001
    resolver_port: int = 15053
    # Resolvers the VMs' resolver asks (HOST:PORT, comma separated); empty: those of /etc/resolv.conf.
    upstream_resolvers: str = ""
    # Networks the proxy may dial at all (CIDRs, comma separated); empty: wherever policies allow. Tests
    # set their test range so that even a policy bug cannot dial elsewhere.
    dial_networks: str = ""
    # What allow_public_repos opens: package registries (names, *.suffix allowed).
    public_repos: str = DEFAULT_PUBLIC_REPOS
    # Networks no policy can open beyond the built-in ones (loopback, link-local, multicast, the VM
    # ranges): the gateway's own addresses, Redis, internal services (CIDRs, comma separated).
    denied_networks: str = ""
    # The roots the proxy checks a vault service's host against when it opens TLS to it (a PEM file);
    # empty: the system's. Tests name their own test CA.
    upstream_ca_file: str = ""

    def upstreams(self) -> tuple[tuple[str, int], ...]:
        return tuple(split_host_port(item) for item in comma_list(self.upstream_resolvers))


@dataclass(frozen=True)
class AdminConfig:
    # HOST:PORT of the admin listener: /metrics (Prometheus), /healthz, /readyz. Keep it off the public
    # network. Empty: none.
    listen: str = "127.0.0.1:9091"


# The shipped catalog (config/gateway.toml spells the same): Debian's chromium runs on the embedded
# drivers; Windows is listed so that asking for it gets a clear refusal rather than a fake.
DEFAULT_IMAGES = {
    "debian-12": ImageConfig(
        description=(
            "Chromium from Debian 12, headless; its DevTools protocol (HTTP and WebSocket) at the access URL"
        ),
        command=("{python}", "-m", "gateway.guest.browser", "--port", "9222"),
        port=9222,
        drivers=("netns", "process"),
        rootfs="browser",
    ),
    "windows-10": ImageConfig(
        description="Windows 10 with a desktop browser",
        unavailable=(
            "Windows guests need a hypervisor that boots Windows; this gateway's VM drivers run Linux only"
        ),
    ),
}
DEFAULT_SIZES = {
    "small": SizeConfig(vcpu_count=1, memory_mb=1024),
    "medium": SizeConfig(vcpu_count=2, memory_mb=2048),
    "large": SizeConfig(vcpu_count=4, memory_mb=4096),
}


@dataclass(frozen=True)
class InstancesConfig:
    # Browser instances (the Instances API): each one's access_url is
    # <scheme of public_url>://instance-<uuid>.<domain>[:<port of public_url>]/ on the edge.
    domain: str = "browser.localhost"
    default_lifetime_s: int = 3600
    # The catalog: [instances.images.<name>] and [instances.sizes.<name>] tables.
    # A table given in the TOML replaces the shipped one as a whole.
    images: Mapping[str, ImageConfig] = field(default_factory=lambda: dict(DEFAULT_IMAGES))
    sizes: Mapping[str, SizeConfig] = field(default_factory=lambda: dict(DEFAULT_SIZES))


@dataclass(frozen=True)
class RootfsImageConfig:
    """One root file system image VMs run on: Debian's minbase plus these packages (``gateway.images``)."""

    description: str = ""
    packages: tuple[str, ...] = ()
    suite: str = "bookworm"


# The shipped image definitions (config/gateway.toml spells the same).
# tini is every VM's PID 1 on the netns driver (it reaps orphaned background processes): every image
# lists it.
_SANDBOX_PACKAGES = (
    "tini",
    "bash",
    "coreutils",
    "procps",
    "python3",
    "python3-pip",
    "python3-venv",
    "git",
    "curl",
    "ca-certificates",
    "build-essential",
    "util-linux",
    "iproute2",
)
DEFAULT_ROOTFS_IMAGES = {
    "default": RootfsImageConfig(
        description="Debian 12 with Python 3, pip and venv, git, curl and a C toolchain",
        packages=_SANDBOX_PACKAGES,
    ),
    "python-data": RootfsImageConfig(
        description="The default image plus NumPy and pandas",
        packages=(*_SANDBOX_PACKAGES, "python3-numpy", "python3-pandas"),
    ),
    "browser": RootfsImageConfig(
        description="Debian 12 with Chromium (browser instances)",
        packages=(
            "tini",
            "bash",
            "coreutils",
            "procps",
            "python3",
            "ca-certificates",
            "chromium",
            "fonts-liberation",
            # gateway.guest.browser (its DevTools proxy) runs on the image's Python.
            "python3-aiohttp",
        ),
    ),
}


@dataclass(frozen=True)
class ImagesConfig:
    # Where built images live (<dir>/<name>/<digest>/rootfs); empty: <data_dir>/images/rootfs.
    dir: str = ""
    # The image of a VM whose request names none (image_variant); built at start by drivers that use
    # images (netns).
    default: str = "default"
    # [images.definitions.<name>] tables; a table given in the TOML replaces the shipped one as a whole.
    definitions: Mapping[str, RootfsImageConfig] = field(default_factory=lambda: dict(DEFAULT_ROOTFS_IMAGES))


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    edge: EdgeConfig = field(default_factory=EdgeConfig)
    vms: VmsConfig = field(default_factory=VmsConfig)
    netns: NetnsConfig = field(default_factory=NetnsConfig)
    process: ProcessConfig = field(default_factory=ProcessConfig)
    qemu: QemuConfig = field(default_factory=QemuConfig)
    execute: ExecuteConfig = field(default_factory=ExecuteConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    acme: AcmeConfig = field(default_factory=AcmeConfig)
    instances: InstancesConfig = field(default_factory=InstancesConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    log: LogConfig = field(default_factory=LogConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    egress: EgressConfig = field(default_factory=EgressConfig)

    @property
    def data_path(self) -> Path:
        return Path(self.server.data_dir).resolve()

    @property
    def sandbox_domains(self) -> tuple[str, ...]:
        """Every base domain of host-form app URLs, lower-case: api.sandbox_domain first."""
        extra = self.edge.extra_sandbox_domain_names
        return tuple(dict.fromkeys(d.lower() for d in (self.api.sandbox_domain, *extra) if d))


def split_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _coerce(section: str, key: str, raw: object, kind: type) -> object:
    where = f"{section}.{key}"
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return raw.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{where}: expected a boolean, got {raw!r}")
    if kind in (int, float):
        if isinstance(raw, bool):
            raise ConfigError(f"{where}: expected a number, got {raw!r}")
        try:
            return kind(typing.cast(typing.Any, raw))  # what int() or float() refuse raises below
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {kind.__name__}, got {raw!r}") from None
    if kind is str:
        if not isinstance(raw, str):
            raise ConfigError(f"{where}: expected a string, got {raw!r}")
        return raw
    if kind == tuple[str, ...]:
        if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
            raise ConfigError(f"{where}: expected a list of strings, got {raw!r}")
        return tuple(raw)
    raise ConfigError(f"{where}: unsupported setting type {kind!r}")


# Settings that are tables of named entries (the instance catalog): field -> the entries' dataclass.
_CATALOGS: dict[tuple[str, str], type] = {
    ("instances", "images"): ImageConfig,
    ("instances", "sizes"): SizeConfig,
    ("images", "definitions"): RootfsImageConfig,
}


def _build_section(name: str, cls: type, values: Mapping[str, object]) -> object:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown setting(s) in [{name}]: {', '.join(sorted(unknown))}")
    kwargs: dict[str, object] = {}
    for key, value in values.items():
        entry_cls = _CATALOGS.get((name, key))
        if entry_cls is None:
            kwargs[key] = _coerce(name, key, value, hints[key])
        elif not isinstance(value, Mapping) or not all(isinstance(v, Mapping) for v in value.values()):
            raise ConfigError(f"{name}.{key}: expected tables [{name}.{key}.<name>]")
        else:
            kwargs[key] = {
                entry: _build_section(f"{name}.{key}.{entry}", entry_cls, fields)
                for entry, fields in value.items()
            }
    return cls(**kwargs)


def load_config(path: Path | str | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Load the TOML file (default config/gateway.toml when it exists) then apply GATEWAY_* overrides."""
    environ = os.environ if environ is None else environ
    if path is None:
        path = environ.get("GATEWAY_CONFIG") or (
            DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.exists() else None
        )
    raw: dict[str, dict[str, object]] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    hints = typing.get_type_hints(Config)
    unknown = set(raw) - set(sections)
    if unknown:
        raise ConfigError(f"unknown config section(s): {', '.join(sorted(unknown))}")
    merged: dict[str, dict[str, object]] = {name: dict(raw.get(name, {})) for name in sections}
    for env_key, value in environ.items():
        if not env_key.startswith(ENV_PREFIX) or env_key == "GATEWAY_CONFIG":
            continue
        rest = env_key[len(ENV_PREFIX) :].lower()
        section, _, key = rest.partition("_")
        if section in merged and key:
            merged[section][key] = value
    built = {name: _build_section(name, hints[name], merged[name]) for name in sections}
    config = Config(**built)  # type: ignore[arg-type]
    validate(config)
    return config


def override(config: Config, **sections: Mapping[str, object]) -> Config:
    """Return a copy with some settings replaced, e.g. override(cfg, server={"listen": ...})."""
    changed = {
        name: dataclasses.replace(getattr(config, name), **values) for name, values in sections.items()
    }
    new = dataclasses.replace(config, **changed)
    validate(new)
    return new


def validate(config: Config) -> None:
    split_host_port(config.server.listen)
    try:
        parse_sentinel_url(config.redis.url)
        cluster = parse_cluster_url(config.redis.url)
    except RedisUrlError as exc:
        raise ConfigError(f"redis.url: {exc}") from None
    if cluster is not None and not has_hash_tag(config.redis.key_prefix):
        raise ConfigError(
            "redis.key_prefix: a Redis Cluster needs a hash tag in it, e.g. {gw}: (the gateway's scripts "
            "touch several keys, which must share one slot)"
        )
    vms = config.vms
    if config.vms.driver not in ("auto", "netns", "process", "qemu"):
        raise ConfigError(f"vms.driver: expected auto, netns, process or qemu, got {vms.driver!r}")
    if config.qemu.accel not in ("auto", "kvm", "tcg"):
        raise ConfigError(f"qemu.accel: expected auto, kvm or tcg, got {config.qemu.accel!r}")
    if not 0 < config.qemu.agent_port < 65536:
        raise ConfigError("qemu.agent_port must be between 1 and 65535")
    if not 1 <= vms.min_lifetime_s <= vms.default_lifetime_s <= vms.max_lifetime_s:
        raise ConfigError("vms: need 1 <= min_lifetime_s <= default_lifetime_s <= max_lifetime_s")
    if not 1 <= vms.min_idle_timeout_s <= vms.max_lifetime_s:
        raise ConfigError("vms.min_idle_timeout_s must be between 1 and max_lifetime_s")
    if not config.edge.traffic_flush_s > 0:
        raise ConfigError("edge.traffic_flush_s must be more than 0")
    cidrs = (
        ("netns.cidr", config.netns.cidr),
        ("process.cidr", config.process.cidr),
        ("qemu.cidr", config.qemu.cidr),
    )
    for name, cidr in cidrs:
        try:
            net = ipaddress.IPv4Network(cidr)
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from None
        if net.prefixlen > 29:
            raise ConfigError(f"{name}: {cidr} is too small for VM slots")
    if not ipaddress.IPv4Network(config.process.cidr).subnet_of(ipaddress.IPv4Network("127.0.0.0/8")):
        raise ConfigError("process.cidr must be inside 127.0.0.0/8")
    for name in ("netns", "qemu"):
        if not ipaddress.IPv4Network(getattr(config, name).cidr).is_private:
            raise ConfigError(f"{name}.cidr must be a private range")
    netns = config.netns
    if netns.runtime not in ("runc", "crun") and not netns.runtime.startswith("/"):
        raise ConfigError(f"netns.runtime: runc, crun or an absolute path, got {netns.runtime!r}")
    if netns.disk_mb < NETNS_MIN_DISK_MB:
        raise ConfigError(f"netns.disk_mb must be at least {NETNS_MIN_DISK_MB} (an ext4 layer needs room)")
    if netns.pids_max < NETNS_MIN_PIDS:
        raise ConfigError(f"netns.pids_max must be at least {NETNS_MIN_PIDS} (a VM's init and a command)")
    if (
        netns.id_base < 65536
        or netns.id_base + 65536 * ipaddress.IPv4Network(netns.cidr).num_addresses // 4 > 2**32 - 2
    ):
        raise ConfigError("netns.id_base: every slot's 65536 ids must lie above 65535 and below 2^32 - 1")
    if config.execute.default_timeout_s > config.execute.max_timeout_s:
        raise ConfigError("execute: default_timeout_s exceeds max_timeout_s")
    if config.execute.max_concurrent_per_vm < 1:
        raise ConfigError("execute.max_concurrent_per_vm must be at least 1")
    if config.edge.api_rate_per_key < 0 or config.edge.api_burst_per_key < 1:
        raise ConfigError(
            "edge.api_rate_per_key must be 0 (no limit) or more, edge.api_burst_per_key 1 or more"
        )
    if not 1 <= config.edge.http2_max_streams <= 2**31 - 1:
        raise ConfigError("edge.http2_max_streams must be between 1 and 2147483647")
    if config.edge.max_exchanges_per_vm < 0:
        raise ConfigError("edge.max_exchanges_per_vm must be 0 (no cap) or more")
    if config.api.max_body_bytes < 1024:
        raise ConfigError("api.max_body_bytes must be at least 1024")
    if config.tls.listen:
        split_host_port(config.tls.listen)
    if not 0 <= config.tls.public_port < 65536:
        raise ConfigError("tls.public_port must be between 0 and 65535")
    if config.acme.directory_url:
        if not config.tls.listen:
            raise ConfigError("acme.directory_url needs tls.listen (certificates are for the TLS listener)")
        if not config.acme.rfc2136_server or not config.acme.rfc2136_key_name:
            raise ConfigError("acme: set rfc2136_server and rfc2136_key_name (the operator's DNS zone)")
        split_host_port(config.acme.rfc2136_server)
        for name, url in config.acme.lexicon_endpoints().items():
            if not name or not url.startswith(("http://", "https://")):
                raise ConfigError("acme.lexicon_api_endpoints: expected name=http(s)://... items")
    if not 1 <= config.server.workers <= MAX_WORKERS:
        raise ConfigError(f"server.workers must be between 1 and {MAX_WORKERS}")
    _validate_images(config)
    _validate_instances(config)
    if config.edge.implementation not in EDGE_IMPLEMENTATIONS:
        raise ConfigError(
            f"edge.implementation: expected auto, compiled or pure, got {config.edge.implementation!r}"
        )
    if config.log.format not in ("text", "json"):
        raise ConfigError(f"log.format: expected text or json, got {config.log.format!r}")
    if config.log.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"log.level: expected debug, info, warning or error, got {config.log.level!r}")
    if config.admin.listen:
        split_host_port(config.admin.listen)
    if config.edge.api_upstream and not config.edge.api_upstream.startswith("/"):
        split_host_port(config.edge.api_upstream)


def _validate_instances(config: Config) -> None:
    instances = config.instances
    if not _DOMAIN_RE.fullmatch(instances.domain):
        raise ConfigError(f"instances.domain: {instances.domain!r} is not a lower-case DNS name")
    if instances.domain in config.sandbox_domains:
        raise ConfigError("instances.domain must differ from the sandbox domains")
    if not vms_lifetime_ok(config, instances.default_lifetime_s):
        raise ConfigError("instances.default_lifetime_s must be within vms.min_lifetime_s..max_lifetime_s")
    for name, image in instances.images.items():
        where = f"instances.images.{name}"
        if not _CATALOG_NAME_RE.fullmatch(name):
            raise ConfigError(f"{where}: names are letters, digits, '.', '_' and '-'")
        if image.drivers and (not image.command or not 1 <= image.port <= 65535):
            raise ConfigError(f"{where}: an image that runs needs a command and a port (1-65535)")
        if not image.drivers and not image.unavailable:
            raise ConfigError(f"{where}: list the drivers it runs on, or say why it is unavailable")
        if image.rootfs not in config.images.definitions:
            raise ConfigError(
                f"{where}.rootfs: {image.rootfs!r} is not an image of [images.definitions] "
                f"(defined: {', '.join(config.images.definitions) or 'none'})"
            )
    for name, size in instances.sizes.items():
        if not _CATALOG_NAME_RE.fullmatch(name):
            raise ConfigError(f"instances.sizes.{name}: names are letters, digits, '.', '_' and '-'")
        if size.vcpu_count < 1 or size.memory_mb < 64:
            raise ConfigError(f"instances.sizes.{name}: needs vcpu_count >= 1 and memory_mb >= 64")


def _validate_images(config: Config) -> None:
    images = config.images
    for name, image in images.definitions.items():
        where = f"images.definitions.{name}"
        if not _ROOTFS_NAME_RE.fullmatch(name):
            raise ConfigError(f"{where}: names are lower-case letters, digits and '-' (at most 64)")
        bad = [p for p in image.packages if not _DEBIAN_PACKAGE_RE.fullmatch(p)]
        if bad:
            raise ConfigError(
                f"{where}.packages: {', '.join(map(repr, bad))} is not a Debian package name "
                "(lower-case letters, digits, '+', '-' and '.'; two characters or more)"
            )
        if not _DEBIAN_SUITE_RE.fullmatch(image.suite):
            raise ConfigError(f"{where}.suite: {image.suite!r} is not a Debian suite name (e.g. bookworm)")
    if images.default not in images.definitions:
        raise ConfigError(
            f"images.default: {images.default!r} is not an image of [images.definitions] "
            f"(defined: {', '.join(images.definitions) or 'none'})"
        )


def vms_lifetime_ok(config: Config, seconds: int) -> bool:
    return config.vms.min_lifetime_s <= seconds <= config.vms.max_lifetime_s
