"""Enqueue worker tasks by name: the API never imports `workers` (docs/architecture.md)."""

from __future__ import annotations

import functools

from celery import Celery

from service.config import get_settings

# Task names are the contract between the API and the workers.
ALLOCATE = "stackml.allocate"
PROVISION = "stackml.provision"
POLL = "stackml.poll"
EXPORT = "stackml.export"
TEARDOWN = "stackml.teardown"
CANCEL = "stackml.cancel"
RECONCILE = "stackml.reconcile"
CONVERGE_ENDPOINT = "stackml.converge_endpoint"  # an endpoint id, not a job id
REGISTER_VERSION = "stackml.register_version"  # a model_versions.id, not a job id
BUILD_DATASET = "stackml.build_dataset"  # a dataset_versions.id, not a job id

# Steps that finish work go before steps that start more (Redis serves priority 0 first, then
# the lists of kombu's priority steps 3, 6, 9): under a burst every job already holding a
# server is polled, exported and torn down before another server is booted, so jobs finish
# one after another instead of all together at the end, and no server waits booted for a
# worker while new ones boot (docs/operations.md, "Sizing the API and the workers").
PRIORITY = {ALLOCATE: 6, PROVISION: 3}


def redis_keys(queue_name: str) -> list[str]:
    """The Redis lists that hold a queue's messages: kombu keeps one per priority step."""
    from kombu.transport.redis import PRIORITY_STEPS, Channel

    return [queue_name, *(f"{queue_name}{Channel.sep}{p}" for p in PRIORITY_STEPS if p)]


@functools.cache
def _producer(broker_url: str, queue_name: str) -> Celery:
    app = Celery("stackml-producer", broker=broker_url)
    app.conf.broker_connection_timeout = 5
    app.conf.task_default_queue = queue_name
    app.conf.broker_transport_options = {"socket_timeout": 5, "socket_connect_timeout": 5}
    return app


def enqueue(task: str, job_id: str, countdown: float = 0.0) -> None:
    """Hand a job's next step to the workers; lost messages are re-driven by the reconciler."""
    settings = get_settings()
    app = _producer(settings.redis_url, settings.queue)
    app.send_task(
        task,
        args=[job_id],
        countdown=countdown or None,
        priority=PRIORITY.get(task, 0),
        retry=True,
        retry_policy={
            "max_retries": 3,
            "interval_start": 0.2,
            "interval_step": 0.5,
            "interval_max": 2,
        },
    )
