"""`sandbox-provisioner serve`: the component behind an HTTP API, for Temper's shim."""

from host.serve.app import ServeState, create_app, prepare
from host.serve.pool import InvocationPool
from host.serve.results import temper_result

__all__ = ["InvocationPool", "ServeState", "create_app", "prepare", "temper_result"]
