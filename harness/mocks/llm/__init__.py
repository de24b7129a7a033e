"""A mock of Anthropic's Messages API with an organisation's per-key rate limits (requests,
input tokens and output tokens per minute, as continuously refilling token buckets), their
``anthropic-ratelimit-*`` headers, 429 and 529 answers, latency and token counts, checked
against the official ``anthropic`` SDK.

    with MockLLMServer(MockLLMConfig.for_tier("tier1", api_keys=("k",), seed=1)) as server:
        client = anthropic.Anthropic(api_key="k", base_url=server.url)
        client.messages.create(model="claude-sonnet-4-5", max_tokens=64,
                               messages=[{"role": "user", "content": "hi"}])
        server.configure(overload_first=1, overload_last=2, overload_retry_after_s=1)
        server.stats(), server.requests(), server.levels("k")

Streaming is refused (400 invalid_request_error): the mock answers whole messages only.

Modules: ``config`` (MockLLMConfig, TIERS), ``limits`` (the token bucket), ``wire`` (the
Messages API's JSON and the input-token estimate), ``state`` (buckets, counters, log),
``stats`` (the snapshots), ``app`` (Starlette routes and the /_mock/ control API),
``server`` (uvicorn in a thread), ``cli``.
"""

from harness.mocks.llm.config import TIERS, MockLLMConfig
from harness.mocks.llm.server import MockLLMServer
from harness.mocks.llm.stats import MockLLMStats, RequestRecord

__all__ = ["TIERS", "MockLLMConfig", "MockLLMServer", "MockLLMStats", "RequestRecord"]
