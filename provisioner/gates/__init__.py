"""The gate engine: the sandbox admission gate and the named resource gates (docs/gates.md
maps its modules)."""
