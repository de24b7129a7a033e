"""Builders for the values tests hand the guest: an invocation context with the ordinary
fields filled in, so that a test names only what it is about."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from provisioner.model import Invocation


def invocation(
    config: Mapping[str, str] | Iterable[tuple[str, str]] = (),
    *,
    tenant: str = "acme",
    entity_type: str = "CurationJob",
    entity_id: str = "job-1",
    trigger_action: str = "Provision",
    trigger_params: Mapping[str, Any] | None = None,
    entity_state: Mapping[str, Any] | None = None,
    session_id: str | None = None,
    trace_id: str = "t",
) -> Invocation:
    """The context Temper hands a WASM integration (`provisioner.model.Invocation`).
    `config` is kept in the order given (pairs are kept as they are, repeats included);
    `trigger_params` and `entity_state` are sent as JSON, `{}` when not given."""
    pairs = tuple(config.items()) if isinstance(config, Mapping) else tuple(config)
    return Invocation(
        tenant=tenant,
        entity_type=entity_type,
        entity_id=entity_id,
        trigger_action=trigger_action,
        trigger_params=json.dumps(dict(trigger_params or {})),
        entity_state=json.dumps(dict(entity_state or {})),
        config=pairs,
        session_id=session_id,
        trace_id=trace_id,
    )
