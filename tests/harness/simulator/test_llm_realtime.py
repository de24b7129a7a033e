"""`simulate --llm --llm-real-time`: the same gated and ungated sessions over HTTP against
the mock LLM API on loopback, time-scaled x10 (tier 1's rates times 10, the spec's timers
and the provider's latency over 10). Only outcomes that do not depend on the machine's
speed are asserted: the ungated sessions meet 429s; the gated ones all complete, with far
fewer 429s than ungated (none in virtual time, test_llm_simulate.py; here the gate's 10%
burst headroom absorbs up to 0.6 s of arrival jitter, which a loaded machine may exceed).
Throughput against the tier is a benchmark figure in real time, not asserted here.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from harness.simulator.llm_realtime import RealTimeLlm, run_gated_realtime, run_ungated_realtime
from harness.simulator.llm_sessions import LlmScenario

SMALL = RealTimeLlm(LlmScenario(jobs=6, tenants=1, turns=4, tier="tier1"), scale=10.0)


def test_over_http_the_gates_complete_every_job_and_spare_the_provider() -> None:
    """Bug caught: the gated flow broken over real HTTP (headers, usage, status not
    reaching the settle), or a gate that lets the sessions hammer the provider."""
    ungated = run_ungated_realtime(SMALL).summary()
    gated = run_gated_realtime(SMALL).summary()
    assert ungated["provider_429"] > 0
    assert gated["completed"] == 6 and gated["failed"] == 0 and gated["unfinished"] == 0
    assert gated["provider_ok"] == 6 * 4
    assert gated["provider_429"] * 4 <= ungated["provider_429"]


def test_ctrl_c_in_the_ungated_sessions_closes_the_sdk_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Bug caught (issue 26): a client left to the garbage collector at interpreter exit,
    which printed an AttributeError traceback from its `__del__` after a Ctrl-C. Here the
    Ctrl-C comes as the SDK's third call raising KeyboardInterrupt; the client must be
    closed on that way out too."""
    import anthropic

    closed: list[bool] = []
    calls = itertools.count(1)

    class Interrupted(anthropic.Anthropic):
        def close(self) -> None:
            closed.append(True)
            super().close()

    real_create = anthropic.resources.messages.Messages.create

    def create(self: Any, *args: Any, **kwargs: Any) -> Any:
        if next(calls) == 3:
            raise KeyboardInterrupt
        return real_create(self, *args, **kwargs)

    monkeypatch.setattr(anthropic, "Anthropic", Interrupted)
    monkeypatch.setattr(anthropic.resources.messages.Messages, "create", create)
    one_job = RealTimeLlm(LlmScenario(jobs=1, tenants=1, turns=4, tier="tier1"), scale=10.0)
    with pytest.raises(KeyboardInterrupt):
        run_ungated_realtime(one_job)
    assert closed == [True]
