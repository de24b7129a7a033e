"""Every failure code a `SandboxFailed` outcome can carry (docs/contract.md is checked
against it); a member is its code string, so it crosses JSON and the WIT boundary as is."""

from __future__ import annotations

from enum import StrEnum


class FailureCode(StrEnum):
    # The invocation itself: refused before any state changes.
    INVALID_INVOCATION = "invalid_invocation"
    INVALID_CONFIG = "invalid_config"
    UNKNOWN_OPERATION = "unknown_operation"
    # What the old sandbox_provisioner refused before doing anything (same messages).
    AGENT_NOT_CONFIGURED = "agent_not_configured"
    E2B_API_KEY_MISSING = "e2b_api_key_missing"
    # Storage.
    STORAGE_UNAVAILABLE = "storage_unavailable"
    STORAGE_CONTENTION = "storage_contention"
    # Admission control.
    QUEUE_TIMEOUT = "queue_timeout"
    RETRY_BUDGET_EXHAUSTED = "retry_budget_exhausted"
    # E2B's answers.
    E2B_UNAUTHORIZED = "e2b_unauthorized"
    E2B_BAD_REQUEST = "e2b_bad_request"
    E2B_TEMPLATE_NOT_FOUND = "e2b_template_not_found"
    E2B_UNEXPECTED_STATUS = "e2b_unexpected_status"
    E2B_DENIED = "e2b_denied"
    E2B_UNAVAILABLE = "e2b_unavailable"
    RELEASED_DURING_CREATE = "released_during_create"
    # A bug in the guest, caught before it could escape.
    INTERNAL_ERROR = "internal_error"
    # From the host that runs the component, last (see HOST_CODES).
    FUEL_EXHAUSTED = "fuel_exhausted"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    MEMORY_EXHAUSTED = "memory_exhausted"
    GUEST_TRAP = "guest_trap"
    RESULT_TOO_LARGE = "result_too_large"
    MALFORMED_RESULT = "malformed_result"
    HOST_ERROR = "host_error"


# Only a host produces these: an outcome carrying one is a genuine invocation failure,
# reported to Temper as a failure (every other SandboxFailed is a guest's decision).
_ALL = list(FailureCode)
HOST_CODES = frozenset(_ALL[_ALL.index(FailureCode.FUEL_EXHAUSTED) :])
