"""Thin Celery tasks: each takes a job id and calls its phase's step (the logic lives there).
Names and time limits come from the pipeline table (workers/pipeline.py)."""

from __future__ import annotations

from service import queue
from workers.base import JobTask
from workers.celery_app import app
from workers.pipeline import limits
from workers.steps import (
    allocate,
    datasets,
    evaluate,
    export,
    poll,
    provision,
    register,
    replace,
    schedules,
    serve,
    serving_index,
    teardown,
)


def _limits(task: str) -> dict[str, int]:
    hard, soft = limits(task)
    return {"time_limit": hard, "soft_time_limit": soft}


@app.task(name=queue.ALLOCATE, base=JobTask, **_limits(queue.ALLOCATE))
def allocate_task(job_id: str) -> None:
    allocate.run(job_id)


@app.task(name=queue.PROVISION, base=JobTask, **_limits(queue.PROVISION))
def provision_task(job_id: str) -> None:
    provision.run(job_id)


@app.task(name=queue.POLL, base=JobTask, **_limits(queue.POLL))
def poll_task(job_id: str) -> None:
    poll.run(job_id)


@app.task(name=replace.TASK, base=JobTask, time_limit=600, soft_time_limit=540)
def replace_replica_task(job_id: str) -> None:
    replace.run(job_id)  # a ParameterServerStrategy worker replaced alone


@app.task(name=queue.EXPORT, base=JobTask, **_limits(queue.EXPORT))
def export_task(job_id: str) -> None:
    export.run(job_id)


@app.task(
    name=queue.TEARDOWN,
    base=JobTask,
    autoretry_for=(*JobTask.autoretry_for, teardown.TeardownIncomplete),
    **_limits(queue.TEARDOWN),
)
def teardown_task(job_id: str) -> None:
    teardown.run(job_id)


@app.task(
    name=queue.CANCEL,
    base=JobTask,
    autoretry_for=(*JobTask.autoretry_for, teardown.TeardownIncomplete),
    **_limits(queue.CANCEL),
)
def cancel_task(job_id: str) -> None:
    teardown.run(job_id)


@app.task(name=queue.CONVERGE_ENDPOINT, base=JobTask, time_limit=600, soft_time_limit=540)
def converge_endpoint_task(endpoint_id: str) -> None:
    serve.run(endpoint_id)  # an endpoint id, leased like export (workers/steps/serve.py)


@app.task(name=queue.REGISTER_VERSION, base=JobTask, time_limit=300, soft_time_limit=270)
def register_version_task(version_id: str) -> None:
    register.run(version_id)  # a model_versions.id (workers/steps/register.py)


@app.task(name=evaluate.TASK, base=JobTask, time_limit=600, soft_time_limit=570)
def evaluate_task(evaluation_id: str) -> None:
    evaluate.run(evaluation_id)  # a model_evaluations.id (workers/steps/evaluate.py)


@app.task(name=queue.RECONCILE, base=JobTask, max_retries=0, **_limits(queue.RECONCILE))
def reconcile_task() -> None:
    from workers import reconciler

    reconciler.run()


@app.task(name=schedules.TASK, base=JobTask, max_retries=0, time_limit=120, soft_time_limit=100)
def fire_schedules_task() -> None:
    schedules.run()  # one firing pass over the schedules with a slot due (beat, every 5 s)


@app.task(name=queue.BUILD_DATASET, base=JobTask, time_limit=600, soft_time_limit=540)
def build_dataset_task(version_id: str) -> None:
    datasets.run(version_id)  # a dataset_versions.id (workers/steps/datasets.py)


@app.task(name=serving_index.TASK, base=JobTask, max_retries=0, time_limit=300, soft_time_limit=270)
def index_serving_logs_task() -> None:
    serving_index.run()  # one index pass over the serving logs (beat, every 30 s)
