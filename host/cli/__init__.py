"""The `sandbox-provisioner` command line."""
