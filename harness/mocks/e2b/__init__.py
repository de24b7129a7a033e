"""A mock E2B API server that behaves like E2B under load: limits, the two kinds of 429,
latency, faults and idempotency, checked against E2B's own SDK.

    with MockE2BServer(MockE2BConfig.for_plan("hobby", api_key="k", seed=1)) as server:
        server.url                      # http://127.0.0.1:PORT, for E2B_API_URL / api_url
        server.configure(faults=["503:n=3-6"], create_latency_ms=300)
        server.wait_for(lambda s: s.sandboxes_created == 4)
        server.stats(), server.running_sandboxes(), server.orphans(held_ids)

Modules: ``config`` (MockE2BConfig, FaultRule, parse_fault), ``limits`` (GCRA),
``latency``, ``faults`` (which rule fires), ``team`` (what E2B decides for one team at a
given time: the model the simulator's fake E2B shares), ``state`` (the team under the
server's lock and clock),
``stats`` (the snapshot), ``wire`` (E2B's JSON and its request checks), ``connection``
(TCP resets), ``app`` (Starlette routes, pause/resume/connect, the /_mock/ control API),
``server`` (uvicorn in a thread), ``cli``. TemperFS is its own mock
(harness.mocks.temperfs). Answers are checked against E2B's OpenAPI description in the test suite
(tests/harness/mocks/e2b/openapi/).
"""

from harness.mocks.e2b.config import FaultRule, MockE2BConfig, parse_fault
from harness.mocks.e2b.server import MockE2BServer
from harness.mocks.e2b.stats import MockE2BStats

__all__ = ["FaultRule", "MockE2BConfig", "MockE2BServer", "MockE2BStats", "parse_fault"]
