"""Sandbox ingress gateway and control plane (ARCHITECTURE.md maps the rooms and the rules between them).

client -> edge (gateway.edge: llhttp parse, pure routing, route cache) -> VM ip:port, pooled, streamed
                                                                        -> 101: a tunnel both ways
       -> anything else on the API host -> control plane (gateway.api, aiohttp)
control plane -> orchestrator (use cases, lifetimes, recovery) -> VM driver (netns: runc + network
                 namespace; qemu: confined microVM; process: development only)
              -> state (gateway.state: records, keys, Redis store, typed events on one bus)
                 -> every edge's route cache, certificate follower and domain keeper
certificates: gateway.tls (ACME DNS-01, renewal) -> cert store in Redis -> SNI table in each process
Config: gateway.config (config/gateway.toml + GATEWAY_* env); errors: gateway.errors; wiring: gateway.app.
"""
