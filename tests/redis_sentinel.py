"""A primary, two replicas and three Sentinels: real ``redis-server`` and ``redis-sentinel``
processes on free loopback ports, tuned to fail over in a few seconds (for the failover tests).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis

from tests.redis_server import RedisServer, free_port

SERVICE = "rankone"
# A primary that does not answer for 1 s is down; replicas confirm writes within 10 s or the
# primary refuses writes (no split brain: an isolated old primary takes no acknowledged write).
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 4000
NODE_ARGS = ["--min-replicas-to-write", "1", "--min-replicas-max-lag", "10"]


def _sentinel_binary() -> list[str]:
    binary = shutil.which("redis-sentinel")
    if binary is not None:
        return [binary]
    server = shutil.which("redis-server")
    if server is None:
        raise RuntimeError("redis-sentinel is not installed (apt-get install redis-sentinel)")
    return [server]  # the same program: `redis-server conf --sentinel`


class SentinelSet:
    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.primary = RedisServer(self.workdir / "n0", extra_args=NODE_ARGS)
        self.replicas = [
            RedisServer(
                self.workdir / f"n{i}",
                extra_args=[*NODE_ARGS, "--replicaof", "127.0.0.1", str(self.primary.port)],
            )
            for i in (1, 2)
        ]
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def nodes(self) -> list[RedisServer]:
        return [self.primary, *self.replicas]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def start(self, timeout: float = 30.0) -> SentinelSet:
        for node in self.nodes:
            node.start()
        for i, port in enumerate(self.sentinel_ports):
            conf = self.workdir / f"sentinel-{i}.conf"  # Sentinel rewrites its own config
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {self.workdir}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {SERVICE} 2\n"
            )
            log = (self.workdir / f"sentinel-{i}.log").open("ab")
            self.sentinels.append(
                subprocess.Popen(
                    [*_sentinel_binary(), str(conf), "--sentinel"], stdout=log, stderr=log
                )
            )
        self.wait_until_settled(timeout)
        return self

    def _sentinel(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=1, decode_responses=True)

    def wait_until_settled(self, timeout: float) -> None:
        """Every Sentinel knows both replicas and the other two Sentinels, and both replicas
        are in sync: only then can a kill fail over."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ready = True
                for port in self.sentinel_ports:
                    with self._sentinel(port) as s:
                        replicas = s.execute_command("SENTINEL", "REPLICAS", SERVICE)
                        others = s.execute_command("SENTINEL", "SENTINELS", SERVICE)
                    ready &= len(replicas) == 2 and len(others) == 2
                with redis.Redis(port=self.primary.port, socket_timeout=1) as p:
                    ready &= int(p.info("replication")["connected_slaves"]) == 2
                if ready:
                    return
            except redis.RedisError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the Sentinels did not settle in {timeout} s (logs in {self.workdir})")

    def primary_port(self) -> int:
        """The port of the primary the Sentinels name now."""
        for port in self.sentinel_ports:
            try:
                with self._sentinel(port) as s:
                    _, found = s.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
                    return int(found)
            except redis.RedisError:
                continue
        raise RuntimeError("no Sentinel answers")

    def kill_primary(self) -> RedisServer:
        """SIGKILL the current primary (no shutdown, no last save): a host lost."""
        port = self.primary_port()
        node = next(n for n in self.nodes if n.port == port)
        assert node.proc is not None
        node.proc.send_signal(signal.SIGKILL)
        node.proc.wait()
        node.proc = None
        return node

    def stop(self) -> None:
        for proc in self.sentinels:
            proc.terminate()
        for proc in self.sentinels:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.sentinels = []
        for node in self.nodes:
            node.stop()
