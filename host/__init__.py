"""The production host: runs the provisioner component the way the Temper runtime would
(`runtime`), its storage backends (`storage`), the WIT imports' implementations (`services`),
the HTTP service Temper's shim reaches (`serve`), the operator's read-only views
(`operator`) and the command line (`cli`). The harness (package `harness`) builds on it."""
