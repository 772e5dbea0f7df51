"""An offline ACME DNS-01 environment for tests: Debian's pebble (ACME server) and bind9 (authoritative
DNS with RFC 2136 updates signed by a TSIG key), both on loopback, started and stopped by a fixture.

Facts this follows (../shared/recipes/acme-dns01.md): pebble needs its own TLS certificate (Debian ships
none) and ``-dnsserver`` (else it asks the system resolver); bind9 needs ``dnssec-validation no`` offline
and its run files in its own folder; ports are picked free and a start is retried if a server lost the
race for one; DNS is ready when it answers SOA over TCP; children get PR_SET_PDEATHSIG.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import dns.asyncquery
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdatatype
import dns.tsigkeyring
import dns.update
import trustme

from gateway.subprocesses import die_with_parent

ZONES = ("example.test", "example.org.test")
TSIG_KEY_NAME = "acme-update-key."
TSIG_ALGORITHM = "hmac-sha256"
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
START_ATTEMPTS = 3


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _free_tcp_udp_port() -> int:
    for _ in range(50):
        port = _free_port()
        with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", port))
            return port
    raise RuntimeError("no port free for both TCP and UDP")


@dataclass
class AcmeTestEnv:
    workdir: Path
    nonce_reject_percent: int = 0
    dns_port: int = 0
    acme_port: int = 0
    management_port: int = 0
    tsig_secret: str = field(default_factory=lambda: base64.b64encode(secrets.token_bytes(32)).decode())
    ca_pem_path: Path = field(init=False)
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def directory_url(self) -> str:
        return f"https://127.0.0.1:{self.acme_port}/dir"

    @property
    def management_url(self) -> str:
        return f"https://127.0.0.1:{self.management_port}"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._write_wfe_tls()
        last: Exception | None = None
        for _ in range(START_ATTEMPTS):
            self.dns_port = _free_tcp_udp_port()
            self.acme_port, self.management_port = _free_port(), _free_port()
            try:
                self._start_bind()
                self._start_pebble()
                return
            except RuntimeError as exc:  # a port taken meanwhile, most likely: try new ones
                last = exc
                self.stop()
        raise RuntimeError(f"the ACME test environment did not start: {last}")

    def stop(self) -> None:
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._procs.clear()

    async def add_cname(self, name: str, target: str) -> None:
        """Point ``name`` at ``target`` (what a customer does in their zone for the delegated mode)."""
        await self.set_record(name, "CNAME", dns.name.from_text(target).to_text())

    async def set_record(self, name: str, kind: str, value: str) -> None:
        """Set one record of a test zone (an A record for a test host of the egress tests, a CNAME)."""
        await self._update(name, kind, lambda update, relative: update.replace(relative, 60, kind, value))

    async def remove_record(self, name: str, kind: str) -> None:
        """Remove what set_record set: the zones live for the whole session, a test leaves them as found."""
        await self._update(name, kind, lambda update, relative: update.delete(relative, kind))

    async def _update(
        self, name: str, kind: str, change: Callable[[dns.update.UpdateMessage, dns.name.Name], None]
    ) -> None:
        fqdn = dns.name.from_text(name)
        zone = next(dns.name.from_text(z) for z in ZONES if fqdn.is_subdomain(dns.name.from_text(z)))
        keyring = dns.tsigkeyring.from_text({TSIG_KEY_NAME: (TSIG_ALGORITHM, self.tsig_secret)})
        update = dns.update.UpdateMessage(zone, keyring=keyring, keyname=TSIG_KEY_NAME)
        change(update, fqdn.relativize(zone))
        response = await dns.asyncquery.tcp(update, "127.0.0.1", port=self.dns_port, timeout=5)
        if response.rcode() != dns.rcode.NOERROR:
            raise RuntimeError(f"{kind} update refused: {dns.rcode.to_text(response.rcode())}")

    def root_pem(self) -> bytes:
        """Pebble's root for the certificates it issues (made anew at every pebble start)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_pem_path))
        with urllib.request.urlopen(f"{self.management_url}/roots/0", context=ctx, timeout=5) as resp:
            return resp.read()

    # --- servers ---------------------------------------------------------------------------------

    def _write_wfe_tls(self) -> None:
        ca = trustme.CA()
        leaf = ca.issue_cert("localhost", "127.0.0.1", "::1")
        self.ca_pem_path = self.workdir / "wfe-ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_pem_path))
        leaf.cert_chain_pems[0].write_to_path(str(self.workdir / "wfe-cert.pem"))
        leaf.private_key_pem.write_to_path(str(self.workdir / "wfe-key.pem"))

    def _spawn(
        self, argv: list[str], log_name: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = open(self.workdir / log_name, "ab")  # the child writes to its own copy of the descriptor
        try:
            proc = subprocess.Popen(
                argv, cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, preexec_fn=die_with_parent, close_fds=True,
            )  # fmt: skip
        finally:
            log.close()
        self._procs.append(proc)
        return proc

    def _start_bind(self) -> None:
        zones = self.workdir / "zones"
        zones.mkdir(exist_ok=True)
        zone_blocks = []
        for zone in ZONES:
            (zones / f"{zone}.zone").write_text(
                f"$ORIGIN {zone}.\n$TTL 60\n"
                f"@ IN SOA ns1.{zone}. hostmaster.{zone}. 1 3600 600 86400 60\n"
                f"@ IN NS ns1.{zone}.\nns1 IN A 127.0.0.1\n@ IN A 127.0.0.1\napp IN A 127.0.0.1\n"
            )
            zone_blocks.append(
                f'zone "{zone}." {{ type primary; file "{zones}/{zone}.zone"; '
                f"update-policy {{ grant {TSIG_KEY_NAME} zonesub TXT CNAME A; }}; }};"
            )
        # A local root zone: with recursion on (below) every name falls under a zone this server holds,
        # so resolving never leaves loopback.
        (zones / "root.zone").write_text(
            "$ORIGIN .\n$TTL 60\n@ IN SOA ns1.example.test. hostmaster.example.test. 1 3600 600 86400 60\n"
            "@ IN NS ns1.example.test.\n"
        )
        zone_blocks.append(f'zone "." {{ type primary; file "{zones}/root.zone"; }};')
        conf = self.workdir / "named.conf"
        conf.write_text(
            f'options {{ directory "{self.workdir}"; pid-file "{self.workdir}/named.pid";\n'
            f'  session-keyfile "{self.workdir}/session.key"; managed-keys-directory "{self.workdir}";\n'
            f"  listen-on port {self.dns_port} {{ 127.0.0.1; }}; listen-on-v6 {{ none; }};\n"
            # Recursion for loopback: pebble's VA asks one server and does not follow CNAMEs itself, as
            # a real ACME server's resolver does (the delegated mode's CNAME leads into another zone).
            "  recursion yes; allow-recursion { 127.0.0.1; }; allow-query-cache { 127.0.0.1; };\n"
            "  dnssec-validation no; notify no; };\n"
            "controls { };\n"
            f'key "{TSIG_KEY_NAME}" {{ algorithm {TSIG_ALGORITHM}; secret "{self.tsig_secret}"; }};\n'
            + "\n".join(zone_blocks)
            + "\n"
        )
        proc = self._spawn(["named", "-g", "-n", "1", "-4", "-c", str(conf)], "named.log")
        deadline = time.monotonic() + START_TIMEOUT_S
        query = dns.message.make_query(f"{ZONES[0]}.", dns.rdatatype.SOA)
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"named exited: {(self.workdir / 'named.log').read_text()[-2000:]}")
            try:  # over TCP: a UDP probe sent before named binds only times out
                if dns.query.tcp(query, "127.0.0.1", port=self.dns_port, timeout=0.5).answer:
                    return
            except (OSError, dns.exception.DNSException):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("named did not answer SOA in time")
            time.sleep(0.02)

    def _start_pebble(self) -> None:
        config = self.workdir / "pebble-config.json"
        config.write_text(
            json.dumps(
                {
                    "pebble": {
                        "listenAddress": f"127.0.0.1:{self.acme_port}",
                        "managementListenAddress": f"127.0.0.1:{self.management_port}",
                        "certificate": str(self.workdir / "wfe-cert.pem"),
                        "privateKey": str(self.workdir / "wfe-key.pem"),
                        "httpPort": _free_port(),
                        "tlsPort": _free_port(),
                        "ocspResponderURL": "",
                        "externalAccountBindingRequired": False,
                    }
                }
            )
        )
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PEBBLE_VA_NOSLEEP": "1",
            "PEBBLE_WFE_NONCEREJECT": str(self.nonce_reject_percent),
            "PEBBLE_AUTHZREUSE": "0",
        }
        argv = ["pebble", "-config", str(config), "-dnsserver", f"127.0.0.1:{self.dns_port}"]
        proc = self._spawn(argv, "pebble.log", env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"pebble exited: {(self.workdir / 'pebble.log').read_text()[-2000:]}")
            try:
                self.root_pem()
                ctx = ssl.create_default_context(cafile=str(self.ca_pem_path))
                with urllib.request.urlopen(self.directory_url, context=ctx, timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("pebble did not answer in time")
            time.sleep(0.05)
