"""A mock E2B API server that behaves like E2B under load: limits, the two kinds of 429,
latency, faults and idempotency, checked against E2B's own SDK."""

from host.mock_e2b.config import FaultRule, MockE2BConfig, parse_fault
from host.mock_e2b.server import MockE2BServer
from host.mock_e2b.stats import MockE2BStats

__all__ = ["FaultRule", "MockE2BConfig", "MockE2BServer", "MockE2BStats", "parse_fault"]
