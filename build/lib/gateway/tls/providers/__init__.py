"""DNS providers for ACME DNS-01 (each implements ``gateway.tls.dns01.DnsProvider``)."""
