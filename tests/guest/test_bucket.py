"""The token bucket's settle arithmetic (provisioner/gates/bucket.py) at its edges:
which open charges learn a bucket's headroom, and how much of an overcharge comes back."""

from __future__ import annotations

from provisioner.gates.bucket import Bucket, Charge, note_change, settle_charge

NOW = 100_000


def test_a_change_to_one_bucket_lowers_only_the_slack_of_charges_on_that_bucket() -> None:
    # Catches: every open charge learning the headroom of whichever bucket changed, which
    # would shrink (or void) the refunds of charges on the other buckets.
    tokens = Charge("tokens", 5.0, 4_000.0)
    requests = Charge("requests", 1.0, 4_000.0)
    note_change([tokens, requests], "tokens", NOW + 1_000.0, NOW)
    assert (tokens.slack_ms, requests.slack_ms) == (1_000.0, 4_000.0)
    note_change([tokens, requests], "tokens", NOW + 3_000.0, NOW)
    assert tokens.slack_ms == 1_000.0  # the least headroom is kept


def test_a_bucket_that_was_full_since_the_grant_gives_nothing_back_and_charges_nothing() -> None:
    # Catches: a negative refund (the bucket filled up to its burst after the grant, so
    # the overcharge was lost with the refill) applied as more debt.
    bucket = Bucket(interval_ms=1_000.0, burst=10.0)
    tat = NOW + 3_000.0
    charge = Charge("tokens", 5.0, -500.0)
    assert settle_charge(bucket, tat, NOW, charge, actual=3.0) == tat


def test_an_overcharge_of_one_millisecond_is_given_back() -> None:
    # Catches: a refund threshold above zero, which keeps the smallest overcharges.
    bucket = Bucket(interval_ms=1.0, burst=10.0)
    tat = NOW + 10.0
    assert settle_charge(bucket, tat, NOW, Charge("tokens", 2.0, 100.0), actual=1.0) == tat - 1
    assert settle_charge(bucket, tat, NOW, Charge("tokens", 4.0, 100.0), actual=1.0) == tat - 3


def test_a_cost_fits_up_to_the_level_exactly_and_not_beyond() -> None:
    # Catches: the float tolerance applied the wrong way (a cost equal to the level
    # refused) or a strict comparison (a cost at the level plus the tolerance refused).
    bucket = Bucket(interval_ms=1_000.0, burst=2.0)
    tat = NOW + 1_000.0  # one token spent: the level is 1
    assert bucket.level(tat, NOW) == 1.0
    assert bucket.fits(tat, NOW, 1.0)
    assert bucket.fits(tat, NOW, 1.0 + 1e-9)
    assert not bucket.fits(tat, NOW, 1.0 + 1e-6)
    assert bucket.fits(tat, NOW + 1_000, 2.0)
