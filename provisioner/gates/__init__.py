"""The gate engine: the sandbox admission gate and the named resource gates.

Shared: `document` (every gate's stored document and keys), `place`, `queue` (fair order
and reservations), `bucket` (GCRA, settled afterwards), `policies` (cooldown, retry
budget, slots, rate, adaptive capacity, resource buckets), `blocking` (the one walk that
says what blocks a waiter), `cas` (the compare-and-swap loop), `ledger` (what a decision
of either gate loads and saves), the decisions `admit` (admit and acquire), `settle` and
`release`, `results`, and `view`, the one read-only view (status, `operation = inspect`,
the audits). Only the sandbox gate: `sandbox` (its leases, incl. unsettled creates, and
promising its free permits) and `controller`, its façade. `resource` is the resource gates' entry.
docs/gates.md says what is still to merge.
"""
