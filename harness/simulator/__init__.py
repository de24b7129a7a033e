"""Temper-style sessions: a spec executor (Temper's rules) on the wall clock or virtual time."""

from harness.simulator.driver import DriverSettings, Invoker, SessionDriver
from harness.simulator.invokers import ComponentInvoker, DirectInvoker
from harness.simulator.model import Job, SessionEvent, SessionResult
from harness.simulator.report import Limits, ideal_makespan_s
from harness.simulator.runner import RunResult, SessionScript
from harness.simulator.spec import Spec, SpecError, load_spec, packaged_spec
from harness.simulator.timescale import TimeScale

__all__ = [
    "ComponentInvoker",
    "DirectInvoker",
    "DriverSettings",
    "Invoker",
    "Job",
    "Limits",
    "RunResult",
    "SessionDriver",
    "SessionEvent",
    "SessionResult",
    "SessionScript",
    "Spec",
    "SpecError",
    "TimeScale",
    "ideal_makespan_s",
    "load_spec",
    "packaged_spec",
]
