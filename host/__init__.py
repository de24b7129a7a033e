"""The host harness: runs the provisioner component the way the Temper runtime would."""
