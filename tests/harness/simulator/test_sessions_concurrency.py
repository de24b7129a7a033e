"""The session driver's concurrency model against the real component: many invocations
at once through one ComponentRuntime, as the invocation pool makes them."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from harness.mocks.e2b import MockE2BConfig, MockE2BServer
from harness.simulator import ComponentInvoker, Job
from harness.simulator.invocations import PROVISION, job_invocation
from host.runtime.assembly import open_runtime
from host.runtime.loader import LoadedComponent

pytestmark = pytest.mark.component

KEY = "e2b_concurrency_key"


def test_forty_eight_threads_invoking_at_once_get_only_well_formed_outcomes(
    loaded_component: LoadedComponent,
) -> None:
    """Bug caught: host values mis-lowered under concurrency (wasmtime-py's shared
    variant scratch set, storage errors under compare-and-swap contention), which surface
    as host_error / guest_trap outcomes; and admission letting more than its limits
    through when many invocations decide at once."""
    config = MockE2BConfig(
        api_key=KEY, create_latency_ms=30, max_concurrent_creates=4, max_sandboxes=6
    )
    with (
        MockE2BServer(config) as mock,
        open_runtime(
            e2b_url=mock.url,
            api_key=KEY,
            storage_url="memory://",
            loaded=loaded_component,
            allow_private_network=True,
        ) as runtime,
    ):
        invoker = ComponentInvoker(runtime)
        integration = (
            ("e2b_api_url", mock.url),
            ("create_slots", "4"),
            ("max_sandboxes", "6"),
            ("create_rate_per_s", "1000"),
            ("create_burst", "1000"),
        )
        jobs = [Job(f"job-{i}", f"tenant-{i % 5}") for i in range(60)]

        def one(index: int) -> str:
            job = jobs[index % len(jobs)]
            outcome = invoker.invoke(
                job_invocation(
                    job,
                    operation=PROVISION,
                    trigger_action="Provision",
                    trigger_params={},
                    entity_state={},
                    config=integration,
                    run_id="stress",
                )
            )
            if outcome.error is not None:
                return f"{outcome.error.code}: {outcome.error.message[:80]}"
            return outcome.action

        with ThreadPoolExecutor(48) as pool:
            outcomes = Counter(pool.map(one, range(480)))
        stats = mock.stats()
    assert set(outcomes) <= {"SandboxReady", "SandboxQueued"}, outcomes
    assert stats.max_concurrent_creates <= 4
    assert stats.max_running_sandboxes <= 6
    assert stats.duplicates == 0
