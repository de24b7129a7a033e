"""Machinery the mocks share (E2B in ``harness.mocks.e2b``, Anthropic in ``harness.mocks.llm``): an
ASGI app on a free loopback port in a thread, the counters' lock and ``wait_for``, the
config and stats bases, the ``/_mock/`` control routes and the run-until-signal command
line."""
