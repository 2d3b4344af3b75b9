"""The queue's priorities on real Redis: what a worker takes first when several steps wait."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import redis
from kombu import Connection

from service import queue
from service.config import reset_settings

REDIS_URL = os.environ.get("STACKML_TEST_REDIS_WORKER", "redis://127.0.0.1:6379/8")


@pytest.fixture
def queue_name(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = f"stackml-priority-{os.getpid()}"
    monkeypatch.setenv("STACKML_REDIS_URL", REDIS_URL)
    monkeypatch.setenv("STACKML_QUEUE", name)
    reset_settings()
    queue._producer.cache_clear()
    yield name
    redis.Redis.from_url(REDIS_URL).delete(*queue.redis_keys(name))
    monkeypatch.undo()
    reset_settings()
    queue._producer.cache_clear()


def test_steps_that_finish_work_are_taken_before_steps_that_start_more(queue_name: str) -> None:
    """Enqueued oldest first: a new job's allocate, a provision, then a poll, an export and a
    teardown. A worker takes the last three first (in order), then the provision, then the
    allocate: a burst finishes the jobs it holds servers for before booting more."""
    sent = [queue.ALLOCATE, queue.PROVISION, queue.POLL, queue.EXPORT, queue.TEARDOWN]
    for i, task in enumerate(sent):
        queue.enqueue(task, f"job-{i}")
    got = []
    with Connection(REDIS_URL) as conn:
        channel = conn.default_channel
        while (message := channel.basic_get(queue_name, no_ack=True)) is not None:
            got.append(message.headers["task"])
    assert got == [queue.POLL, queue.EXPORT, queue.TEARDOWN, queue.PROVISION, queue.ALLOCATE]


def test_the_queues_redis_keys_are_every_list_kombu_fills(queue_name: str) -> None:
    for task in (queue.ALLOCATE, queue.PROVISION, queue.POLL):
        queue.enqueue(task, "j")
    r = redis.Redis.from_url(REDIS_URL)
    assert sum(int(r.llen(k)) for k in queue.redis_keys(queue_name)) == 3
    r.delete(*queue.redis_keys(queue_name))
    assert not any(r.exists(k) for k in queue.redis_keys(queue_name))
