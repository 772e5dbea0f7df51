"""A Redis primary, a replica and a Sentinel on loopback, for failover tests (Debian's redis-server, the
Sentinel being ``redis-server --sentinel``). Every process is the test's own and is stopped by PID."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from pathlib import Path

import redis

SERVICE = "mymaster"
START_TIMEOUT_S = 20.0
DOWN_AFTER_MS = 1000


def _free_port(below: int = 65536) -> int:
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port < below and _is_free(port + 10000 if below < 65536 else port):
            return port


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _wait(condition, what: str, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(redis.RedisError, OSError):
            if condition():
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


class _RedisProcesses:
    """Named redis-server processes of a test: started all or none, stopped by PID."""

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        """Start every process, or leave none running when a step fails."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        raise NotImplementedError

    def _spawn(self, name: str, argv: list[str], log_path: Path) -> None:
        with open(log_path, "wb") as log:  # the child keeps its own descriptor
            self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class RedisHA(_RedisProcesses):
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        super().__init__()
        self.ports = {"primary": _free_port(), "replica": _free_port(), "sentinel": _free_port()}

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.ports['sentinel']}/{SERVICE}/0"

    def client(self, role: str) -> redis.Redis:
        return redis.Redis(port=self.ports[role], socket_timeout=1, decode_responses=True)

    def _server(self, role: str, *extra: str) -> None:
        folder = self.folder / role
        folder.mkdir(parents=True, exist_ok=True)
        argv = ["redis-server", "--port", str(self.ports[role]), "--bind", "127.0.0.1", "--dir", str(folder)]
        argv += ["--save", "", "--appendonly", "no", "--protected-mode", "no", *extra]
        self._spawn(role, argv, folder / "redis.log")

    def _start(self) -> None:
        primary = self.ports["primary"]
        self._server("primary", "--repl-diskless-sync-delay", "0")
        _wait(lambda: self.client("primary").ping(), "the primary")
        self._server("replica", "--replicaof", "127.0.0.1", str(primary))
        _wait(
            lambda: self.client("replica").info("replication").get("master_link_status") == "up",
            "the replica to sync",
        )
        # Online only once the primary has the replica's first acknowledgement (up to a second later):
        # until then it streams nothing to it.
        _wait(
            lambda: self.client("primary").info("replication").get("slave0", {}).get("state") == "online",
            "the primary to stream to the replica",
        )
        folder = self.folder / "sentinel"
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / "sentinel.conf"
        config.write_text(
            f"port {self.ports['sentinel']}\nbind 127.0.0.1\nprotected-mode no\ndir {folder}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {primary} 1\n"
            f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {SERVICE} 10000\n"
        )
        self._spawn("sentinel", ["redis-server", str(config), "--sentinel"], folder / "sentinel.log")
        _wait(lambda: self.replicas_known() > 0, "the Sentinel to find the replica")

    def replicas_known(self) -> int:
        return len(self.client("sentinel").execute_command("SENTINEL", "REPLICAS", SERVICE))

    def primary_port(self) -> int:
        _, port = self.client("sentinel").execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
        return int(port)

    def kill_primary(self) -> None:
        """SIGKILL the primary once the replica has every write so far (replication is asynchronous:
        this tests the gateway through a failover, not Redis's window for losing the last writes)."""
        self.client("primary").wait(1, 5000)
        self.procs["primary"].kill()
        self.procs["primary"].wait()

    def wait_failover(self, timeout_s: float) -> None:
        old = self.ports["primary"]
        _wait(lambda: self.primary_port() != old, "the failover", timeout_s)


class RedisClusterNodes(_RedisProcesses):
    """Three Redis Cluster primaries on loopback (no replicas), joined with ``redis-cli --cluster create``."""

    def __init__(self, folder: Path, count: int = 3) -> None:
        super().__init__()
        self.folder = folder
        # A cluster node also listens on its port + 10000 (the cluster bus).
        self.ports = [_free_port(below=55535) for _ in range(count)]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def _start(self) -> None:
        for port in self.ports:
            folder = self.folder / str(port)
            folder.mkdir(parents=True, exist_ok=True)
            argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder)]
            argv += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--save", ""]
            argv += ["--appendonly", "no", "--protected-mode", "no"]
            self._spawn(str(port), argv, folder / "redis.log")
            _wait(lambda p=port: redis.Redis(port=p, socket_timeout=1).ping(), f"cluster node {port}")
        nodes = [f"127.0.0.1:{port}" for port in self.ports]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=START_TIMEOUT_S,
        )
        _wait(
            lambda: (
                redis.Redis(port=self.ports[0], decode_responses=True).cluster("info")["cluster_state"]
                == "ok"
            ),
            "the cluster to be ok",
        )

    def keys_per_node(self) -> list[list[str]]:
        return [redis.Redis(port=port, decode_responses=True).keys("*") for port in self.ports]
