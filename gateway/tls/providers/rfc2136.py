"""RFC 2136 dynamic updates signed with TSIG, through dnspython: the operator's own zone (BIND, Knot,
PowerDNS...) and the zone the tests run."""

from __future__ import annotations

from dataclasses import dataclass

import dns.asyncquery
import dns.exception
import dns.name
import dns.rcode
import dns.tsig
import dns.tsigkeyring
import dns.update

from gateway.tls.dns01 import DnsLookup, DnsProviderError, zone_of
from gateway.tls.providers.addresses import is_ip_literal, refusal, refused_server

UPDATE_TIMEOUT_S = 10.0
RECORD_TTL_S = 60


@dataclass(frozen=True)
class Rfc2136Settings:
    server: str  # the primary that accepts updates: an IP address or a name
    port: int
    key_name: str
    key_secret: str  # base64
    key_algorithm: str = "hmac-sha256"
    zone: str = ""  # empty: found from the record's name (SOA lookup)
    # False for customers' servers: only public unicast addresses are dialled (providers/addresses.py).
    private_ok: bool = True


class Rfc2136Provider:
    name = "rfc2136"

    def __init__(self, settings: Rfc2136Settings, lookup: DnsLookup) -> None:
        self.settings = settings
        self.lookup = lookup
        try:
            self._keyring = dns.tsigkeyring.from_text(
                {settings.key_name: (settings.key_algorithm, settings.key_secret)}
            )
        except (ValueError, dns.exception.DNSException) as exc:
            raise DnsProviderError(self.name, f"the TSIG key is unusable: {exc}") from None

    async def present(self, fqdn: str, value: str) -> None:
        await self._update(fqdn, value, add=True)

    async def cleanup(self, fqdn: str, value: str) -> None:
        await self._update(fqdn, value, add=False)

    async def _update(self, fqdn: str, value: str, *, add: bool) -> None:
        if self.settings.zone:
            zone = dns.name.from_text(self.settings.zone)
        else:
            zone = await zone_of(fqdn, self.lookup, provider=self.name)
        name = dns.name.from_text(fqdn)
        if not name.is_subdomain(zone):
            raise DnsProviderError(self.name, f"{fqdn} is not in the zone {zone}")
        keyname = dns.name.from_text(self.settings.key_name)
        update = dns.update.UpdateMessage(zone, keyring=self._keyring, keyname=keyname)
        quoted = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if add:
            update.add(name.relativize(zone), RECORD_TTL_S, "TXT", quoted)
        else:
            update.delete(name.relativize(zone), "TXT", quoted)
        address = await self._server_address()
        try:
            response = await dns.asyncquery.tcp(
                update, address, port=self.settings.port, timeout=UPDATE_TIMEOUT_S
            )
        except dns.tsig.PeerError as exc:
            raise DnsProviderError(self.name, f"the server refused our TSIG key: {exc!r}") from None
        except (OSError, dns.exception.DNSException) as exc:
            raise DnsProviderError(self.name, f"update to {self.settings.server} failed: {exc!r}") from None
        rcode = response.rcode()
        if rcode != dns.rcode.NOERROR:
            raise DnsProviderError(self.name, f"update of {fqdn} refused: {dns.rcode.to_text(rcode)}")

    async def _server_address(self) -> str:
        """The address updates go to: the server itself when it is an IP, else its name resolved; the
        first one allowed (dnspython dials IPs only)."""
        server = self.settings.server
        if is_ip_literal(server):
            addresses = [server]
        else:
            try:
                answer = await self.lookup.resolver().resolve_name(server)
            except dns.exception.DNSException as exc:
                message = f"the server {server} could not be resolved: {exc}"
                raise DnsProviderError(self.name, message) from None
            addresses = list(answer.addresses())
        if self.settings.private_ok:
            return addresses[0]
        for address in addresses:
            if refusal(address) is None:
                return address
        named = server if server == addresses[0] else f"{server} ({addresses[0]})"
        raise DnsProviderError(self.name, f"the server {refused_server(named, addresses[0])}")
