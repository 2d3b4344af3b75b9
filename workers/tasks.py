"""Thin Celery tasks: each takes a job id and calls its phase's step (the logic lives there)."""

from __future__ import annotations

from service import queue
from workers.base import JobTask
from workers.celery_app import app
from workers.steps import allocate, export, poll, provision, teardown


@app.task(name=queue.ALLOCATE, base=JobTask, time_limit=180, soft_time_limit=150)
def allocate_task(job_id: str) -> None:
    allocate.run(job_id)


@app.task(name=queue.PROVISION, base=JobTask, time_limit=600, soft_time_limit=540)
def provision_task(job_id: str) -> None:
    provision.run(job_id)


@app.task(name=queue.POLL, base=JobTask, time_limit=90, soft_time_limit=75)
def poll_task(job_id: str) -> None:
    poll.run(job_id)


@app.task(name=queue.EXPORT, base=JobTask, time_limit=600, soft_time_limit=540)
def export_task(job_id: str) -> None:
    export.run(job_id)


@app.task(
    name=queue.TEARDOWN,
    base=JobTask,
    time_limit=180,
    soft_time_limit=150,
    autoretry_for=(*JobTask.autoretry_for, teardown.TeardownIncomplete),
)
def teardown_task(job_id: str) -> None:
    teardown.run(job_id)


@app.task(
    name=queue.CANCEL,
    base=JobTask,
    time_limit=180,
    soft_time_limit=150,
    autoretry_for=(*JobTask.autoretry_for, teardown.TeardownIncomplete),
)
def cancel_task(job_id: str) -> None:
    teardown.run(job_id)


@app.task(name=queue.RECONCILE, base=JobTask, time_limit=120, soft_time_limit=100, max_retries=0)
def reconcile_task() -> None:
    from workers import reconciler

    reconciler.run()
