"""A simulation scenario: the E2B account's limits, the jobs and the session timings, and
what they become: the spec each mode runs, the mock E2B's config, the integration config
laid over the spec's, the driver's settings."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from harness.mocks.e2b import MockE2BConfig
from harness.simulator.driver import DriverSettings
from harness.simulator.executor import ConfigHook, overlay_config
from harness.simulator.model import Job
from harness.simulator.report import Limits
from harness.simulator.spec import Spec, packaged_spec
from harness.simulator.timescale import TimeScale

# The incident's sessions, in the incident's order.
INCIDENT_TITLES = (
    "Chapterglow",
    "Flat Illustration",
    "City Pop",
    "WhimsiCollage",
    "Neumorphic",
    "Watercolor",
    "Anime Scenic",
    "Neo Kawaii",
    "Kawaii Watercolor",
    "Shibuya",
)

MODES = ("direct", "batches", "provisioner")
BATCH_SIZE = 4
# The spec each mode runs: the upstream TemperAgent flow with the old module's behaviour, or
# the example spec with this component.
EXAMPLE_SPEC = "temper_agent.ioa.toml"
UPSTREAM_SPEC = "temper_agent_upstream.ioa.toml"


def mode_spec(mode: str, override: Spec | None = None) -> Spec:
    if mode == "provisioner":
        return override or packaged_spec(EXAMPLE_SPEC)
    return packaged_spec(UPSTREAM_SPEC)


# The component's rate gate runs this far under E2B's when E2B allows no burst, so a
# request delayed on the way cannot arrive early by E2B's clock.
_RATE_MARGIN = 0.95


@dataclass(frozen=True)
class E2BLimits:
    """The mock E2B account. Defaults: ten simultaneous creates pass the rate limiter and
    meet the concurrent-create cap of 4, as the incident's did; past it E2B answers 429."""

    max_concurrent_creates: int | None = 4
    create_rate_per_s: float | None = 5.0
    create_burst: int = 10
    max_sandboxes: int | None = 20
    create_latency_ms: float = 2000.0
    overload: str = "reject"

    def limits(self) -> Limits:
        return Limits(
            create_slots=self.max_concurrent_creates or 1_000_000,
            create_rate_per_s=self.create_rate_per_s,
            create_burst=self.create_burst,
            max_sandboxes=self.max_sandboxes,
            create_latency_s=self.create_latency_ms / 1000,
        )


@dataclass(frozen=True)
class Scenario:
    jobs: int = 10
    tenants: int = 1
    seed: int = 0
    e2b: E2BLimits = field(default_factory=E2BLimits)
    scale: TimeScale = field(default_factory=TimeScale)
    turns: int = 10
    turn_sim_s: float = 300.0
    workers: int | None = None

    @property
    def session_s(self) -> float:
        """D: a session's real running time once it has its sandbox: the runner's turns,
        then its finish (one more turn), as in virtual time (`detsim.VirtualScenario`)."""
        return (self.turns + 1) * self.scale.real_s(self.turn_sim_s)

    def job_list(self, run_id: str) -> list[Job]:
        """Each tenant submits its jobs together, tenant 1 first (a FIFO would serve the
        tenants one after another)."""
        per_tenant = math.ceil(self.jobs / self.tenants)
        jobs = []
        for index in range(self.jobs):
            title = INCIDENT_TITLES[index] if self.jobs <= len(INCIDENT_TITLES) else ""
            jobs.append(
                Job(
                    id=f"job-{run_id}-{index + 1:03d}",
                    tenant=f"tenant-{index // per_tenant + 1}",
                    title=title or f"job-{index + 1:03d}",
                )
            )
        return jobs

    def mock_config(self, api_key: str) -> MockE2BConfig:
        e2b = self.e2b
        return MockE2BConfig(
            api_key=api_key,
            seed=self.seed,
            create_latency_ms=e2b.create_latency_ms,
            create_rate_per_s=e2b.create_rate_per_s,
            create_burst=e2b.create_burst,
            max_concurrent_creates=e2b.max_concurrent_creates,
            create_overload_mode="slow" if e2b.overload == "slow" else "reject",
            max_sandboxes=e2b.max_sandboxes,
        )

    def sandbox_timeout_s(self) -> int:
        """Long enough that no sandbox expires under a running session."""
        return max(300, math.ceil(4 * self.session_s + 600))

    def integration_config(self, e2b_url: str) -> tuple[tuple[str, str], ...]:
        """The component's config: admission mirrors the E2B account's limits."""
        e2b = self.e2b
        rate = e2b.create_rate_per_s
        if rate is None:
            rate_text, burst = "1000", 1000
        else:
            # Hold one token of E2B's burst back, so network jitter never trips its limiter.
            burst = max(1, e2b.create_burst - 1)
            rate_text = f"{rate if e2b.create_burst > 1 else rate * _RATE_MARGIN:g}"
        pairs: list[tuple[str, str]] = [
            ("e2b_api_url", e2b_url),
            ("template_id", "base"),
            ("sandbox_timeout_s", str(self.sandbox_timeout_s())),
            ("create_rate_per_s", rate_text),
            ("create_burst", str(min(burst, 1000))),
            ("create_latency_ms", str(max(1, int(e2b.create_latency_ms)))),
        ]
        # No E2B cap: the component's own gate must not invent one (its defaults,
        # provisioner.config.AdmissionConfig, would cap creates and sandboxes).
        slots = e2b.max_concurrent_creates or 1000
        pairs.append(("create_slots", str(min(slots, 1000))))
        pairs.append(("max_sandboxes", str(min(e2b.max_sandboxes or 100_000, 100_000))))
        return tuple(pairs)

    def configure(self, e2b_url: str) -> ConfigHook:
        """Lays the scenario's integration config over each trigger's (the spec's own
        `operation` stays): the mock's URL, and admission mirroring its limits."""
        return overlay_config(dict(self.integration_config(e2b_url)))

    def driver_settings(self, mode: str, run_id: str) -> DriverSettings:
        # The old provisioner fires every create at once, so give it a thread each; the
        # component's invocations mostly answer in milliseconds, and more threads only
        # add compare-and-swap contention on the account's gate.
        workers = self.workers or (16 if mode == "provisioner" else max(16, min(self.jobs, 64)))
        return DriverSettings(
            turns=self.turns,
            turn_s=self.scale.real_s(self.turn_sim_s),
            sim_per_real=self.scale.sim_per_real,
            batch_size=BATCH_SIZE if mode == "batches" else None,
            workers=workers,
            run_id=run_id,
        )
