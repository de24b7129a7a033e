"""The mock's model of an Anthropic organisation: per-key buckets, counters and a log.

Request handlers run on the server's event loop while tests read stats and reconfigure
from other threads, so every read and change goes through one lock, held only for
bookkeeping (never across an await). Admission (overload, all three limits, the charge)
happens in one acquisition, which is what keeps the limits and the stats exact under
concurrency.
"""

from __future__ import annotations

import math
import random
import string
import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime

from harness.mocks.llm.config import MockLLMConfig
from harness.mocks.llm.limits import TokenBucket
from harness.mocks.llm.stats import LIMITS, MockLLMStats, RequestRecord
from harness.mocks.llm.wire import MessagesRequest, rfc3339
from harness.mocks.shared.state import Clock, GuardedState

_ID_ALPHABET = string.ascii_letters + string.digits
_LOG_SIZE = 100_000
_LIMIT_FIELDS = ("rpm", "itpm", "otpm", "rpm_burst", "itpm_burst", "otpm_burst")
# Header prefix, and what a 429's message calls the unit, for each limit.
_HEADER = {"requests": "requests", "input_tokens": "input-tokens", "output_tokens": "output-tokens"}
_UNIT = {"requests": "requests", "input_tokens": "input tokens", "output_tokens": "output tokens"}


@dataclass
class _Buckets:
    """One API key's limits; None where the config sets none."""

    requests: TokenBucket | None
    input_tokens: TokenBucket | None
    output_tokens: TokenBucket | None

    def by_limit(self) -> dict[str, TokenBucket | None]:
        return {
            "requests": self.requests,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
        }


@dataclass(frozen=True)
class Admission:
    """What the mock does with a valid request: ``status`` 200 (admitted: answer after
    ``latency_s`` with ``output_tokens``), 429 (``limit`` refused it) or 529."""

    status: int
    headers: dict[str, str]
    ordinal: int
    message_id: str = ""
    latency_s: float = 0.0
    output_tokens: int = 0
    stop_reason: str = "end_turn"
    limit: str | None = None
    message: str = ""
    retry_after_s: int | None = None


class MockLLMState(GuardedState[MockLLMConfig, MockLLMStats]):
    """Every API key's buckets, the seeded streams and the counters."""

    name = "mock LLM"

    def __init__(self, config: MockLLMConfig, clock: Clock = time.monotonic) -> None:
        super().__init__(clock)
        self._config = config
        self._clear(config)

    def _clear(self, config: MockLLMConfig) -> None:
        self._counters = MockLLMStats()
        self._buckets: dict[str, _Buckets] = {}
        self._ordinal = 0
        self._log: deque[RequestRecord] = deque(maxlen=_LOG_SIZE)
        self._seed_streams(config.seed)

    def _seed_streams(self, seed: int) -> None:
        # One stream per purpose, so that turning overload on does not shift latencies.
        self._overload_rng = random.Random(f"overload:{seed}")
        self._latency_rng = random.Random(f"latency:{seed}")
        self._tokens_rng = random.Random(f"tokens:{seed}")
        self._ids = random.Random(f"ids:{seed}")

    # -- config ----------------------------------------------------------------------------

    @property
    def config(self) -> MockLLMConfig:
        return self._config

    def configure(self, config: MockLLMConfig) -> None:
        """New limits start from full buckets; a new seed restarts the seeded streams."""
        with self._mutating():
            old, self._config = self._config, config
            if any(getattr(old, f) != getattr(config, f) for f in _LIMIT_FIELDS):
                self._buckets.clear()
            if old.seed != config.seed:
                self._seed_streams(config.seed)

    def reset(self) -> None:
        """Forgets every bucket, counter and logged request; restarts the seeded streams."""
        with self._mutating():
            self._clear(self._config)

    def now(self) -> float:
        return self._clock()

    # -- requests ----------------------------------------------------------------------------

    def begin(self) -> float:
        """Counts a Messages request as arrived and in flight; returns its arrival time."""
        with self._mutating():
            c = self._counters
            c.requests_total += 1
            c.in_flight += 1
            c.max_concurrency = max(c.max_concurrency, c.in_flight)
            return self._clock()

    def end(self) -> None:
        with self._mutating():
            self._counters.in_flight -= 1

    def is_key(self, api_key: str | None) -> bool:
        return api_key is not None and api_key in self._config.api_keys

    def refuse(self, arrived_at: float, status: int, error_type: str) -> None:
        """Counts and logs a 401 or a 400 (a request that never reached the limits)."""
        with self._mutating():
            if status == 401:
                self._counters.unauthorized += 1
            else:
                self._counters.bad_requests += 1
            self._log.append(
                RequestRecord(
                    ordinal=0,
                    arrived_at=arrived_at,
                    answered_at=self._clock(),
                    status=status,
                    error_type=error_type,
                )
            )

    def admit(self, api_key: str, request: MessagesRequest, arrived_at: float) -> Admission:
        """Decides a valid request: overloaded, refused by a limit, or admitted and charged
        its requests and input tokens (output tokens are charged by ``settle``)."""
        with self._mutating():
            config, now = self._config, self._clock()
            self._ordinal += 1
            ordinal = self._ordinal
            buckets = self._buckets_for(api_key, now)
            if self._overloaded(config, ordinal):
                self._counters.overloaded += 1
                headers = self._headers(buckets, now)
                retry: int | None = None
                if config.overload_retry_after_s is not None:
                    retry = _whole_seconds(config.overload_retry_after_s)
                    headers["retry-after"] = str(retry)
                self._log.append(
                    RequestRecord(
                        ordinal, arrived_at, now, 529, "overloaded_error", retry_after_s=retry
                    )
                )
                return Admission(529, headers, ordinal, message="Overloaded", retry_after_s=retry)
            needs = {"requests": 1, "input_tokens": request.input_tokens, "output_tokens": 1}
            waits = {
                limit: bucket.wait_for(needs[limit], now)
                for limit, bucket in buckets.by_limit().items()
                if bucket is not None
            }
            refused = {limit: wait for limit, wait in waits.items() if wait > 0}
            if refused:
                # The limit that keeps the request out longest is the one it is counted under.
                limit = max(refused, key=lambda name: (refused[name], -LIMITS.index(name)))
                retry = _whole_seconds(refused[limit])
                self._counters.rate_limited += 1
                self._counters.rate_limited_by[limit] += 1
                headers = self._headers(buckets, now, refused_by=limit)
                headers["retry-after"] = str(retry)
                bucket = buckets.by_limit()[limit]
                assert bucket is not None
                message = (
                    f"This request would exceed your rate limit of {bucket.limit} "
                    f"{_UNIT[limit]} per minute (mock LLM API); retry after {retry} s."
                )
                self._log.append(
                    RequestRecord(
                        ordinal,
                        arrived_at,
                        now,
                        429,
                        "rate_limit_error",
                        limit=limit,
                        retry_after_s=retry,
                        input_tokens=request.input_tokens,
                    )
                )
                return Admission(
                    429, headers, ordinal, limit=limit, message=message, retry_after_s=retry
                )
            if buckets.requests is not None:
                buckets.requests.charge(1, now)
            if buckets.input_tokens is not None:
                buckets.input_tokens.charge(request.input_tokens, now)
            self._counters.input_tokens += request.input_tokens
            drawn = self._draw_output_tokens(config)
            output_tokens = min(drawn, request.max_tokens)
            return Admission(
                200,
                {},
                ordinal,
                message_id="msg_mock_" + "".join(self._ids.choices(_ID_ALPHABET, k=20)),
                latency_s=self._draw_latency_ms(config) / 1000.0,
                output_tokens=output_tokens,
                stop_reason="max_tokens" if output_tokens < drawn else "end_turn",
            )

    def settle(
        self, api_key: str, admission: Admission, input_tokens: int, arrived_at: float
    ) -> dict[str, str]:
        """Charges an admitted request's output tokens (the bucket may go into debt) and
        returns the rate-limit headers of its answer."""
        with self._mutating():
            now = self._clock()
            buckets = self._buckets_for(api_key, now)
            if buckets.output_tokens is not None:
                buckets.output_tokens.charge(admission.output_tokens, now)
            self._counters.output_tokens += admission.output_tokens
            self._counters.messages_ok += 1
            self._log.append(
                RequestRecord(
                    admission.ordinal,
                    arrived_at,
                    now,
                    200,
                    input_tokens=input_tokens,
                    output_tokens=admission.output_tokens,
                )
            )
            return self._headers(buckets, now)

    # -- reading -----------------------------------------------------------------------------

    def stats(self) -> MockLLMStats:
        with self._lock:
            return self._counters.snapshot()

    def requests(self) -> list[RequestRecord]:
        """The answered requests in the order they were answered (the newest 100,000)."""
        with self._lock:
            return list(self._log)

    def levels(self, api_key: str) -> dict[str, float]:
        """The key's bucket levels now (negative in debt), for the limits that are set."""
        with self._lock:
            now = self._clock()
            buckets = self._buckets_for(api_key, now)
            return {
                limit: bucket.level(now)
                for limit, bucket in buckets.by_limit().items()
                if bucket is not None
            }

    # -- internals (lock held) ---------------------------------------------------------------

    def _buckets_for(self, api_key: str, now: float) -> _Buckets:
        buckets = self._buckets.get(api_key)
        if buckets is None:
            c = self._config

            def bucket(limit: int | None, burst: int | None) -> TokenBucket | None:
                return None if limit is None else TokenBucket(limit, burst, now)

            buckets = _Buckets(
                requests=bucket(c.rpm, c.rpm_burst),
                input_tokens=bucket(c.itpm, c.itpm_burst),
                output_tokens=bucket(c.otpm, c.otpm_burst),
            )
            self._buckets[api_key] = buckets
        return buckets

    def _overloaded(self, config: MockLLMConfig, ordinal: int) -> bool:
        if config.overloaded or config.overload_scheduled_for(ordinal):
            return True
        # Drawn only when a probability is set, so the stream replays from the seed.
        return config.overload_probability > 0 and (
            self._overload_rng.random() < config.overload_probability
        )

    def _draw_latency_ms(self, config: MockLLMConfig) -> float:
        if config.latency_max_ms is None or config.latency_max_ms == config.latency_ms:
            return config.latency_ms
        return self._latency_rng.uniform(config.latency_ms, config.latency_max_ms)

    def _draw_output_tokens(self, config: MockLLMConfig) -> int:
        if config.output_tokens_max is None:
            return config.output_tokens
        return self._tokens_rng.randint(config.output_tokens, config.output_tokens_max)

    def _headers(
        self, buckets: _Buckets, now: float, refused_by: str | None = None
    ) -> dict[str, str]:
        """Anthropic's ``anthropic-ratelimit-*`` headers for the limits that are set.

        ``-remaining`` is what is left now (tokens rounded as the config says), ``-reset``
        when the bucket will be full again (RFC 3339, rounded up to the second). The
        ``tokens-*`` headers repeat the most restrictive token limit in effect: the one
        that refused the request, else the one with the fewest tokens left.
        """
        rounding = self._config.token_remaining_rounding
        headers: dict[str, str] = {}
        token_limits: list[tuple[str, TokenBucket]] = []
        for limit, bucket in buckets.by_limit().items():
            if bucket is None:
                continue
            remaining = bucket.remaining(now)
            if limit != "requests":
                token_limits.append((limit, bucket))
                remaining = _round_to(remaining, rounding)
            prefix = f"anthropic-ratelimit-{_HEADER[limit]}"
            headers[f"{prefix}-limit"] = str(bucket.limit)
            headers[f"{prefix}-remaining"] = str(remaining)
            headers[f"{prefix}-reset"] = self._reset_at(bucket, now)
        if token_limits:
            chosen = next(
                (b for name, b in token_limits if name == refused_by),
                min(token_limits, key=lambda item: item[1].remaining(now))[1],
            )
            headers["anthropic-ratelimit-tokens-limit"] = str(chosen.limit)
            headers["anthropic-ratelimit-tokens-remaining"] = str(
                _round_to(chosen.remaining(now), rounding)
            )
            headers["anthropic-ratelimit-tokens-reset"] = self._reset_at(chosen, now)
        return headers

    def _reset_at(self, bucket: TokenBucket, now: float) -> str:
        wall = self._wall_origin + now + bucket.until_full(now) - self._clock_origin
        return rfc3339(datetime.fromtimestamp(math.ceil(wall), UTC))


def _whole_seconds(seconds: float) -> int:
    """A ``retry-after`` value: whole seconds, rounded up, never 0 (0 means "at once")."""
    return max(1, math.ceil(seconds - 1e-9))


def _round_to(value: int, step: int) -> int:
    """``value`` rounded to the nearest multiple of ``step`` (halves up)."""
    return value if step == 1 else int((value + step // 2) // step * step)
