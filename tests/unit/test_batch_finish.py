"""The export step of a batch job (workers/steps/batch.finish) on a real SQLite database and the
local store: one server's manifest.json checked as before; over several servers
(prediction.max_workers W > 1) the workers' part manifests merged into manifest.json (the job
SUCCEEDED with the totals, the parts deleted), and a part missing, forged or of another run
failing the job with a message that names the worker, the merged manifest kept for a re-run.
The job.json of worker k of W says so."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from service import queue
from service.backends.storage.local import LocalStore
from service.config import Settings
from service.db import jobs as repo
from service.db.models import Job
from service.db.session import session_scope
from service.domain import batch as dom
from service.domain.spec import JobSpec
from service.domain.states import FailureReason, JobState
from tests.unit.test_api_jobs import advance
from workers import jobctx, pipeline
from workers.steps import batch

PROJECT = "p"
OUT = f"projects/{PROJECT}/predictions/run1/"
REQUEST = {"model": "m", "version": 1, "shard_rows": 2}
SHARDS = dom.plan_shards([3, 4], 2)  # 4 shards: 2, 1, 2, 2 rows
COUNTS = {0: {"rows": 2, "errors": 0}, 1: {"rows": 0, "errors": 1}}
COUNTS |= {2: {"rows": 1, "errors": 1}, 3: {"rows": 2, "errors": 0}}
FP = "c" * 64


class Env:
    def __init__(self, url: str, store: LocalStore, steps: list[tuple[str, str]]) -> None:
        self.url, self.store, self.steps = url, store, steps

    def job(self, workers: int) -> jobctx.StepContext:
        spec = JobSpec.model_validate(
            {
                "name": "b",
                "type": "batch_prediction",
                "prediction": {
                    "model": "m",
                    "version": 1,
                    "input_uris": [f"local://projects/{PROJECT}/data/x.jsonl"],
                    "output_prefix": f"local://{OUT}",
                    "max_workers": workers,
                },
            }
        )
        with session_scope(self.url) as s:
            job_id = repo.create_job(s, PROJECT, spec).id
        advance(
            self.url,
            job_id,
            JobState.ALLOCATING,
            JobState.PROVISIONING,
            JobState.RUNNING,
            JobState.EXPORTING,
        )
        return jobctx.StepContext(
            job_id=job_id,
            state=JobState.EXPORTING,
            step=pipeline.PIPELINE[JobState.EXPORTING],
            project_id=PROJECT,
            trust_id=None,
            spec=spec,
            server_id=None,
            backend=None,
            target=None,
            lease=None,
            job=self.row(job_id),
        )

    def row(self, job_id: str) -> Job:
        with session_scope(self.url) as s:
            return repo.get_job(s, job_id)

    def state(self, job_id: str) -> tuple[str, str | None, str | None, dict[str, Any]]:
        with session_scope(self.url) as s:
            job = repo.get_job(s, job_id)
            return job.state, job.failure_reason, job.failure_message, dict(job.output or {})

    def shards(self, numbers: range | list[int] = range(4)) -> None:
        for n in numbers:
            self.store.put(OUT + dom.shard_name(dom.RESULTS, n, 4), b"{}\n")
            self.store.put(OUT + dom.shard_name(dom.ERRORS, n, 4), b"")

    def part(self, worker: int, workers: int, *, done: list[int] | None = None) -> None:
        """Worker k's part manifest: its own shards done (or those in `done`)."""
        mine = [n for n in COUNTS if dom.owner(n, workers) == worker] if done is None else done
        doc = dom.manifest(FP, REQUEST, SHARDS, {n: COUNTS[n] for n in mine})
        self.store.put(OUT + dom.part_manifest_name(worker, workers), json.dumps(doc).encode())

    def names(self) -> set[str]:
        return {o.key[len(OUT) :] for o in self.store.list(OUT)}


@pytest.fixture
def env(settings: Settings, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    store = LocalStore(tmp_path / "store", "http://127.0.0.1:1", b"k" * 32)
    steps: list[tuple[str, str]] = []
    monkeypatch.setattr(jobctx, "settings", lambda: settings)
    monkeypatch.setattr(jobctx, "store", lambda project_id=None, trust_id=None: store)
    monkeypatch.setattr(
        jobctx, "next_step", lambda task, job_id, countdown=0.0: steps.append((task, job_id))
    )
    return Env(db_url, store, steps)


def test_one_server_finishes_from_its_manifest_as_before(env: Env) -> None:
    ctx = env.job(1)
    env.shards()
    doc = dom.manifest(FP, REQUEST, SHARDS, COUNTS)
    env.store.put(OUT + dom.MANIFEST, json.dumps(doc).encode())
    batch.finish(ctx)
    state, _, message, output = env.state(ctx.job_id)
    assert state == JobState.SUCCEEDED, message
    rec = output["prediction"]
    assert (rec["rows"], rec["errors"], rec["shards"]) == (7, 2, 4)


@pytest.mark.parametrize("workers", [2, 3, 5])
def test_several_servers_parts_are_merged_into_the_manifest(env: Env, workers: int) -> None:
    ctx = env.job(workers)
    env.shards()
    for k in range(workers):  # with 5 workers, worker 4 owns no shard: its part marks none
        env.part(k, workers)
    batch.finish(ctx)
    state, _, message, output = env.state(ctx.job_id)
    assert state == JobState.SUCCEEDED, message
    rec = output["prediction"]
    assert (rec["rows"], rec["errors"], rec["predicted"], rec["shards"]) == (7, 2, 5, 4)
    merged = json.loads(env.store.get(OUT + dom.MANIFEST))
    # what one server would have written, so that a re-run resumes from it
    assert merged == json.loads(json.dumps(dom.manifest(FP, REQUEST, SHARDS, COUNTS)))
    assert not any(dom.is_part_name(n) for n in env.names())  # merged, then deleted
    assert env.steps[-1] == (queue.TEARDOWN, ctx.job_id)


def test_a_missing_part_fails_the_job_naming_the_worker(env: Env) -> None:
    ctx = env.job(3)
    env.shards()
    env.part(0, 3)
    env.part(2, 3)
    batch.finish(ctx)
    state, reason, message, _ = env.state(ctx.job_id)
    assert state == JobState.FAILED and reason == FailureReason.RUNNER_OUTPUT_INVALID
    assert "batch worker 1 of 3" in str(message)
    assert "manifest.worker-00001-of-00003.json" in str(message)
    assert dom.MANIFEST not in env.names()


def test_a_forged_or_foreign_part_fails_the_job(env: Env) -> None:
    ctx = env.job(2)
    env.shards()
    env.part(0, 2, done=[0, 1, 2])  # shard 1 is worker 1's
    env.part(1, 2)
    batch.finish(ctx)
    state, _, message, _ = env.state(ctx.job_id)
    assert state == JobState.FAILED
    assert "part 0 marks shard 1 done, which worker 1 owns" in str(message)

    ctx = env.job(2)
    env.part(0, 2)
    env.store.put(OUT + dom.part_manifest_name(1, 2), b'{"fingerprint": 1}')
    batch.finish(ctx)
    state, _, message, _ = env.state(ctx.job_id)
    assert state == JobState.FAILED and "part 1" in str(message), message

    ctx = env.job(2)
    env.store.put(OUT + dom.part_manifest_name(1, 2), b"not json")
    batch.finish(ctx)
    state, _, message, _ = env.state(ctx.job_id)
    assert state == JobState.FAILED and "batch worker 1 of 2" in str(message), message


def test_an_incomplete_run_fails_and_keeps_the_merged_manifest_for_a_rerun(env: Env) -> None:
    ctx = env.job(2)
    env.shards([0, 2])
    env.part(0, 2)
    env.part(1, 2, done=[])  # worker 1 computed nothing (it exited 0 all the same)
    batch.finish(ctx)
    state, _, message, _ = env.state(ctx.job_id)
    assert state == JobState.FAILED and "2 of 4 shards are not done" in str(message)
    merged = json.loads(env.store.get(OUT + dom.MANIFEST))
    assert [sh["done"] for sh in merged["shards"]] == [True, False, True, False]
    assert dom.part_manifest_name(0, 2) in env.names()  # kept: only a success deletes them


def test_job_json_says_which_worker_a_server_is(tmp_path: Path) -> None:
    spec = JobSpec.model_validate(
        {
            "name": "b",
            "type": "batch_prediction",
            "prediction": {
                "model": "m",
                "version": 1,
                "input_uris": ["local://projects/p/data/x.jsonl"],
                "output_prefix": "local://projects/p/out/",
                "max_workers": 3,
            },
        }
    )
    store = LocalStore(tmp_path / "store", "http://127.0.0.1:1", b"k" * 32)
    store.put("projects/p/data/x.jsonl", b"[1]\n")

    def build(**kw: Any) -> dict[str, Any]:
        return batch.build(
            store,
            60,
            job_id="j",
            project_id="p",
            runtime="r",
            spec=spec,
            request=REQUEST,
            artifact="local://projects/p/models/m/1/",
            checksums={},
            **kw,
        )

    doc = build()
    assert (doc["worker"], doc["workers"]) == (0, 1)  # one server: what old job.json implied
    doc = build(worker=2, workers=3)
    assert (doc["worker"], doc["workers"]) == (2, 3)
    for bad in [{"worker": 3, "workers": 3}, {"worker": -1, "workers": 2}, {"workers": 0}]:
        with pytest.raises(ValueError, match="worker"):
            build(**bad)
