"""Resource gates beyond sandboxes: LLM API limits, per-tenant session slots, any named
resource, on the same machinery as the sandbox gates.

A gate is declared in the integration config with keys `resource.<name>.<limit>`
(`config.ResourceGate`): concurrent permits, a request rate, token rates whose cost is
estimated up front and settled afterwards (`gates.bucket`, a bucket that runs into
debt), each also per tenant. The operations (`operations.py`): `acquire` (grant a leased
permit or queue fairly: `gates.queue`, `gates.place`), `settle` (the actual cost
and the provider's answer; a 429 or 529 sets the shared cooldown, `gates.cooldown`),
`release` with a `resource` key. Every decision is one compare-and-swap on the gate's
document (`gates.cas`).

Module map: state (the stored document and keys), limits (the buckets a gate has),
blocking (what blocks a waiter and its queue status), ledger (load/save), acquire, settle,
release, provider (reading the provider's answer), results, status (the `status`
snapshot), inspect (the public read-only view), operations (the component's entry).
"""

from provisioner.resources.operations import dispatch_resource, is_resource_request

__all__ = ["dispatch_resource", "is_resource_request"]
