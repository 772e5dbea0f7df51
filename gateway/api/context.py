"""Typed application keys: what the composition root hands to the API handlers."""

from __future__ import annotations

from aiohttp import web

from gateway.config import Config
from gateway.keys import ApiKeyStore
from gateway.orchestrator.egress import EgressPolicies
from gateway.orchestrator.executions import Executions
from gateway.orchestrator.files import VmFiles
from gateway.orchestrator.instances import InstanceService
from gateway.orchestrator.lifecycle import Lifecycle
from gateway.orchestrator.pty import Terminals
from gateway.orchestrator.service import Orchestrator
from gateway.orchestrator.shares import Shares
from gateway.orchestrator.signed_urls import SignedUrls
from gateway.orchestrator.vm_volumes import VmVolumes

CONFIG = web.AppKey("config", Config)
KEY_STORE = web.AppKey("key_store", ApiKeyStore)
ORCHESTRATOR = web.AppKey("orchestrator", Orchestrator)
INSTANCES = web.AppKey("instances", InstanceService)
FILES = web.AppKey("files", VmFiles)
TERMINALS = web.AppKey("terminals", Terminals)
EXECUTIONS = web.AppKey("executions", Executions)
SHARES = web.AppKey("shares", Shares)
SIGNED_URLS = web.AppKey("signed_urls", SignedUrls)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
EGRESS = web.AppKey("egress", EgressPolicies)
VM_VOLUMES = web.AppKey("vm_volumes", VmVolumes)
