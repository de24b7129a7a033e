"""The shared base of the storage backends and the scheme registry (host/storage/base.py,
host/storage/registry.py)."""

from __future__ import annotations

import fnmatch
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Self

import pytest

from host.storage import (
    MemoryBackend,
    SqliteBackend,
    StorageURIError,
    UnknownStorageScheme,
    known_schemes,
    storage_from_uri,
)
from host.storage.base import FOREVER_MS, MAX_VALUE_BYTES, CheckedBackend, Clock, Write
from host.storage.redis import RedisBackend
from provisioner.ports import Entry, StorageInvalidKey, StorageTooLarge

ROOT = Path(__file__).resolve().parents[3]


class RecordingBackend(CheckedBackend):
    """Primitives that record what reached them; no schemes, so it is not registered."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    @classmethod
    def from_uri(cls, uri: str, *, clock: Clock | None = None) -> Self:
        return cls()

    def now_ms(self) -> int:
        return 0

    def close(self) -> None:
        pass

    def _get(self, namespace: str, key: str) -> Entry | None:
        self.calls.append(("get", namespace, key))
        return None

    def _compare_and_swap(self, write: Write) -> int:
        self.calls.append(("cas", write))
        return 1

    def _delete(self, namespace: str, key: str, expected_version: int | None) -> bool:
        self.calls.append(("delete", namespace, key, expected_version))
        return False

    def _keys(self, namespace: str) -> list[str]:
        self.calls.append(("keys", namespace))
        return ["b", "a"]


@pytest.mark.parametrize(
    ("namespace", "key", "value", "ttl_ms", "error"),
    [
        ("ns", "", b"", None, StorageInvalidKey),
        ("ns", "x" * 513, b"", None, StorageInvalidKey),
        ("ns", "new\nline", b"", None, StorageInvalidKey),
        ("bad\x00ns", "k", b"", None, StorageInvalidKey),
        ("bad\x1fns", "k", b"", None, StorageInvalidKey),
        ("ns", "k", b"v" * (MAX_VALUE_BYTES + 1), None, StorageTooLarge),
        ("ns", "k", b"", 0, StorageInvalidKey),
        ("ns", "k", b"", -5, StorageInvalidKey),
    ],
)
def test_bad_arguments_never_reach_a_backends_primitives(
    namespace: str, key: str, value: bytes, ttl_ms: int | None, error: type[Exception]
) -> None:
    """Bug caught: a check missing from one operation, leaving it to each backend."""
    backend = RecordingBackend()
    with pytest.raises(error):
        backend.compare_and_swap(namespace, key, None, value, ttl_ms)
    if error is StorageInvalidKey and ttl_ms is None:
        with pytest.raises(error):
            backend.get(namespace, key)
        with pytest.raises(error):
            backend.delete(namespace, key, None)
    if namespace != "ns":
        with pytest.raises(error):
            backend.keys(namespace)
    assert backend.calls == []


def test_primitives_get_bytes_a_bounded_ttl_and_sorted_keys() -> None:
    backend = RecordingBackend()
    backend.compare_and_swap("", "k", 7, bytearray(b"v"), 2**64 - 1)  # type: ignore[arg-type]
    backend.compare_and_swap("", "k", None, b"v", FOREVER_MS - 1)
    assert backend.calls == [
        ("cas", Write("", "k", 7, b"v", None)),
        ("cas", Write("", "k", None, b"v", FOREVER_MS - 1)),
    ]
    first = backend.calls[0][1]
    assert isinstance(first, Write) and type(first.value) is bytes
    assert backend.keys("ns") == ["a", "b"]


def test_a_backend_registers_its_schemes_and_a_taken_scheme_is_refused() -> None:
    with pytest.raises(TypeError, match="memory"):

        class Impostor(RecordingBackend):
            schemes = ("memory",)

    assert storage_from_uri("memory://").__class__ is MemoryBackend


def test_each_scheme_gets_its_backend(tmp_path: Path) -> None:
    assert isinstance(storage_from_uri("MEMORY://"), MemoryBackend)
    sqlite = storage_from_uri(f"sqlite://{tmp_path}/s.db")
    assert isinstance(sqlite, SqliteBackend)
    sqlite.close()
    # redis-py connects lazily: no server is needed to build the backend.
    assert isinstance(storage_from_uri("redis://127.0.0.1:1/0"), RedisBackend)
    assert isinstance(storage_from_uri("rediss://127.0.0.1:1/0"), RedisBackend)


@pytest.mark.parametrize(
    "uri", ["postgres://localhost/db", "/var/lib/state.db", "redis-cluster://h:1"]
)
def test_an_unknown_scheme_names_the_known_ones(uri: str) -> None:
    with pytest.raises(UnknownStorageScheme) as raised:
        storage_from_uri(uri)
    assert isinstance(raised.value, StorageURIError)
    assert isinstance(raised.value, ValueError)
    assert raised.value.known == known_schemes()
    for scheme in ("memory", "sqlite", "redis", "rediss", "redis+cluster"):
        assert f"{scheme}://" in str(raised.value)


def test_memory_and_sqlite_uris_never_import_redis() -> None:
    """Bug caught: the registry importing every backend, so that a host without Redis loads
    redis-py at startup."""
    code = (
        "import sys, tempfile\n"
        "from host.storage import storage_from_uri\n"
        "storage_from_uri('memory://')\n"
        "storage_from_uri('sqlite://' + tempfile.mkdtemp() + '/s.db').close()\n"
        "assert 'redis' not in sys.modules, 'redis imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_the_wheel_ships_every_lua_script() -> None:
    """Bug caught: a Lua file the package data does not cover, so that an installed
    wheel lacks it and the Redis backend fails at its first call."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs: list[str] = config["tool"]["setuptools"]["package-data"]["host.storage.lua"]
    scripts = sorted((ROOT / "host" / "storage").rglob("*.lua"))
    assert scripts
    for path in scripts:
        assert path.parent == ROOT / "host" / "storage" / "lua", path
        assert any(fnmatch.fnmatch(path.name, pattern) for pattern in globs), path
    assert (ROOT / "host" / "storage" / "lua" / "__init__.py").is_file()
