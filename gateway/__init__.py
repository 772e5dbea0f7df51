"""Sandbox ingress gateway and control plane.

client -> listener -> /v1/..., /execute            -> control plane (aiohttp, gateway.api)
                   -> /v1/app/<session>/<port>/... -> edge (later) -> VM ip:port
control plane -> orchestrator (sessions, VMs, lifetimes; gateway.orchestrator)
              -> VM driver (netns: network namespace + veth + cgroups; process: dev only)
              -> state store (Redis; gateway.state) -> pub/sub events for every edge's route cache
reaper: kills each VM at its expiry, in whichever process gets there first.
Config: gateway.config (config/gateway.toml + GATEWAY_* env); errors: gateway.errors.
"""
