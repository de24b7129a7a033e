"""What `serve` checks before it starts and on every `GET /readyz`: that the storage takes
a write and that the gateway would not refuse the E2B URL. Either failing means every
provision would fail, so a balancer should send nothing here (readyz 503), and a
configuration that can never provision does not start at all."""

from __future__ import annotations

from dataclasses import dataclass

from host.services.http_gateway import AddressPolicy, AllowedBase
from host.storage.base import StorageBackend
from provisioner.ports import HttpError

READINESS_NAMESPACE = "sandbox-provisioner/serve"
READINESS_KEY = "readyz-probe"
PROBE_TTL_MS = 60_000


def probe_storage_write(storage: StorageBackend) -> None:
    """Write the probe key (raises the backend's error when storage cannot be written). A
    compare-and-swap lost to another probe still shows that storage takes writes."""
    found = storage.get(READINESS_NAMESPACE, READINESS_KEY)
    storage.compare_and_swap(
        READINESS_NAMESPACE,
        READINESS_KEY,
        None if found is None else found.version,
        b"ready",
        PROBE_TTL_MS,
    )


@dataclass
class E2BAddressCheck:
    """Whether the gateway would refuse the E2B URL: the same rules (http_gateway.py), the
    same 30 s cache of the resolution."""

    url: str
    allow_private_network: bool

    def __post_init__(self) -> None:
        allowed = AllowedBase.parse(self.url)
        self._policy = AddressPolicy(allowed.host, allowed.port, self.allow_private_network)

    def refusal(self) -> str | None:
        """Why every provision would be refused, with the fix; None when it would not be. A
        name that does not resolve right now is not a refusal: E2B is unavailable, and
        provisions queue with backoff until it resolves."""
        try:
            refused = self._policy.refusal()
        except HttpError:
            return None
        if refused is None:
            return None
        return (
            f"the E2B URL {self.url} is refused by the gateway ({refused}): pass "
            "--allow-private-network for a local mock E2B, or give E2B's public URL"
        )


__all__ = [
    "READINESS_KEY",
    "READINESS_NAMESPACE",
    "E2BAddressCheck",
    "probe_storage_write",
]
