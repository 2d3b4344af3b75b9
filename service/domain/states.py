"""The job lifecycle: one state enum, one transition table, terminal and failure sets."""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    """States a job moves through (docs/architecture.md)."""

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
    JobState.RUNNING: {JobState.EXPORTING, JobState.QUEUED},  # QUEUED: a restart (restart_policy)
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


# a tuning job boots nothing (its trials are jobs of their own): it starts at once and ends
# SUCCEEDED straight from RUNNING (its best trial exported the model); no other job may
TUNING_EDGES = frozenset(
    {(JobState.QUEUED, JobState.RUNNING), (JobState.RUNNING, JobState.SUCCEEDED)}
)


def can_transition(src: JobState, dst: JobState, *, tuning: bool = False) -> bool:
    return dst in ALLOWED[src] or (tuning and (src, dst) in TUNING_EDGES)


class ResourceState(StrEnum):
    """A server's bookkeeping state; a terminal job with any non-DELETED row is a teardown debt."""

    BOOTING = "booting"
    ACTIVE = "active"
    DELETING = "deleting"
    DELETED = "deleted"


class QueueWait(StrEnum):
    """Why a QUEUED job waits (jobs.queue_wait); None: it has a step on its way."""

    PARKED = "parked"  # admission keeps it for capacity, quota or its fair turn
    BACKOFF = "backoff"  # the cloud refused for quota: it retries at not_before


class OwnerKind(StrEnum):
    """What owns a server row (resources.owner_kind, owner_id)."""

    JOB = "job"
    ENDPOINT = "endpoint"  # model serving (the next issue)


class FailureReason(StrEnum):
    """Why a job failed: `failure.reason` of the REST API (a stable contract: values never
    change). The phase each one is normally seen in is in docs/architecture.md."""

    # admission and allocation
    QUOTA_EXCEEDED = "quota_exceeded"
    UNKNOWN_FLAVOR = "unknown_flavor"
    NO_VALID_HOST = "no_valid_host"
    BOOT_FAILED = "boot_failed"
    ALLOCATION_FAILED = "allocation_failed"
    # reaching and preparing the server
    SSH_UNREACHABLE = "ssh_unreachable"
    SSH_ERROR = "ssh_error"
    HOST_KEY_MISMATCH = "host_key_mismatch"
    BAD_KEY = "bad_key"
    SECRET_MISMATCH = "secret_mismatch"
    REMOTE_COMMAND_FAILED = "remote_command_failed"
    PROVISION_FAILED = "provision_failed"
    RUNTIME_BUILD_FAILED = "runtime_build_failed"
    # training
    TRAINER_EXIT_NONZERO = "trainer_exit_nonzero"
    TIMEOUT = "timeout"
    SERVER_LOST = "server_lost"
    TRIALS_FAILED = "trials_failed"  # a tuning job: too many trials failed, or none succeeded
    # export
    NO_MODEL = "no_model"
    UPLOAD_FAILED = "upload_failed"
    RUNNER_OUTPUT_INVALID = "runner_output_invalid"
    ETAG_MISMATCH = "etag_mismatch"
    # backends
    BACKEND_ERROR = "backend_error"
    BACKEND_UNAVAILABLE = "backend_unavailable"
    CLOUD_ERROR = "cloud_error"
    SANDBOX_ERROR = "sandbox_error"
    SANDBOX_NETWORK = "sandbox_network"
    STORE_ERROR = "store_error"
    STORE_UNAVAILABLE = "store_unavailable"
    KEYSTONE_UNAVAILABLE = "keystone_unavailable"
    TEARDOWN_INCOMPLETE = "teardown_incomplete"

    @classmethod
    def of(cls, value: str) -> FailureReason:
        """The member named by a backend error's `reason`; an unknown slug is a backend error
        (never an exception: a failure must always be recordable)."""
        try:
            return cls(value)
        except ValueError:
            return cls.BACKEND_ERROR
