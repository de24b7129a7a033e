"""Temper-style sessions: a spec executor (Temper's rules) on the wall clock or virtual time."""

from host.sessions.driver import DriverSettings, Invoker, SessionDriver
from host.sessions.invokers import ComponentInvoker, DirectInvoker
from host.sessions.model import Job, SessionEvent, SessionResult
from host.sessions.report import Limits, ideal_makespan_s
from host.sessions.runner import RunResult, SessionScript
from host.sessions.spec import Spec, SpecError, load_spec, packaged_spec
from host.sessions.timescale import TimeScale

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
