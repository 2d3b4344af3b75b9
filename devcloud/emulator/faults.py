"""Injected faults: what an admin asked to go wrong, matched against servers and used up.

A fault is `{"kind", "match": {"flavor", "az", "name_regex"}, "count", "seconds"}`; every key of
`match` that is given must match. `count` is how many times it fires (then it is gone):
- no_valid_host: a matching create answers 202, then the server goes to ERROR with Nova's
  "No valid host" fault (code 500);
- quota_exceeded: a matching create answers 403 with Nova's quota message;
- slow_build: a matching server stays in BUILD `seconds` before it boots;
- vanish: a matching ACTIVE server (and its sandbox) is gone at its next GET (404);
- delete_fails: DELETE of a matching server answers 500 computeFault (once per count).
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

from devcloud.emulator.wire import ApiError

KINDS = ("no_valid_host", "quota_exceeded", "slow_build", "vanish", "delete_fails")
MATCH_KEYS = ("flavor", "az", "name_regex")
NO_VALID_HOST = "No valid host was found. There are not enough hosts available."


def parse(body: Any) -> dict[str, Any]:
    """A fault record from an admin's request body; 400 when it is malformed."""
    if not isinstance(body, dict) or body.get("kind") not in KINDS:
        raise ApiError(400, f"'kind' must be one of {', '.join(KINDS)}")
    match = body.get("match") or {}
    if not isinstance(match, dict) or set(match) - set(MATCH_KEYS):
        raise ApiError(400, f"'match' takes only {', '.join(MATCH_KEYS)}")
    if any(not isinstance(v, str) for v in match.values()):
        raise ApiError(400, "'match' values must be strings")
    if "name_regex" in match:
        try:
            re.compile(match["name_regex"])
        except re.error as e:
            raise ApiError(400, f"'name_regex' is not a regular expression: {e}") from e
    count, seconds = body.get("count", 1), body.get("seconds", 30)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ApiError(400, "'count' must be an integer >= 1")
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds < 0:
        raise ApiError(400, "'seconds' must be a number >= 0")
    return {
        "id": str(uuid.uuid4()),
        "kind": body["kind"],
        "match": match,
        "count": count,
        "seconds": float(seconds),
        "created": time.time(),
    }


def matches(fault: dict[str, Any], server: dict[str, Any]) -> bool:
    m = fault["match"]
    if "flavor" in m and m["flavor"] not in (server["flavor"]["name"], server["flavor"]["id"]):
        return False
    if "az" in m and m["az"] != server["availability_zone"]:
        return False
    return not ("name_regex" in m and not re.search(m["name_regex"], server["name"]))


def take(state: dict[str, Any], kind: str, server: dict[str, Any]) -> dict[str, Any] | None:
    """Use up one firing of the oldest matching fault of `kind` (inside a state transaction)."""
    faults = state["faults"]
    for fid, fault in sorted(faults.items(), key=lambda kv: kv[1]["created"]):
        if fault["kind"] == kind and matches(fault, server):
            fault["count"] -= 1
            if fault["count"] <= 0:
                del faults[fid]
            return dict(fault)
    return None
