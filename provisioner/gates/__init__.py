"""The gate engine: what every gate (the sandbox admission gate, each named resource gate)
is built from. See docs/gates.md for the module map and what is still to merge."""
