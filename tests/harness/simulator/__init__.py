"""Tests of the Temper simulator."""

# What every run report's summary carries, whichever way it was run.
SUMMARY_KEYS = frozenset(
    {
        "jobs",
        "completed",
        "failed",
        "max_concurrent_creates_seen",
        "max_running_sandboxes_seen",
        "throttled",
        "orphaned_sandboxes",
        "duplicate_sandboxes",
        "makespan_s",
        "ideal_makespan_s",
    }
)
