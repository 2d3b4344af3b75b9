"""The Celery application: Redis broker, shared task options, beat schedule for the reconciler."""

from __future__ import annotations

from celery import Celery
from celery.signals import beat_init, worker_init, worker_process_init

from service.config import get_settings

settings = get_settings()

app = Celery("stackml", broker=settings.redis_url, include=["workers.tasks"])
app.conf.update(
    task_ignore_result=True,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    broker_connection_timeout=5,
    # a message not acked within this time is redelivered: every task is far shorter
    broker_transport_options={
        "visibility_timeout": 3600,
        "socket_timeout": 10,
        "socket_connect_timeout": 5,
    },
    task_default_queue=settings.queue,
    beat_schedule={
        "reconcile": {
            "task": "stackml.reconcile",
            "schedule": settings.reconcile_interval,
            "options": {"expires": max(settings.reconcile_interval * 2, 5)},
        },
        # schedules' slots (workers/steps/schedules.py): a pass every 5 s; two beats, a lost
        # or expired message are harmless (the slot row's unique key decides who fires)
        "fire-schedules": {
            "task": "stackml.fire_schedules",
            "schedule": 5.0,
            "options": {"expires": 10},
        },
        # the serving log's index (workers/steps/serving_index.py): two passes at once, a
        # lost or expired message are harmless (unique keys decide what is indexed)
        "index-serving-logs": {
            "task": "stackml.index_serving_logs",
            "schedule": 30.0,
            "options": {"expires": 60},
        },
    },
)


@worker_init.connect
@beat_init.connect
def _private_data_dir(**_: object) -> None:
    """A worker or beat writes into a private data dir with umask 077, however it was started
    (`stackml up` did this already; `celery worker` / `celery beat` directly did not)."""
    from service.datadir import secure_data_dir

    secure_data_dir(get_settings())


@worker_init.connect
def _lower_priority(**_: object) -> None:
    """Steps (and the sandboxes and trainers they start) yield the CPU to the API and the
    database on a shared host: `worker_nice`, set once in the parent before the pool forks."""
    import os

    by = get_settings().worker_nice
    if by:
        os.nice(by)


@worker_init.connect
def _warm(**_: object) -> None:
    """What every pool process would do on its first step, done once in the parent before the
    pool forks: the runner's bytecode compiled, the configured backends' modules imported (no
    cloud login)."""
    from workers import jobctx

    jobctx.warm()


@worker_process_init.connect
def _after_fork(**_: object) -> None:
    """Pooled DB connections and SSH transports must not cross a fork."""
    from service.db.session import dispose_all

    dispose_all()
    from workers import ssh

    ssh.close_all()
