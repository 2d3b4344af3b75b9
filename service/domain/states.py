"""The job lifecycle: one state enum, one transition table, terminal and failure sets."""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    """States a job moves through (DESIGN.md §2)."""

    QUEUED = "QUEUED"  # recorded, waiting to be admitted and allocated
    ALLOCATING = "ALLOCATING"  # servers are being booted
    PROVISIONING = "PROVISIONING"  # SSH reachable; runtime, runner and trainer being staged
    RUNNING = "RUNNING"  # the trainer runs detached on the server
    EXPORTING = "EXPORTING"  # the trainer exited 0; the model is pushed to the store
    SUCCEEDED = "SUCCEEDED"  # the model is in the store
    CANCELLING = "CANCELLING"  # a cancel was asked; servers are being torn down
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"  # see failure.phase / failure.reason

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.CANCELLED, JobState.FAILED})
ACTIVE = frozenset(s for s in JobState if s not in TERMINAL)

_FORWARD = {
    JobState.QUEUED: {JobState.ALLOCATING},
    JobState.ALLOCATING: {JobState.PROVISIONING, JobState.QUEUED},
    JobState.PROVISIONING: {JobState.RUNNING},
    JobState.RUNNING: {JobState.EXPORTING},
    JobState.EXPORTING: {JobState.SUCCEEDED},
    JobState.CANCELLING: {JobState.CANCELLED},
}

ALLOWED: dict[JobState, frozenset[JobState]] = {}
for _s in JobState:
    _next = set(_FORWARD.get(_s, set()))
    if not _s.terminal:
        _next.add(JobState.FAILED)
        if _s is not JobState.CANCELLING:
            _next.add(JobState.CANCELLING)
    ALLOWED[_s] = frozenset(_next)


class Phase(StrEnum):
    """Where a failure happened."""

    ADMIT = "admit"
    ALLOCATE = "allocate"
    PROVISION = "provision"
    TRAIN = "train"
    EXPORT = "export"
    TEARDOWN = "teardown"


PHASE_OF_STATE = {
    JobState.QUEUED: Phase.ADMIT,
    JobState.ALLOCATING: Phase.ALLOCATE,
    JobState.PROVISIONING: Phase.PROVISION,
    JobState.RUNNING: Phase.TRAIN,
    JobState.EXPORTING: Phase.EXPORT,
    JobState.CANCELLING: Phase.TEARDOWN,
}


def can_transition(src: JobState, dst: JobState) -> bool:
    return dst in ALLOWED[src]


class ResourceState(StrEnum):
    """A server's bookkeeping state; a terminal job with any non-DELETED row is a teardown debt."""

    BOOTING = "booting"
    ACTIVE = "active"
    DELETING = "deleting"
    DELETED = "deleted"
