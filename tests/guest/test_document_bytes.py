"""The gate documents' stored bytes, pinned: a document of every shape (each field set, and
the forms older versions wrote) encodes to the bytes 3289e61 wrote for it, so a change to
the encoder that moves one byte fails here before it reaches a stored gate."""

from __future__ import annotations

import json
from typing import Any

import pytest

from provisioner.gates.bucket import Charge
from provisioner.gates.document import (
    CreateLease,
    GateState,
    Reservation,
    ResourceLease,
    ResourceState,
    RetryEntry,
    SandboxLease,
    TenantQueue,
    UnsettledCreate,
)

FULL_GATE = GateState(
    cooldown_until_ms=5,
    backoff_failures=2,
    ring=[TenantQueue("a", 3, 9, [5, 7]), TenantQueue("b/c", 0, 1)],
    retries=[RetryEntry("a", "e1")],
    ticket_high_water=12,
    reservations=[
        Reservation("a", 3, None, "v1", 10, 20),
        Reservation("a", None, "e1", "v2", 11, 21),
    ],
    hold_ms=77,
    grants=9,
    create_leases=[CreateLease("c1", "a", "e2", 100, 50, 900)],
    sandbox_leases=[SandboxLease("c0", "b", "e3", 1000, 40, "sbx")],
    unsettled=[UnsettledCreate("c9", "a", "e4", 30, 800)],
    rate_tat_ms=12.34567,
    capacity=3,
    success_streak=1,
    retry_tokens=2.123456789,
    retry_refilled_ms=44,
    latency_ms=55,
)
FULL_GATE_BYTES = (
    '{"v":2,"c":[["c1","a","e2",100,50,900]],"s":[["c0","b","e3",1000,40,"sbx"]],'
    '"u":[["c9","a","e4",30,800]],"r":12.346,"cd":5,"bf":2,"cap":3,"ok":1,"rb":2.1235,'
    '"rbt":44,"q":[["a",3,9,[5,7]],["b/c",0,1,[]]],"rq":[["a","e1"]],"ep":12,'
    '"rv":[["a",3,"","v1",10,20],["a",-1,"e1","v2",11,21]],"lat":55,"hold":77,"n":9}'
)
FULL_RESOURCE = ResourceState(
    cooldown_until_ms=5,
    backoff_failures=1,
    ring=[TenantQueue("t", 1, 4, [2])],
    ticket_high_water=4,
    reservations=[Reservation("t", 1, None, "v3", 1, 2)],
    grants=3,
    leases=[
        ResourceLease(
            "r1", "t", "e", 10, 5, [Charge("input", 3.5, 1.25), Charge("requests\tt", 1.0, 0.0)]
        ),
        ResourceLease("r2", "t", "f", 10, 5),
    ],
    buckets={"input": 12.123456789, "requests\tt": 3.0},
    granted_ms=99,
)
FULL_RESOURCE.leases[0].margins = {"input": 2.0}
FULL_RESOURCE_BYTES = (
    '{"l":[["r1","t","e",10,5,[["input",3.5,1.25],["requests\\tt",1.0,0.0]],{"input":2.0}],'
    '["r2","t","f",10,5,[],{}]],"b":{"input":12.123456789,"requests\\tt":3.0},"cd":5,'
    '"bf":1,"q":[["t",1,4,[2]]],"rq":[],"ep":4,"rv":[["t",1,"","v3",1,2]],"hold":null,'
    '"n":3,"g":99}'
)
# Version 1: no sandbox bound on create leases (the attempt was sixth), no u/rq/rv fields.
VERSION_1_GATE: dict[str, Any] = {
    "c": [["c1", "a", "e", 100, 50, 2]],
    "s": [["c0", "b", "e3", 1000, 40, "sbx"]],
    "r": 1.5,
    "cd": 0,
    "bf": 0,
    "cap": None,
    "ok": 0,
    "rb": None,
    "rbt": 0,
    "q": [["a", 0, 2, []]],
    "ep": 2,
    "lat": None,
    "hold": None,
    "n": 0,
}
VERSION_1_TAIL = (
    '"r":1.5,"cd":0,"bf":0,"cap":null,"ok":0,"rb":null,"rbt":0,"q":[["a",0,2,[]]],'
    '"rq":[],"ep":2,"rv":[],"lat":null,"hold":null,"n":0}'
)


@pytest.mark.parametrize(
    ("state", "stored"),
    [
        (
            GateState(),
            '{"v":2,"c":[],"s":[],"u":[],"r":0.0,"cd":0,"bf":0,"cap":null,"ok":0,"rb":null,'
            '"rbt":0,"q":[],"rq":[],"ep":0,"rv":[],"lat":null,"hold":null,"n":0}',
        ),
        (
            ResourceState(),
            '{"l":[],"b":{},"cd":0,"bf":0,"q":[],"rq":[],"ep":0,"rv":[],"hold":null,"n":0,"g":0}',
        ),
        (FULL_GATE, FULL_GATE_BYTES),
        (FULL_RESOURCE, FULL_RESOURCE_BYTES),
    ],
    ids=["empty gate", "empty resource", "full gate", "full resource"],
)
def test_every_field_is_stored_as_before_and_reads_back(
    state: GateState | ResourceState, stored: str
) -> None:
    # Catches: a field renamed, reordered, rounded differently or encoded another way.
    assert state.to_bytes().decode() == stored
    assert type(state).from_bytes(stored.encode()).to_bytes().decode() == stored


@pytest.mark.parametrize(
    ("older", "stored"),
    [
        (
            VERSION_1_GATE,
            '{"v":2,"c":[["c1","a","e",100,50,3600100]],"s":[["c0","b","e3",1000,40,"sbx"]],'
            '"u":[],' + VERSION_1_TAIL,
        ),
        (
            {**VERSION_1_GATE, "rq": [["a", "e9", 3]], "u": [["c5", "a", "e5", 1, 2]]},
            '{"v":2,"c":[["c1","a","e",100,50,3600100]],"s":[["c0","b","e3",1000,40,"sbx"]],'
            '"u":[["c5","a","e5",1,2]],' + VERSION_1_TAIL.replace('"rq":[]', '"rq":[["a","e9"]]'),
        ),
    ],
    ids=["version 1", "version 1 with retries carrying their attempt"],
)
def test_a_gate_written_by_an_older_version_loads_and_is_stored_in_todays_form(
    older: dict[str, Any], stored: str
) -> None:
    # Catches: an older document refused, or its create leases given no sandbox bound.
    assert GateState.from_bytes(json.dumps(older).encode()).to_bytes().decode() == stored


def test_a_resource_lease_written_before_margins_loads_with_none() -> None:
    # Catches: a lease row without margins refused, or its integer counts kept as ints.
    older = {
        "l": [["r1", "t", "e", 10, 5, [["input", 3, 1]]]],
        "b": {"input": 2},
        "cd": 0,
        "bf": 0,
        "q": [],
        "ep": 0,
        "hold": 3,
        "n": 1,
    }
    assert ResourceState.from_bytes(json.dumps(older).encode()).to_bytes().decode() == (
        '{"l":[["r1","t","e",10,5,[["input",3.0,1.0]],{}]],"b":{"input":2.0},"cd":0,"bf":0,'
        '"q":[],"rq":[],"ep":0,"rv":[],"hold":3,"n":1,"g":0}'
    )
