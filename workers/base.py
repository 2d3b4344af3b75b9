"""The one base task: acks late, bounded, retried with backoff on transient errors only."""

from __future__ import annotations

import logging

import redis
from celery import Task
from sqlalchemy.exc import OperationalError

from service.domain.errors import TransientBackendError

log = logging.getLogger(__name__)

TRANSIENT = (OperationalError, redis.ConnectionError, redis.TimeoutError, TransientBackendError)


class JobTask(Task):
    """Shared options of every job task (docs/architecture.md): a job id in, state re-read."""

    abstract = True
    acks_late = True
    reject_on_worker_lost = True
    autoretry_for = TRANSIENT
    retry_backoff = 1
    retry_backoff_max = 30
    retry_jitter = True
    max_retries = 8
    time_limit = 120
    soft_time_limit = 100
    ignore_result = True
