"""What the host does to an invocation's config before the guest sees it.

Every host path (`invoke`, `serve`, the sessions' component invoker, native runs) reaches
the guest through `ComponentRuntime.invoke` or `NativeRuntime.invoke`, and both call
`guest_call` first:

- `e2b_api_key` leaves the config. Temper resolves `{secret:e2b_api_key}` into the config
  before an invocation (`resolve_secret_templates`); the old module then read
  `config["e2b_api_key"]` and counted a blank value, or one still holding `{secret:`, as
  missing. A usable one becomes the invocation's key, which the gateway attaches to
  requests for the E2B base only; otherwise the host's own key (`E2B_API_KEY`) is used.
- `e2b_api_key_source` is written for the guest: `config`, `host`, or `none` (no usable
  key anywhere), so a provision that needs E2B fails as the old module did, before any
  request. Whatever the context said under that name is replaced.
- `temper_api_url`: when the host has a TemperFS base and the config names none (or a
  blank or unresolved one), the host's base is put there, as `invoke` and `serve` do with
  `e2b_api_url`. The gateway lets the guest reach that base only.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from provisioner.model import Invocation, unresolved

API_KEY = "e2b_api_key"
API_KEY_SOURCE = "e2b_api_key_source"
TEMPER_API_URL = "temper_api_url"


@dataclass(frozen=True)
class GuestCall:
    invocation: Invocation  # what the guest sees: no key
    api_key: str | None  # the invocation's own E2B key; None: the host's


def guest_call(
    invocation: Invocation, *, host_api_key: str | None, temperfs_url: str | None = None
) -> GuestCall:
    """`host_api_key` None: an HTTP service that does not say (a test double standing in
    for the gateway), taken as holding a key."""
    named = [value for key, value in invocation.config if key == API_KEY]
    own = next((value for value in named if not unresolved(value)), None)
    if own is not None:
        source = "config"
    elif host_api_key is None or host_api_key:
        source = "host"
    else:
        source = "none"
    config = [(k, v) for k, v in invocation.config if k not in (API_KEY, API_KEY_SOURCE)]
    if temperfs_url is not None:
        current = next((v for k, v in config if k == TEMPER_API_URL), None)
        if current is None or unresolved(current):
            config = [(k, v) for k, v in config if k != TEMPER_API_URL]
            config.append((TEMPER_API_URL, temperfs_url))
    config.append((API_KEY_SOURCE, source))
    return GuestCall(replace(invocation, config=tuple(config)), own)


def gateway_call(http: Any, invocation: Invocation) -> GuestCall:
    """`guest_call` with the bases and key of the host's HTTP service."""
    return guest_call(
        invocation,
        host_api_key=getattr(http, "api_key", None),
        temperfs_url=getattr(http, "temperfs_url", None),
    )


def key_arguments(api_key: str | None) -> dict[str, Any]:
    """`send`'s keyword for the invocation's own key; nothing when it has none, so an HTTP
    service without the keyword (a test double) still works."""
    return {} if api_key is None else {"api_key": api_key}
