"""The `sandbox-provisioner` console script: the product's commands and the harness's."""
