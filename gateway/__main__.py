"""Command line: ``gateway serve`` (all in one), ``gateway api`` and ``gateway edge`` (the two planes
apart), ``gateway keys create|list|revoke``, ``gateway certs import|list|delete``, ``gateway image
build|list``, ``gateway egress-ca`` (the CA that VMs with egress trust, PEM).

The only place that exits.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import uvloop

from gateway.app import (
    API_SOCKET,
    admin_client,
    running_control_plane,
    running_edge_only,
    running_gateway,
)
from gateway.config import Config, ConfigError, load_config, override
from gateway.datadir import DataDirBusy
from gateway.doctor import diagnose, isolation
from gateway.embedded_redis import EmbeddedRedisError
from gateway.errors import GatewayError
from gateway.images.store import image_store
from gateway.keys import ApiKeyStore
from gateway.log import configure_logging
from gateway.orchestrator.drivers.qemu import QemuVmDriver
from gateway.orchestrator.drivers.qemu_image import ImageError, build_image
from gateway.orchestrator.drivers.qemu_image import load_manifest as load_qemu_manifest
from gateway.orchestrator.drivers.registry import make_driver, qemu_image_dir
from gateway.state.keyspace import Keys
from gateway.tls.bundle import BadCertificate, CertBundle, parse_bundle
from gateway.tls.egress_ca import deployment_ca
from gateway.tls.local import StorageKeyError
from gateway.tls.serving import cert_store

log = logging.getLogger("gateway")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; the global options are always present (None/False when not given)."""
    args = build_parser().parse_args(argv)
    for name, default in (("config", None), ("data_dir", None), ("verbose", False)):
        if not hasattr(args, name):
            setattr(args, name, default)
    return args


def build_parser() -> argparse.ArgumentParser:
    # The global options are accepted before or after any command (`gateway serve --config FILE`):
    # SUPPRESS keeps a command's parser from resetting what was given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="TOML config file (default: config/gateway.toml)",
    )
    common.add_argument(
        "--data-dir",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="data folder: embedded Redis, VM folders, lock",
    )
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging"
    )
    parser = argparse.ArgumentParser(
        prog="gateway",
        parents=[common],
        description="Ingress gateway and control plane for sandbox VMs.",
        epilog="Settings: config/gateway.toml (or --config); any setting can be overridden with "
        "GATEWAY_<SECTION>_<KEY>, e.g. GATEWAY_REDIS_URL=redis://host:6379/0.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve", parents=[common], help="run the control plane and the edge (app URLs) on one listener"
    )
    serve.add_argument("--listen", metavar="HOST:PORT", help="address to listen on (default 127.0.0.1:8080)")
    serve.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="edge processes sharing the listener (SO_REUSEPORT), this one included (default 1)",
    )

    api = commands.add_parser(
        "api",
        parents=[common],
        help="run only the control plane (API, VMs, reaper, certificates) for separate gateway edge "
        "processes to forward API requests to",
    )
    api.add_argument("--listen", metavar="HOST:PORT", help="address of the API (default: server.listen)")
    edge = commands.add_parser(
        "edge",
        parents=[common],
        help="run only the edge (app URLs) beside a running gateway; needs GATEWAY_REDIS_URL "
        "(serve --workers N starts N - 1 of these)",
    )
    edge.add_argument("--listen", metavar="HOST:PORT", help="address to listen on (SO_REUSEPORT)")
    edge.add_argument(
        "--api-upstream",
        "--api-socket",
        metavar="HOST:PORT|PATH",
        help="the control plane, for API requests: gateway api's address or a unix socket "
        "(default: edge.api_upstream, else <data-dir>/api.sock)",
    )
    edge.add_argument(
        "--stats-dir",
        metavar="DIR",
        help="as a worker of gateway serve: leave counters there for the serving process's /metrics",
    )

    keys = commands.add_parser("keys", parents=[common], help="manage API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = key_commands.add_parser(
        "create", parents=[common], help="create a key; prints the key alone on the last line"
    )
    create.add_argument("--name", required=True, help="a label for the key (who or what uses it)")
    create.add_argument(
        "--org",
        metavar="ORG_UUID",
        help="an organisation's key: opens /orgs/<ORG_UUID>/api/instances and that organisation's instances",
    )
    key_commands.add_parser(
        "list", parents=[common], help="list keys (ids, names, creation times; never the keys)"
    )
    revoke = key_commands.add_parser(
        "revoke", parents=[common], help="revoke a key by id, or every key with a name"
    )
    revoke.add_argument("key", metavar="ID_OR_NAME")

    certs = commands.add_parser("certs", parents=[common], help="manage the certificates the edge serves")
    cert_commands = certs.add_subparsers(dest="certs_command", required=True, metavar="ACTION")
    add = cert_commands.add_parser(
        "import", parents=[common], help="store a certificate chain and key; every edge serves it at once"
    )
    add.add_argument("--cert", required=True, metavar="FILE", help="PEM chain, leaf first")
    add.add_argument("--key", required=True, metavar="FILE", help="PEM private key (unencrypted)")
    cert_commands.add_parser("list", parents=[common], help="list stored certificates and their expiry")
    delete = cert_commands.add_parser("delete", parents=[common], help="stop serving a certificate")
    delete.add_argument("cert_id", metavar="ID")
    image = commands.add_parser(
        "image", parents=[common], help="VM images: root file systems ([images]) and the qemu boot image"
    )
    image_commands = image.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    build = image_commands.add_parser(
        "build",
        parents=[common],
        help="build root file system images from Debian packages (mmdebstrap) into images.dir (with "
        "vms.driver = qemu also their qemu disks, and the boot image when missing), or the qemu boot "
        "image (--qemu: kernel and initramfs) into qemu.image_dir",
    )
    build.add_argument(
        "names", nargs="*", metavar="NAME", help="images of [images.definitions] (default: images.default)"
    )
    build.add_argument("--all", action="store_true", help="every image of [images.definitions]")
    build.add_argument("--qemu", action="store_true", help="the qemu driver's boot image")
    build.add_argument("--into", metavar="DIR", help="build here instead of images.dir (qemu.image_dir)")
    build.add_argument(
        "--remove-stale",
        action="store_true",
        help="also remove builds of older definitions of these images (only when no VM runs on them)",
    )
    image_commands.add_parser(
        "list", parents=[common], help="the defined root file system images: built or not, digest"
    )
    commands.add_parser(
        "egress-ca",
        parents=[common],
        help="print the deployment's egress CA certificate (PEM), which VMs with egress trust "
        "(made now if no gateway has made it yet)",
    )
    commands.add_parser(
        "doctor", parents=[common], help="check what the configured VM driver needs (KVM or TCG, image)"
    )
    return parser


def configure(args: argparse.Namespace) -> Config:
    config = load_config(args.config)
    server: dict[str, object] = {}
    if args.data_dir:
        server["data_dir"] = args.data_dir
    if getattr(args, "listen", None):
        server["listen"] = args.listen
        if config.server.public_url == "http://127.0.0.1:8080" and args.command != "api":
            # (gateway api's address is not where clients go: app URLs name the edges')
            server["public_url"] = f"http://{args.listen}"
    if getattr(args, "workers", None) is not None:
        server["workers"] = args.workers
    return override(config, server=server) if server else config


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def serve(config: Config, config_file: str | None) -> None:
    stop = _stop_on_signals()
    async with running_gateway(config, config_file, stop) as svc:
        redis_where = config.redis.url or "embedded redis-server in " + str(config.data_path / "redis")
        workers = f", {config.server.workers} edge processes" if config.server.workers > 1 else ""
        tls = f" and https://{config.tls.listen}" if config.tls.listen else ""
        edge = f", {svc.edge.implementation} edge" if svc.edge is not None else ""
        print(
            f"gateway listening on http://{config.server.listen}{tls} "
            f"(VM driver {svc.orchestrator.driver.name}, {redis_where}{workers}{edge}); Ctrl-C stops it",
            flush=True,
        )
        # After the readiness line (what scripts wait for): what stands between VMs and this host.
        print(f"isolation: {isolation(svc.orchestrator.driver)}", flush=True)
        await stop.wait()
        log.info("stopping")


async def api_only(config: Config) -> None:
    stop = _stop_on_signals()
    async with running_control_plane(config, stop) as svc:
        redis_where = config.redis.url or "embedded redis-server in " + str(config.data_path / "redis")
        print(
            f"control plane listening on http://{config.server.listen} (VM driver "
            f"{svc.orchestrator.driver.name}, {redis_where}); edges: gateway edge --api-upstream "
            f"{config.server.listen}",
            flush=True,
        )
        print(f"isolation: {isolation(svc.orchestrator.driver)}", flush=True)
        await stop.wait()
        log.info("stopping")


async def edge_only(config: Config, api_upstream: str | None, stats_dir: str | None) -> None:
    stop = _stop_on_signals()
    upstream = api_upstream or config.edge.api_upstream or str(config.data_path / API_SOCKET)
    async with running_edge_only(config, upstream, Path(stats_dir) if stats_dir else None) as edge:
        where = f"http://{config.server.listen} (pid {os.getpid()}, {edge.implementation} edge)"
        print(f"edge listening on {where}", flush=True)
        await stop.wait()


async def keys_command(config: Config, args: argparse.Namespace) -> None:
    async with admin_client(config) as client:
        store = ApiKeyStore(client, Keys(config.redis.key_prefix))
        if args.keys_command == "create":
            try:
                key, rec = await store.create(args.name, org=args.org)
            except ValueError as exc:
                raise SystemExit(f"gateway: {exc}") from None
            org = f" for organisation {rec.org}" if rec.org else ""
            print(f"created key {rec.key_id} named {rec.name!r}{org}; it is shown only now:")
            print(key)
        elif args.keys_command == "list":
            for rec in await store.list():
                org = f"\torg {rec.org}" if rec.org else ""
                print(f"{rec.key_id}\t{rec.name}\t{rec.created_at:.0f}{org}")
        elif args.keys_command == "revoke":
            revoked = await store.revoke(args.key)
            if not revoked:
                raise SystemExit(f"gateway: no key with id or name {args.key!r}")
            for rec in revoked:
                print(f"revoked {rec.key_id} ({rec.name})")


async def certs_command(config: Config, args: argparse.Namespace) -> None:
    async with admin_client(config) as client:
        store = await asyncio.to_thread(cert_store, config, client)
        if args.certs_command == "import":
            try:
                bundle = await asyncio.to_thread(_read_bundle, args.cert, args.key)
            except OSError as exc:
                raise SystemExit(f"gateway: {exc.filename}: {exc.strerror}") from None
            except BadCertificate as exc:
                raise SystemExit(f"gateway: certificate refused: {exc}") from None
            cert_id = await store.put(bundle, source="import")
            print(f"stored {cert_id} for {', '.join(bundle.names)}, valid until {_utc(bundle.not_after)}")
        elif args.certs_command == "list":
            for cert_id, not_after in sorted((await store.expiries()).items()):
                print(f"{cert_id}\tvalid until {_utc(not_after)}")
        elif args.certs_command == "delete":
            if not await store.delete(args.cert_id):
                raise SystemExit(f"gateway: no certificate {args.cert_id!r}")
            print(f"deleted {args.cert_id}")


async def egress_ca_command(config: Config) -> None:
    async with admin_client(config) as client:
        ca = await deployment_ca(config, client)
    sys.stdout.write(ca.cert_pem.decode("ascii"))


def image_command(config: Config, args: argparse.Namespace) -> None:
    if args.image_command == "list":
        for view in image_store(config).describe():
            state = "built" if view["built"] else "not built"
            default = " (the default)" if view["default"] else ""
            print(f"{view['name']}\t{state}\t{view['digest']}\t{view['description']}{default}")
        return
    if args.qemu:
        if args.names or args.all:
            raise SystemExit("gateway: --qemu builds the qemu boot image only; name no other image")
        build_qemu_boot_image(Path(args.into) if args.into else qemu_image_dir(config))
        return
    if args.into:
        config = override(config, images={"dir": args.into})
    store = image_store(config)
    names = store.names() if args.all else args.names or [store.default]
    unknown = [name for name in names if name not in store.names()]
    if unknown:
        raise SystemExit(
            f"gateway: no image {', '.join(unknown)} in [images.definitions]; defined: "
            f"{', '.join(store.names())}"
        )
    for name in names:
        if store.is_built(name) and not args.remove_stale:
            print(f"image {name} is built and current ({store.digest(name)}): {store.folder(name)}")
            continue
        store.ensure(name, say=lambda line: print(line, flush=True), remove_stale=args.remove_stale)
    driver = make_driver(config)
    if isinstance(driver, QemuVmDriver):
        try:
            load_qemu_manifest(qemu_image_dir(config))
        except ImageError:  # (rebuilt only when missing or stale: its boot templates go with it)
            build_qemu_boot_image(qemu_image_dir(config))
        # The qemu driver's form of each image: an ext4 disk beside its root (else made at its first VM).
        for name in names:
            disk = asyncio.run(driver.image_disk(name))
            print(f"image {name}: qemu disk {disk.path} ({disk.disk_id})")


def build_qemu_boot_image(target: Path) -> None:
    try:
        build_image(target)
    except ImageError as exc:
        raise SystemExit(f"gateway: {exc}") from None


def _read_bundle(cert_file: str, key_file: str) -> CertBundle:
    return parse_bundle(Path(cert_file).read_bytes(), Path(key_file).read_bytes())


def _utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(epoch))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = configure(args)
        configure_logging(config.log.format, "debug" if args.verbose else config.log.level)
        if args.command == "serve":
            uvloop.run(serve(config, args.config))
        elif args.command == "edge":
            uvloop.run(edge_only(config, args.api_upstream, args.stats_dir))
        elif args.command == "api":
            uvloop.run(api_only(config))
        elif args.command == "keys":
            uvloop.run(keys_command(config, args))
        elif args.command == "certs":
            uvloop.run(certs_command(config, args))
        elif args.command == "egress-ca":
            uvloop.run(egress_ca_command(config))
        elif args.command == "image":
            image_command(config, args)
        elif args.command == "doctor":
            lines, ok = uvloop.run(diagnose(config))
            print("\n".join(lines))
            sys.exit(0 if ok else 1)
    except (ConfigError, DataDirBusy, EmbeddedRedisError, GatewayError, StorageKeyError) as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
