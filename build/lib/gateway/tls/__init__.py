"""TLS at the edge: certificates (checked, stored encrypted in Redis), the SNI table, ACME issuance."""
