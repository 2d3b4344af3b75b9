"""The job state machine: the transition table, and the compare-and-set that applies it."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import select

from service.db import jobs as repo
from service.db.models import JobEvent
from service.db.session import session_scope
from service.domain.spec import JobSpec
from service.domain.states import (
    ACTIVE,
    ALLOWED,
    PHASE_OF_STATE,
    TERMINAL,
    FailureReason,
    JobState,
    Phase,
    can_transition,
)

S = JobState
HAPPY_PATH = [S.QUEUED, S.ALLOCATING, S.PROVISIONING, S.RUNNING, S.EXPORTING, S.SUCCEEDED]


def test_sets_partition_the_states():
    assert TERMINAL == {S.SUCCEEDED, S.CANCELLED, S.FAILED}
    assert ACTIVE | TERMINAL == set(JobState) and not ACTIVE & TERMINAL
    assert all(s.terminal for s in TERMINAL) and not any(s.terminal for s in ACTIVE)


def test_happy_path_is_allowed():
    for a, b in zip(HAPPY_PATH, HAPPY_PATH[1:], strict=False):
        assert can_transition(a, b)


def test_terminal_states_are_final():
    for s in TERMINAL:
        assert ALLOWED[s] == frozenset()


@pytest.mark.parametrize("state", sorted(ACTIVE))
def test_every_active_state_can_fail(state):
    assert can_transition(state, S.FAILED)


@pytest.mark.parametrize("state", sorted(ACTIVE - {S.CANCELLING}))
def test_every_active_state_can_be_cancelled(state):
    assert can_transition(state, S.CANCELLING)


def test_cancelling_only_ends():
    assert ALLOWED[S.CANCELLING] == {S.CANCELLED, S.FAILED}


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (S.QUEUED, S.RUNNING),
        (S.RUNNING, S.SUCCEEDED),
        (S.PROVISIONING, S.QUEUED),
        (S.EXPORTING, S.QUEUED),
        (S.SUCCEEDED, S.FAILED),
        (S.FAILED, S.QUEUED),
        (S.QUEUED, S.CANCELLED),
        (S.RUNNING, S.CANCELLED),
        (S.EXPORTING, S.RUNNING),
    ],
)
def test_forbidden_transitions(a, b):
    assert not can_transition(a, b)


def test_only_a_tuning_job_starts_at_once_and_succeeds_from_running():
    for a, b in ((S.QUEUED, S.RUNNING), (S.RUNNING, S.SUCCEEDED)):
        assert not can_transition(a, b) and can_transition(a, b, tuning=True)
    assert not can_transition(S.QUEUED, S.SUCCEEDED, tuning=True)
    assert not can_transition(S.PROVISIONING, S.SUCCEEDED, tuning=True)


def test_allocation_may_requeue():
    assert can_transition(S.ALLOCATING, S.QUEUED)


def test_a_running_job_may_requeue_for_a_restart():
    assert can_transition(S.RUNNING, S.QUEUED)


def test_every_active_state_has_a_failure_phase():
    assert set(PHASE_OF_STATE) == set(ACTIVE)
    assert PHASE_OF_STATE[S.RUNNING] is Phase.TRAIN


# -- compare-and-set against the database -------------------------------------------------


@pytest.fixture
def job_id(db_url: str) -> str:
    spec = JobSpec.model_validate(
        {"name": "cas", "trainer": {"package_uri": "local://projects/local/p.tgz", "module": "m"}}
    )
    with session_scope(db_url) as s:
        return repo.create_job(s, "local", spec).id


def _transitions_to(db_url: str, job_id: str, state: JobState) -> int:
    with session_scope(db_url) as s:
        return len(
            list(
                s.scalars(
                    select(JobEvent).where(
                        JobEvent.job_id == job_id, JobEvent.to_state == state.value
                    )
                )
            )
        )


def test_cas_sequential_loser_changes_nothing(db_url, job_id):
    with session_scope(db_url) as s:
        assert repo.transition(s, job_id, S.QUEUED, S.ALLOCATING, "first")
    with session_scope(db_url) as s:
        assert not repo.transition(s, job_id, S.QUEUED, S.FAILED, "second")
        assert repo.get_job(s, job_id).state == S.ALLOCATING
    assert _transitions_to(db_url, job_id, S.ALLOCATING) == 1
    assert _transitions_to(db_url, job_id, S.FAILED) == 0


def test_cas_concurrent_only_one_wins(db_url, job_id):
    barrier = threading.Barrier(4)
    results: list[bool] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        with session_scope(db_url) as s:
            won = repo.transition(s, job_id, S.QUEUED, S.ALLOCATING, "race")
        with lock:
            results.append(won)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(results) == [False, False, False, True]
    assert _transitions_to(db_url, job_id, S.ALLOCATING) == 1


def test_transition_records_times_and_failure(db_url, job_id):
    with session_scope(db_url) as s:
        for a, b in zip(HAPPY_PATH[:3], HAPPY_PATH[1:4], strict=True):
            assert repo.transition(s, job_id, a, b)
        assert repo.transition(
            s,
            job_id,
            S.RUNNING,
            S.FAILED,
            failure=repo.Failure(Phase.TRAIN, FailureReason.TRAINER_EXIT_NONZERO, "exit 3"),
        )
        job = repo.get_job(s, job_id)
        body = repo.serialize_job(s, job)
    assert body["started_at"] and body["finished_at"]
    assert body["failure"] == {
        "phase": "train",
        "reason": "trainer_exit_nonzero",
        "message": "exit 3",
    }


def test_every_error_reason_a_worker_can_record_is_a_failure_reason() -> None:
    import service.backends.compute.sandbox
    import service.backends.storage.swift
    import service.runtime
    import service.trusts  # noqa: F401
    import workers.ssh
    import workers.steps.teardown  # noqa: F401
    from service.domain.errors import BackendError

    def subclasses(c: type) -> list[type]:
        return [c, *(x for sub in c.__subclasses__() for x in subclasses(sub))]

    reasons = {c.reason for c in subclasses(BackendError)}  # type: ignore[attr-defined]
    assert reasons <= {r.value for r in FailureReason}
    # the API contract: these slugs never change
    for slug in ("no_valid_host", "quota_exceeded", "timeout", "server_lost", "no_model"):
        assert FailureReason(slug).value == slug
    assert FailureReason.of("something new") is FailureReason.BACKEND_ERROR
    assert FailureReason.of("upload_failed") is FailureReason.UPLOAD_FAILED
