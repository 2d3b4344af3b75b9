"""Endpoints (model serving): states, transitions, and the converge plan, without I/O.

An endpoint serves one model on `replicas` servers. It follows a label (its version moves when
the label moves) or pins a version, optionally with a traffic split between versions. The
workers converge it: `plan(desired, replicas)` compares what the endpoint asks for with the
replicas that exist and answers what to do next; the step (workers/steps/serve.py) does it and
asks again, until the plan is empty and the endpoint READY.

Rules of the plan (docs/architecture.md, "Serving"):
- every wanted version gets exactly its count of live replicas: missing ones are booted, the
  surplus is drained (ready ones) or deleted (not ready yet, newest first);
- a replica that failed, whose server vanished, whose health checks failed `max_health_failures`
  times in a row, or that is stuck in a boot phase past `stuck_after`, is dead: a new one is
  booted; a dead one that served once is deleted when its version has its count ready again
  (new one first), one that never served (or whose server is gone) at once;
- rolling switch (no traffic split): while the new target has fewer than its count ready, the
  serving version keeps its own count (dead ones replaced); `serving_version` moves to the
  target only when the target has its count ready and warmed; the old replicas are then drained
  (the proxy stops choosing them) and deleted after `drain_seconds`;
- traffic split: every version of the split gets ceil(replicas * percent / 100) replicas (at
  least 1); `serving_version` is the version with the largest share once it has one ready;
- a version whose replicas failed `max_failures` times with none ever ready is given up: the
  endpoint goes FAILED with the reason (the serving version's replicas stay);
- deleting: ready replicas are drained, then every replica deleted; no replica left: DELETED.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
ENDPOINT_ID_RE = re.compile(r"^ep-[0-9a-f]{12}$")
MAX_REPLICAS = 64


class EndpointState(StrEnum):
    CREATING = "CREATING"  # its first replicas are being booted; nothing served yet
    READY = "READY"  # converged: every wanted replica ready, nothing else left
    UPDATING = "UPDATING"  # converging after a change (scale, switch, replacement)
    DELETING = "DELETING"  # draining and deleting every replica
    DELETED = "DELETED"  # no server left
    FAILED = "FAILED"  # a version could not be brought up; see failure_message

    @property
    def terminal(self) -> bool:
        return self is EndpointState.DELETED


LIVE_ENDPOINT = frozenset(s for s in EndpointState if s is not EndpointState.DELETED)

_ALLOWED: dict[EndpointState, frozenset[EndpointState]] = {
    EndpointState.CREATING: frozenset(
        {EndpointState.READY, EndpointState.UPDATING, EndpointState.FAILED, EndpointState.DELETING}
    ),
    EndpointState.READY: frozenset(
        {EndpointState.UPDATING, EndpointState.FAILED, EndpointState.DELETING}
    ),
    EndpointState.UPDATING: frozenset(
        {EndpointState.READY, EndpointState.FAILED, EndpointState.DELETING}
    ),
    # a PATCH re-arms a failed endpoint
    EndpointState.FAILED: frozenset({EndpointState.UPDATING, EndpointState.DELETING}),
    EndpointState.DELETING: frozenset({EndpointState.DELETED}),
    EndpointState.DELETED: frozenset(),
}


def can_transition(src: EndpointState, dst: EndpointState) -> bool:
    return dst in _ALLOWED[src]


class ReplicaState(StrEnum):
    """resources.replica_state of a replica row (`state` keeps booting/active/deleting/deleted
    for teardown and the reaper)."""

    BOOTING = "booting"  # row written, server created or being created
    PROVISIONING = "provisioning"  # ACTIVE: runner, model server and files being shipped
    LOADING = "loading"  # the model server runs; waiting for AVAILABLE, then one warm-up
    READY = "ready"  # healthy and warmed: the proxy may send it requests
    DRAINING = "draining"  # the proxy stops choosing it; deleted after drain_seconds
    FAILED = "failed"  # dead: replaced, then deleted


COMING = frozenset({ReplicaState.BOOTING, ReplicaState.PROVISIONING, ReplicaState.LOADING})


@dataclass(frozen=True)
class Replica:
    """A replica as the plan sees it (one resources row)."""

    id: int
    version: int
    state: ReplicaState
    health_failures: int = 0
    server_gone: bool = False  # the backend says its server is DELETED or in ERROR
    in_state_for: float = 0.0  # seconds since it entered `state`
    was_ready: bool = False  # it served once (a failing one is kept until replaced)


@dataclass(frozen=True)
class Desired:
    """What the endpoint asks for. `target` is the version its label or pin resolves to (None:
    the label points nowhere); `traffic` maps versions to percents (None: all to target)."""

    target: int | None
    replicas: int
    serving_version: int | None = None
    traffic: Mapping[int, int] | None = None
    deleting: bool = False


@dataclass(frozen=True)
class Limits:
    max_health_failures: int = 3
    drain_seconds: float = 2.0
    stuck_after: float = 300.0  # a replica in a boot phase longer than this is dead
    max_failures: int = 3  # failed replicas of a version, none ready: the version is given up


# -- actions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Boot:
    version: int


@dataclass(frozen=True)
class Advance:
    """Move a booting/provisioning/loading replica on (one look, bounded)."""

    replica_id: int


@dataclass(frozen=True)
class MarkFailed:
    replica_id: int
    why: str


@dataclass(frozen=True)
class Drain:
    replica_id: int


@dataclass(frozen=True)
class Delete:
    replica_id: int


@dataclass(frozen=True)
class Serve:
    """Move `serving_version` to `version`."""

    version: int


@dataclass(frozen=True)
class GiveUp:
    version: int
    why: str


Action = Boot | Advance | MarkFailed | Drain | Delete | Serve | GiveUp


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...] = ()
    # the endpoint's state once these actions are done (None: leave it as it is)
    settle: EndpointState | None = None
    wanted: Mapping[int, int] = field(default_factory=dict)

    @property
    def converged(self) -> bool:
        return not self.actions and self.settle in (EndpointState.READY, EndpointState.DELETED)

    def of(self, kind: type) -> list[Action]:
        return [a for a in self.actions if isinstance(a, kind)]


def split_counts(replicas: int, traffic: Mapping[int, int]) -> dict[int, int]:
    """Replicas per version of a traffic split: ceil(replicas * percent / 100), at least 1;
    a version at 0 percent gets none."""
    return {
        v: max(1, math.ceil(replicas * pct / 100)) for v, pct in sorted(traffic.items()) if pct > 0
    }


def traffic_problem(traffic: Mapping[str, object] | None) -> str | None:
    """Why a traffic split (as the API receives it: version strings to percents) is invalid."""
    if traffic is None:
        return None
    if not isinstance(traffic, Mapping) or not traffic:
        return 'traffic must be an object of version -> percent, e.g. {"3": 90, "4": 10}'
    if len(traffic) > 8:
        return "traffic splits between at most 8 versions"
    total = 0
    for k, pct in traffic.items():
        if not isinstance(k, str) or not k.isdigit() or int(k) < 1 or len(k) > 9:
            return f"traffic key {str(k)[:16]!r} is not a version number"
        if isinstance(pct, bool) or not isinstance(pct, int) or not 0 <= pct <= 100:
            return f"traffic[{k}] must be an integer percent from 0 to 100"
        total += pct
    if total != 100:
        return f"traffic percents must sum to 100 (they sum to {total})"
    return None


def wanted_versions(d: Desired, replicas: Sequence[Replica]) -> dict[int, int]:
    """Version -> replica count the endpoint needs now (the switch keeps the old version)."""
    if d.deleting:
        return {}
    if d.traffic:
        return split_counts(d.replicas, d.traffic)
    if d.target is None:
        # the label points nowhere: keep serving what is served
        return {d.serving_version: d.replicas} if d.serving_version is not None else {}
    wanted = {d.target: d.replicas}
    s = d.serving_version
    if s is not None and s != d.target:
        wanted[s] = d.replicas  # until the target is ready, the old version keeps serving
    return wanted


def _dead(r: Replica, lim: Limits) -> str | None:
    if r.state is ReplicaState.FAILED:
        return "failed"
    if r.server_gone and r.state is not ReplicaState.DRAINING:
        return "its server vanished"
    if r.state is ReplicaState.READY and r.health_failures >= lim.max_health_failures:
        return f"{r.health_failures} health checks failed in a row"
    if r.state in COMING and r.in_state_for > lim.stuck_after:
        return f"{r.state} for {r.in_state_for:.0f}s (more than {lim.stuck_after:.0f}s)"
    return None


def plan(
    d: Desired,
    replicas: Sequence[Replica],
    lim: Limits = Limits(),
    failures: Mapping[int, int] | None = None,
) -> Plan:
    """What to do next. `failures`: failed replicas per version since it last had one ready
    (from the replica rows, deleted ones included)."""
    failures = failures or {}
    actions: list[Action] = []
    dead = {r.id: why for r in replicas if (why := _dead(r, lim)) is not None}
    for r in replicas:
        if r.id in dead and r.state is not ReplicaState.FAILED:
            actions.append(MarkFailed(r.id, dead[r.id]))

    if d.deleting:
        for r in replicas:
            if r.state is ReplicaState.READY and r.id not in dead:
                actions.append(Drain(r.id))
            elif r.state is ReplicaState.DRAINING and r.in_state_for < lim.drain_seconds:
                continue  # in-flight requests finish first
            else:
                actions.append(Delete(r.id))
        settle = EndpointState.DELETED if not replicas else None
        return Plan(tuple(actions), settle, {})

    wanted = wanted_versions(d, replicas)
    alive = [r for r in replicas if r.id not in dead and r.state is not ReplicaState.DRAINING]
    ready = {
        v: [r for r in alive if r.version == v and r.state is ReplicaState.READY] for v in wanted
    }

    # the rolling switch: serve the target once it has its count ready, then let go of the rest
    serving = d.serving_version
    primary = _primary(d)
    if primary is not None and serving != primary:
        if len(ready.get(primary, [])) >= wanted.get(primary, 0) > 0 or (
            d.traffic and ready.get(primary)
        ):
            actions.append(Serve(primary))
            serving = primary
            if not d.traffic and d.target is not None:
                wanted = {d.target: d.replicas}

    given_up: set[int] = set()
    for v, n in sorted(wanted.items()):
        mine = [r for r in alive if r.version == v]
        live_ready = [r for r in mine if r.state is ReplicaState.READY]
        coming = [r for r in mine if r.state in COMING]
        if not live_ready and failures.get(v, 0) >= lim.max_failures:
            given_up.add(v)
            actions.append(
                GiveUp(v, f"version {v}: {failures[v]} replicas failed and none became ready")
            )
            continue
        missing = n - len(mine)
        actions.extend(Boot(v) for _ in range(max(0, missing)))
        surplus = -missing
        # scale down: replicas not ready yet go first (newest first), then ready ones
        for r in sorted(coming, key=lambda r: -r.id):
            if surplus <= 0:
                break
            actions.append(Delete(r.id))
            coming.remove(r)
            surplus -= 1
        for r in sorted(live_ready, key=lambda r: -r.id)[: max(0, surplus)]:
            actions.append(Drain(r.id))
        actions.extend(Advance(r.id) for r in sorted(coming, key=lambda r: r.id))

    for r in replicas:
        if r.id in dead:
            # one that served is kept until its version has its count ready again (a sick
            # replica may still answer some); one that never served, or whose server is gone,
            # has nothing to keep
            version_ok = len(ready.get(r.version, [])) >= wanted.get(r.version, 0)
            if (
                r.server_gone
                or not (r.was_ready or r.state is ReplicaState.READY)
                or r.version not in wanted
                or r.version in given_up
                or version_ok
            ):
                actions.append(Delete(r.id))
        elif r.state is ReplicaState.DRAINING:
            if r.in_state_for >= lim.drain_seconds:
                actions.append(Delete(r.id))
        elif r.version not in wanted:
            actions.append(Drain(r.id) if r.state is ReplicaState.READY else Delete(r.id))

    if given_up:
        return Plan(tuple(actions), EndpointState.FAILED, wanted)
    # nothing left but exactly the wanted ready replicas (no draining, dead or coming one)
    converged = (
        not actions
        and all(r.state is ReplicaState.READY and r.id not in dead for r in replicas)
        and all(len([r for r in alive if r.version == v]) == n for v, n in wanted.items())
    )
    settle = EndpointState.READY if converged and wanted and serving == primary else None
    return Plan(tuple(actions), settle, wanted)


def _primary(d: Desired) -> int | None:
    """The version `serving_version` should name: the target, or the largest share of a split
    (the lowest version on a tie)."""
    if d.traffic:
        shares = [(pct, -v) for v, pct in d.traffic.items() if pct > 0]
        return -max(shares)[1] if shares else None
    return d.target if d.target is not None else d.serving_version
