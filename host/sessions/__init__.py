"""Temper-style CurationJob sessions driven against the provisioner (or the old one)."""

from host.sessions.driver import DriverSettings, Invoker, RunResult, SessionDriver
from host.sessions.invokers import ComponentInvoker, DirectInvoker
from host.sessions.model import Job, Phase, SessionEvent, SessionResult
from host.sessions.report import Limits, ideal_makespan_s
from host.sessions.timescale import TimeScale

__all__ = [
    "ComponentInvoker",
    "DirectInvoker",
    "DriverSettings",
    "Invoker",
    "Job",
    "Limits",
    "Phase",
    "RunResult",
    "SessionDriver",
    "SessionEvent",
    "SessionResult",
    "TimeScale",
    "ideal_makespan_s",
]
