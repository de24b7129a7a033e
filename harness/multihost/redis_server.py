"""A throwaway `redis-server` process on a free loopback port, for tests and simulations.

    with RedisServer() as server:
        backend = storage_from_uri(server.url)
        server.stop()      # clean shutdown (persists to the append-only file)
        server.start()     # same port, same data directory
        server.restart()
        server.kill()      # SIGKILL: a crash
        server.fsync_every_write()  # hold every acknowledged write across a crash

The port stays the same across restarts, so clients keep their URL. With `persistent=True`
(the default) data survives `stop`/`start` through the append-only file in the temporary
directory; with `persistent=False` every start begins empty, like a Redis without
persistence. mirakuru runs the process; readiness is the server's own "Ready to accept
connections" log line (the port opens before an append-only file has loaded).
With `cluster_node=True` the server is a Redis Cluster node, its cluster bus on a free port
of its own (`cluster_port`); `redis-cli --cluster create` then forms a cluster of them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from mirakuru import Executor
from mirakuru.exceptions import ExecutorError

_READY_LINE = "Ready to accept connections"
_PORT_ATTEMPTS = 5
_LOG_TAIL_LINES = 200


def find_redis_server() -> str | None:
    """The redis-server executable: `$REDIS_SERVER`, else on PATH, else Debian's path."""
    configured = os.environ.get("REDIS_SERVER")
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    found = shutil.which("redis-server")
    if found is not None:
        return found
    for candidate in ("/usr/bin/redis-server", "/usr/sbin/redis-server"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


class RedisServerError(RuntimeError):
    """redis-server is missing, or did not start."""


class _RedisExecutor(Executor):
    """One redis-server process, started once its log file says it is ready."""

    def __init__(self, command: list[str], log: Path, timeout_s: float) -> None:
        super().__init__(
            command,
            timeout=timeout_s,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.log = log

    def pre_start_check(self) -> bool:
        return False  # a fresh port each first start; the same server's port on a restart

    def after_start_check(self) -> bool:
        return _READY_LINE in _read(self.log)


class RedisServer:
    def __init__(
        self,
        *,
        executable: str | None = None,
        persistent: bool = True,
        startup_timeout_s: float = 10.0,
        extra_args: Sequence[str] = (),
        cluster_node: bool = False,
    ) -> None:
        found = executable or find_redis_server()
        if found is None:
            raise RedisServerError(
                "redis-server not found (apt-get install redis-server, or set REDIS_SERVER)"
            )
        self.executable = found
        self.persistent = persistent
        self.startup_timeout_s = startup_timeout_s
        # More redis-server options, e.g. `--cluster-node-timeout 1000`.
        self.extra_args = tuple(extra_args)
        # A cluster node also listens on a bus port, chosen free like the port (Redis's
        # default, port + 10000, can lie above 65535 or be taken).
        self.cluster_node = cluster_node
        self.cluster_port = 0
        self.port = 0
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        self._executor: _RedisExecutor | None = None

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def url(self) -> str:
        if not self.port:
            raise RedisServerError("the server has never been started")
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._executor is not None and self._executor.running()

    @property
    def pid(self) -> int | None:
        process = None if self._executor is None else self._executor.process
        return process.pid if process is not None and self.running else None

    @property
    def data_dir(self) -> Path:
        if self._tempdir is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="redis-server-")
        return Path(self._tempdir.name)

    @property
    def _log_file(self) -> Path:
        return self.data_dir / "redis-server.log"

    def log_tail(self) -> str:
        return "".join(_read(self._log_file).splitlines(keepends=True)[-_LOG_TAIL_LINES:])

    def start(self) -> None:
        if self.running:
            return
        if self.port:
            self._launch(self.port)
            return
        # A free port can be taken between probing and binding: try a few.
        for _ in range(_PORT_ATTEMPTS):
            port = _free_loopback_port()
            if self.cluster_node:
                self.cluster_port = _free_loopback_port()
            try:
                self._launch(port)
            except RedisServerError:
                if "Address already in use" in self.log_tail():
                    continue
                raise
            self.port = port
            return
        raise RedisServerError(f"no free port after {_PORT_ATTEMPTS} attempts")

    def stop(self) -> None:
        """Shut down cleanly (SIGTERM: Redis saves its append-only file, then exits)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.stop()

    def kill(self) -> None:
        """Crash the server (SIGKILL)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.kill()

    def restart(self) -> None:
        self.stop()
        self.start()

    def fsync_every_write(self) -> None:
        """Sync the append-only file on every write (`appendfsync always`; until the next
        start). Redis acknowledges a write before syncing it (`everysec`), so a crash may
        lose the last second: a lost grant would let its slot be granted twice. A
        deployment that must hold its limits across a Redis crash syncs every write."""
        import redis

        client = redis.Redis.from_url(self.url)
        try:
            client.config_set("appendfsync", "always")
        finally:
            client.close()

    def close(self) -> None:
        self.kill()
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _launch(self, port: int) -> None:
        if not self.persistent:
            shutil.rmtree(self.data_dir)
            self.data_dir.mkdir()
        self._log_file.unlink(missing_ok=True)
        args = [
            self.executable,
            "--port", str(port),
            "--bind", self.host,
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "yes" if self.persistent else "no",
            "--daemonize", "no",
            "--logfile", str(self._log_file),
            "--loglevel", "notice",
            *self.extra_args,
        ]  # fmt: skip
        if self.cluster_node:
            args += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-port", str(self.cluster_port),
            ]  # fmt: skip
        executor = _RedisExecutor(args, self._log_file, self.startup_timeout_s)
        try:
            executor.start()
        except ExecutorError as error:
            executor.kill()
            raise RedisServerError(
                f"redis-server on port {port} did not start ({error}):\n{self.log_tail()}"
            ) from None
        self._executor = executor


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
