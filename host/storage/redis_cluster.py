"""`redis+cluster://host:port,host:port/`: the Redis backend on a Redis Cluster.

URI: `redis+cluster://[[user]:password@]host:port[,host:port…][/0][?options]`, the form
the `limits` library uses (alisaifee/limits, limits/storage/redis_cluster.py). The hosts
are startup nodes: any reachable ones will do, the client discovers the rest of the
cluster and follows it through resharding and failovers. A cluster has database 0 only,
so the path is empty, `/` or `/0`. The options are those of `redis://` (redis-py's
connection options such as `socket_timeout`, plus `key_prefix` and `clock_refresh_ms`);
`key_prefix` must not hold `{` or `}`, which would change the hash tags.

Layout: a Lua script may only touch keys of one hash slot, and compare-and-swap touches an
entry and the counter that hands out its version. So every key of a namespace (all keys of
one account, all keys of one tenant) carries the namespace as its hash tag and lands in one
slot, with a version counter of its own:

    {prefix}{n:<namespace percent-encoded>}e:<key>     the entry (a hash: value, version)
    {prefix}{n:<namespace percent-encoded>}version     the namespace's version counter

(The `n:` keeps the tag non-empty for the empty namespace: Redis hashes a whole key whose
first braces are empty.) Versions thus never repeat for a key, as the contract says; unlike
a single Redis, two namespaces can issue the same number, which nothing compares. A lost
counter is reseeded from the clock as on a single Redis (see `host.storage.redis`).

Time: every host reads TIME from the node serving the slot of `{prefix}{clock}` (through a
one-line script keyed on it), so all hosts sharing the cluster read one clock. Keys expire
on their own node's clock; cluster nodes are expected to be NTP-synchronised, as Redis
assumes for its own failure detection.

Failover: redis-py's cluster client refreshes the slot map after a connection error or a
MOVED reply and retries (3 times, with a short jittered backoff); a call still failing
raises StorageUnavailable, and the backend carries on once the cluster has a master for the
slot again. Redis Cluster replicates asynchronously: a master that crashes can take its
last acknowledged writes with it (Redis's documented guarantee, not this backend's). The
failover test (tests/host/storage/test_redis_cluster.py) therefore lets replication catch
up before it kills a master, and checks the rest: no increment doubled by a retry, none
lost, no version reissued, and the backend following the new master by itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Self
from urllib.parse import quote, urlsplit, urlunsplit

from redis.cluster import ClusterNode, RedisCluster
from redis.connection import parse_url
from redis.exceptions import RedisClusterException, RedisError

from host.storage.base import StorageUnavailable
from host.storage.redis import (
    DEFAULT_SOCKET_TIMEOUT_S,
    RedisBackendBase,
    UrlOptions,
)
from host.storage.registry import StorageURIError

__all__ = ["RedisClusterBackend", "cluster_nodes"]


class RedisClusterBackend(RedisBackendBase[RedisCluster]):
    schemes = ("redis+cluster",)

    @classmethod
    def from_url(cls, url: str) -> Self:
        options = UrlOptions(url)
        nodes = cluster_nodes(url)
        if options.parts.path not in ("", "/", "/0"):
            raise StorageURIError(f"a Redis Cluster has database 0 only: {url!r}")
        cls._check_key_prefix(options.key_prefix)  # before connecting: not an outage
        credentials, at, _ = options.parts.netloc.rpartition("@")
        # redis-py parses and types the connection options (credentials, timeouts, …).
        first = f"{credentials}{at}{nodes[0].host}:{nodes[0].port}"
        try:
            connection: dict[str, Any] = parse_url(  # type: ignore[no-untyped-call]
                urlunsplit(("redis", first, "", options.redis_query, ""))
            )
        except ValueError as error:
            raise StorageURIError(f"{error} in {url!r}") from None
        if connection.pop("db", 0) != 0:
            raise StorageURIError(f"a Redis Cluster has database 0 only: {url!r}")
        for placed in ("host", "port"):
            connection.pop(placed, None)
        connection.setdefault("socket_timeout", DEFAULT_SOCKET_TIMEOUT_S)
        connection.setdefault("socket_connect_timeout", DEFAULT_SOCKET_TIMEOUT_S)
        try:
            client = RedisCluster(startup_nodes=nodes, **connection)
        except (RedisError, RedisClusterException) as error:
            # redis-py connects at construction to learn the slot map.
            raise StorageUnavailable(f"redis cluster at {url!r}: {error}") from error
        return cls(client, key_prefix=options.key_prefix, clock_refresh_ms=options.clock_refresh_ms)

    @classmethod
    def _check_key_prefix(cls, key_prefix: str) -> None:
        if "{" in key_prefix or "}" in key_prefix:
            raise StorageURIError(f"a cluster key_prefix must not hold braces: {key_prefix!r}")

    def _tag(self, namespace: str) -> str:
        return f"{self._prefix}{{n:{quote(namespace, safe='')}}}"

    def _entry_key(self, namespace: str, key: str) -> bytes:
        return f"{self._tag(namespace)}e:{key}".encode("utf-8", "surrogatepass")

    def _counter_key(self, namespace: str) -> bytes:
        return f"{self._tag(namespace)}version".encode()

    def _server_time(self) -> tuple[int, int]:
        seconds, micros = self._time_script(keys=[f"{self._prefix}{{clock}}".encode()])
        return int(seconds), int(micros)

    def _scan(self, namespace: str, match: bytes) -> Iterable[bytes | str]:
        node = self._client.get_node_from_key(  # type: ignore[no-untyped-call]
            self._counter_key(namespace)
        )
        return self._client.scan_iter(match=match, count=1000, target_nodes=node)


def cluster_nodes(url: str) -> list[ClusterNode]:
    """The startup nodes of a `redis+cluster://` URL, in the order written."""
    netloc = urlsplit(url).netloc.rpartition("@")[2]
    nodes = []
    for place in netloc.split(","):
        try:
            parsed = urlsplit(f"//{place}")
            host, port = parsed.hostname, parsed.port
        except ValueError:
            raise StorageURIError(f"malformed node {place!r} in {url!r}") from None
        if not host or port is None:
            raise StorageURIError(f"a cluster node needs host:port, got {place!r} in {url!r}")
        nodes.append(ClusterNode(host, port))  # type: ignore[no-untyped-call]
    return nodes
