"""Evaluate a gated job's version (task `stackml.evaluate`, a model_evaluations.id in).

The candidate (the version the job registered) and the champion (the version the gate's label
points at when the evaluation starts) are scored on the same holdout by the platform's own
evaluator (workers/vm/evaluator.py, TensorFlow on the server), on a *fresh* server of the job:
never on the trainer's server (the trainer is someone else's code; it could have left something
there to forge its score), never in this process (a SavedModel's graph can read and write
files). One run does one bounded step and hands itself back, holding the evaluation's lease:

- PENDING: waits for the version (the register task enqueues this one when it is READY or
  FAILED); then snapshots the champion and the holdout's objects (size, MD5), makes the
  evaluation's own SSH key, records the server's `resources` row (the job's, role
  `evaluator`: quotas and usage count it) and boots it -> BOOTING;
- BOOTING: one look at the server (ACTIVE -> SCORING; BUILD past `boot_deadline`, ERROR ->
  evaluation_failed);
- SCORING: ships runner.py and evaluator.py, writes eval.json (signed GET URLs of both
  versions' files and the holdout, their sizes and MD5s), runs the evaluator with a nonce on
  stdin, checks its one line, and concludes (service/db/evaluations.py: decide, promote with a
  compare-and-set, record).

Then the job's teardown is enqueued: it deletes the evaluator's server like any of the job's
(it kept away from it while the evaluation was not DONE). Past `evaluation_deadline` an
evaluation is refused `evaluation_failed`. The reconciler re-drives evaluations that made no
progress for `stuck_after` (`redrive_stalled`).
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from service import queue
from service.backends.interfaces import Access, HostKeySource, ServerSpec, ServerState
from service.db import evaluations as ev_repo
from service.db import registry
from service.db.models import Job, Model, ModelEvaluation, ModelVersion, Resource, utcnow
from service.domain.errors import BackendError, TransientBackendError
from service.domain.states import ResourceState
from workers import chaos, jobctx, pipeline, ssh
from workers.jobctx import db
from workers.steps.provision import runtime_on_server, sign

log = logging.getLogger("stackml.worker.evaluate")

TASK = "stackml.evaluate"
VM_DIR = Path(__file__).resolve().parents[1] / "vm"
EVAL_DIR = ".stackml/eval"
EVALUATOR = ".stackml/evaluator.py"
AGAIN = 0.5  # seconds between steps while booting
MAX_ANSWER = 64 * 1024


class EvaluationFailed(Exception):
    """Why the evaluation could not score (its decision: refused, evaluation_failed)."""


# -- the lease (as an endpoint's) -------------------------------------------------------------


@dataclass(frozen=True)
class Lease:
    evaluation_id: int
    owner: str
    ttl: float


def _take(eid: int, ttl: float) -> Lease | None:
    owner = secrets.token_hex(8)
    with db() as s:
        won = s.execute(
            update(ModelEvaluation)
            .where(
                ModelEvaluation.id == eid,
                ModelEvaluation.state != ev_repo.DONE,
                pipeline.lease_free(ModelEvaluation),
            )
            .values(step_lease_owner=owner, step_lease_until=utcnow() + timedelta(seconds=ttl))
        ).rowcount  # type: ignore[attr-defined]
    return Lease(eid, owner, ttl) if won else None


def _renew(lease: Lease) -> bool:
    with db() as s:
        return bool(
            s.execute(
                update(ModelEvaluation)
                .where(
                    ModelEvaluation.id == lease.evaluation_id,
                    ModelEvaluation.step_lease_owner == lease.owner,
                )
                .values(step_lease_until=utcnow() + timedelta(seconds=lease.ttl))
            ).rowcount  # type: ignore[attr-defined]
        )


def _release(lease: Lease) -> None:
    with db() as s:
        s.execute(
            update(ModelEvaluation)
            .where(
                ModelEvaluation.id == lease.evaluation_id,
                ModelEvaluation.step_lease_owner == lease.owner,
            )
            .values(step_lease_owner=None, step_lease_until=None)
        )


def _heartbeat(lease: Lease) -> AbstractContextManager[None]:
    return pipeline.lease_heartbeat(
        lease.ttl,
        lambda: _renew(lease),
        lambda: _release(lease),
        what=f"evaluation {lease.evaluation_id}",
        lease_name="its lease",
        thread_name=f"lease-eval-{lease.evaluation_id}",
        warn_lost=False,
    )


def enqueue(evaluation_id: int, countdown: float = 0.0) -> None:
    jobctx.next_step(TASK, str(evaluation_id), countdown)


def enqueue_for_version(version_id: int) -> None:
    """The register task finished `version_id` (READY or FAILED): its gates go on."""
    with db() as s:
        ids = [e.id for e in ev_repo.of_version(s, version_id) if e.state == ev_repo.PENDING]
    for eid in ids:
        enqueue(eid)


# -- the task ---------------------------------------------------------------------------------


def run(evaluation_id: str) -> None:
    try:
        eid = int(evaluation_id)
    except ValueError:
        log.warning("evaluate: %r is not an evaluation id; nothing done", evaluation_id)
        return
    cfg = jobctx.settings()
    lease = _take(eid, max(1.0, cfg.stuck_after))
    if lease is None:
        return  # DONE, gone, or another run holds it
    again: float | None = None
    with _heartbeat(lease):
        try:
            again = _step(eid)
        except EvaluationFailed as e:
            _conclude(eid, failure=str(e))
    if again is not None:
        enqueue(eid, again)


def _step(eid: int) -> float | None:
    """One step; the countdown to the next one, or None (done, or woken by another task)."""
    cfg = jobctx.settings()
    with db() as s:
        ev = s.get(ModelEvaluation, eid)
        if ev is None or ev.state == ev_repo.DONE:
            return None
        state, created = ev.state, _aware(ev.created_at)
        s.execute(
            update(ModelEvaluation).where(ModelEvaluation.id == eid).values(updated_at=utcnow())
        )
    if (datetime.now(UTC) - created).total_seconds() > cfg.evaluation_deadline:
        raise EvaluationFailed(
            f"the evaluation did not finish within evaluation_deadline "
            f"({cfg.evaluation_deadline:.0f}s; it was {state})"
        )
    if state == ev_repo.PENDING:
        return _start(eid)
    if state == ev_repo.BOOTING:
        return _look(eid)
    if state == ev_repo.SCORING:
        return _score(eid)
    return None


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


# -- PENDING -> BOOTING -------------------------------------------------------------------------


def _start(eid: int) -> float | None:
    cfg = jobctx.settings()
    with db() as s:
        ev = s.get_one(ModelEvaluation, eid)
        mv = s.get(ModelVersion, ev.version_id)
        job = s.get(Job, ev.job_id)
        if mv is None:
            raise EvaluationFailed(f"version {ev.version} was deleted before it was evaluated")
        if mv.state == registry.CREATING:
            return None  # the register task enqueues this evaluation when it is done
        if mv.state != registry.READY:
            raise EvaluationFailed(
                f"version {ev.version} is {mv.state}: {mv.failure_message or 'not READY'}"
            )
        if job is None:
            raise EvaluationFailed(f"job {ev.job_id} was deleted before its gate ran")
        model = s.get_one(Model, ev.model_id)
        gate = dict(ev.gate or {})
        label = str(gate.get("label") or registry.DEFAULT_LABEL)
        champion = registry.labels_of(s, model).get(label)
        if champion == ev.version:
            champion = None  # the label already points at the candidate: nothing to beat
        project, trust_id, job_id = ev.project_id, job.trust_id, ev.job_id
    store = jobctx.store(project, trust_id)
    holdout_prefix = store.key_of(str(gate["holdout_uri"]))
    try:
        objects = store.list(holdout_prefix)
    except TransientBackendError:
        raise
    except BackendError as e:
        raise EvaluationFailed(f"the holdout {gate['holdout_uri']} cannot be listed: {e}") from e
    if not objects:
        raise EvaluationFailed(f"nothing is stored at the holdout {gate['holdout_uri']} now")
    if len(objects) > cfg.evaluation_max_holdout_objects:
        raise EvaluationFailed(
            f"the holdout holds {len(objects)} objects, more than "
            f"evaluation_max_holdout_objects ({cfg.evaluation_max_holdout_objects})"
        )
    if sum(o.size for o in objects) > cfg.evaluation_max_holdout_bytes:
        raise EvaluationFailed(
            f"the holdout is larger than evaluation_max_holdout_bytes "
            f"({cfg.evaluation_max_holdout_bytes})"
        )
    holdout = {
        o.key[len(holdout_prefix) :]: {"size": int(o.size), "md5": o.etag.strip('"')}
        for o in sorted(objects, key=lambda o: o.key)
    }
    pem, pub = ssh.generate_keypair(comment=f"stackml-eval-{eid}")
    backend = jobctx.compute(trust_id)
    flavor_name = cfg.evaluation_flavor or cfg.default_flavor
    flavor = backend.find_flavor(flavor_name)
    if flavor is None:  # before any row is written: nothing to delete
        raise EvaluationFailed(
            f"flavor {flavor_name!r} is not offered by the {backend.name} backend"
        )
    name = f"stackml-{job_id}-eval-{secrets.token_hex(3)}"
    with db() as s:
        ev = s.get_one(ModelEvaluation, eid)
        if ev.state != ev_repo.PENDING:
            return AGAIN
        row = Resource(
            job_id=job_id,
            project_id=project,
            backend=backend.name,
            role=ev_repo.ROLE,
            name=name,
            flavor=flavor_name,
            state=ResourceState.BOOTING.value,
            creating=secrets.token_hex(4),
        )
        s.add(row)
        s.flush()
        ev.resource_id, ev.champion_version, ev.holdout = row.id, champion, holdout
        ev.ssh_key_enc, ev.ssh_public_key = jobctx.encrypt_key(pem), pub
        ev.state = ev_repo.BOOTING
        rid = row.id
        jobs_event(
            s,
            job_id,
            f"evaluating version {ev.version} against "
            + (f"version {champion}" if champion is not None else "no champion")
            + f" (label {label!r}) on {len(holdout)} holdout object(s); booting {name}",
        )
    try:
        ref = backend.create_server(
            ServerSpec(
                name=name,
                flavor=flavor,
                image=cfg.default_runtime,
                public_key=pub,
                tags=(
                    ("stackml-job", job_id),
                    ("stackml-role", ev_repo.ROLE),
                    ("stackml-project", project),
                ),
            )
        )
    except TransientBackendError:
        raise  # the row stays booting without a server: adopted by name below, or failed
    except BackendError as e:
        raise EvaluationFailed(f"could not boot the evaluator's server: {e}") from e
    with db() as s:
        r = s.get_one(Resource, rid)
        r.server_id, r.creating = ref.id, None
    return AGAIN


def jobs_event(s: Any, job_id: str, message: str) -> None:
    from service.db import jobs as jobs_repo

    if s.get(Job, job_id) is not None:
        jobs_repo.add_event(s, job_id, "evaluation", message)


# -- BOOTING -> SCORING -------------------------------------------------------------------------


def _look(eid: int) -> float | None:
    cfg = jobctx.settings()
    with db() as s:
        ev = s.get_one(ModelEvaluation, eid)
        r = s.get_one(Resource, ev.resource_id)
        job = s.get(Job, ev.job_id)
        trust_id = job.trust_id if job is not None else None
        server_id, name, created, job_id = r.server_id, r.name, _aware(r.created_at), ev.job_id
    backend = jobctx.compute(trust_id)
    age = (datetime.now(UTC) - created).total_seconds()
    if server_id is None:
        found = [x for x in backend.list_servers(("stackml-job", job_id)) if x.name == name]
        if not found:
            if age > cfg.boot_deadline:
                raise EvaluationFailed("the evaluator's server was never created")
            return AGAIN
        server_id = found[0].id
        with db() as s:
            row = s.get_one(Resource, ev.resource_id)
            row.server_id, row.creating = server_id, None
    status = backend.get_server(server_id)
    if status.state is ServerState.ACTIVE:
        console_key = backend.capabilities.host_key_source is HostKeySource.CONSOLE
        if status.host_key is None and console_key and age <= cfg.boot_deadline:
            return AGAIN
        with db() as s:
            ev = s.get_one(ModelEvaluation, eid)
            row = s.get_one(Resource, ev.resource_id)
            row.state = ResourceState.ACTIVE.value
            row.active_at = utcnow()
            row.host, row.port, row.username = status.host, status.port, status.username
            row.host_key = status.host_key
            ev.state = ev_repo.SCORING
        return 0.0
    if status.state is ServerState.BUILD and age <= cfg.boot_deadline:
        return AGAIN
    raise EvaluationFailed(
        f"the evaluator's server is still building after {cfg.boot_deadline:.0f}s"
        if status.state is ServerState.BUILD
        else f"the evaluator's server {server_id} is {status.state}: {status.fault or ''}".strip()
    )


# -- SCORING -> DONE ----------------------------------------------------------------------------


def _files(store: Any, uri: str, checksums: dict[str, Any], ttl: int) -> list[dict[str, Any]]:
    prefix = store.key_of(uri)
    if not prefix.endswith("/"):
        prefix += "/"
    grant = store.grant(prefix, Access.READ, ttl)
    return [
        {
            "path": rel,
            "url": sign(grant.url_prefix, grant.query, rel),
            "size": int(meta["size"]),
            "md5": str(meta["md5"]),
        }
        for rel, meta in sorted(checksums.items())
    ]


def eval_document(eid: int, runtime: str) -> dict[str, Any]:
    """eval.json: the metric, and signed GET URLs (size, MD5) of the holdout as snapshotted
    and of both versions' files as registered."""
    cfg = jobctx.settings()
    with db() as s:
        ev = s.get_one(ModelEvaluation, eid)
        job = s.get(Job, ev.job_id)
        trust_id = job.trust_id if job is not None else None
        gate, holdout = dict(ev.gate or {}), dict(ev.holdout or {})
        versions = [("candidate", ev.version)]
        if ev.champion_version is not None:
            versions.append(("champion", ev.champion_version))
        rows = []
        for role, number in versions:
            mv = s.scalars(
                select(ModelVersion).where(
                    ModelVersion.model_id == ev.model_id, ModelVersion.version == number
                )
            ).one_or_none()
            if mv is None or mv.state != registry.READY:
                raise EvaluationFailed(f"the {role} (version {number}) is no longer READY")
            rows.append((role, number, mv.artifact_uri, dict(mv.checksums or {})))
        project = ev.project_id
    store = jobctx.store(project, trust_id)
    return {
        "runtime": runtime,
        "metric": gate["metric"],
        "max_rows": cfg.evaluation_max_rows,
        "holdout": _files(store, str(gate["holdout_uri"]), holdout, cfg.grant_ttl),
        "models": [
            {"role": role, "version": number, "files": _files(store, uri, sums, cfg.grant_ttl)}
            for role, number, uri, sums in rows
        ],
    }


def _target(eid: int) -> ssh.SSHTarget:
    with db() as s:
        ev = s.get_one(ModelEvaluation, eid)
        r = s.get_one(Resource, ev.resource_id)
        if ev.ssh_key_enc is None or r.host is None:
            raise EvaluationFailed("the evaluator's server is not reachable (no key or address)")
        return ssh.SSHTarget(
            host=r.host,
            port=r.port or 22,
            username=r.username or "root",
            private_key_pem=jobctx.decrypt_key(ev.ssh_key_enc),
            host_key=r.host_key,
        )


def _score(eid: int) -> float | None:
    cfg = jobctx.settings()
    with db() as s:
        ev = s.get_one(ModelEvaluation, eid)
        r = s.get_one(Resource, ev.resource_id)
        backend_name, has_champion = r.backend, ev.champion_version is not None
    target = _target(eid)
    nonce = secrets.token_hex(16)
    try:
        conn = ssh.wait_for_ssh(target, cfg.ssh_deadline)
        jobctx.ship_runner(conn, EVAL_DIR)
        conn.put_bytes((VM_DIR / "evaluator.py").read_bytes(), EVALUATOR, 0o644)
        runtime = runtime_on_server(backend_name, cfg.default_runtime)
        doc = eval_document(eid, runtime)
        conn.put_bytes(json.dumps(doc).encode(), f"{EVAL_DIR}/eval.json", 0o600)
        chaos.pause("evaluate")  # tests/chaos: a worker killed while it scores
        result = conn.run(
            [f"{runtime}/bin/python", EVALUATOR, EVAL_DIR],
            timeout=cfg.evaluation_run_timeout,
            input=(nonce + "\n").encode(),
        )
    except ssh.RemoteCommandError as e:
        raise EvaluationFailed(f"the evaluator failed: {e.stderr_tail.strip()[-500:]}") from e
    except ssh.SSHError as e:
        ssh.drop(target)
        log.info("evaluation %d: SSH not usable yet (%s); retrying", eid, e)
        return 2.0  # until evaluation_deadline
    scores = parse_answer(result.text, nonce, has_champion)
    _conclude(eid, candidate=scores[0], champion=scores[1], rows=scores[2])
    return None


def parse_answer(text: str, nonce: str, has_champion: bool) -> tuple[float, float | None, int]:
    """The evaluator's answer: exactly one JSON line echoing the nonce, with finite scores for
    every version scored. Anything else is EvaluationFailed (nothing of it is trusted)."""
    lines = [ln for ln in text[:MAX_ANSWER].splitlines() if ln.strip()]
    if len(lines) != 1:
        raise EvaluationFailed(f"the evaluator answered {len(lines)} lines, not one")
    try:
        answer = json.loads(lines[0])
    except ValueError as e:
        raise EvaluationFailed("the evaluator's answer is not JSON") from e
    if not isinstance(answer, dict) or answer.get("nonce") != nonce:
        raise EvaluationFailed("the evaluator's answer does not carry this run's nonce")
    if answer.get("ok") is not True:
        raise EvaluationFailed(f"the evaluator could not score: {str(answer.get('error'))[:500]}")
    rows, scores = answer.get("rows"), answer.get("scores")
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
        raise EvaluationFailed(f"the evaluator's row count {rows!r} is not a positive integer")
    if not isinstance(scores, dict):
        raise EvaluationFailed("the evaluator's answer has no scores")

    def num(role: str) -> float:
        v = scores.get(role)
        if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
            raise EvaluationFailed(f"the {role}'s score {v!r} is not a finite number")
        return float(v)

    return num("candidate"), (num("champion") if has_champion else None), rows


def _conclude(
    eid: int,
    *,
    candidate: float | None = None,
    champion: float | None = None,
    rows: int | None = None,
    failure: str | None = None,
) -> None:
    with db() as s:
        ev = s.get(ModelEvaluation, eid)
        if ev is None or ev.state == ev_repo.DONE:
            return
        outcome = ev_repo.conclude(
            s, ev, candidate=candidate, champion=champion, rows=rows, failure=failure
        )
        job_id = ev.job_id
        job_exists = s.get(Job, job_id) is not None
    log.info(
        "evaluation %d: %s %s: %s", eid, outcome.decision, outcome.reason or "", outcome.message
    )
    if job_exists:
        jobctx.next_step(queue.TEARDOWN, job_id)  # the evaluator's server goes with the job's


def redrive_stalled(before: datetime) -> list[int]:
    """Evaluations not DONE with no progress since `before` and no live lease (a lost task, a
    killed worker): re-enqueued, each by one reconciler (a compare-and-set on updated_at)."""
    won = []
    with db() as s:
        stale = s.scalars(
            select(ModelEvaluation.id).where(
                ModelEvaluation.state != ev_repo.DONE,
                ModelEvaluation.updated_at < before,
                pipeline.lease_free(ModelEvaluation),
            )
        ).all()
        for eid in stale:
            moved = s.execute(
                update(ModelEvaluation)
                .where(ModelEvaluation.id == eid, ModelEvaluation.updated_at < before)
                .values(updated_at=utcnow())
            ).rowcount  # type: ignore[attr-defined]
            if moved:
                won.append(eid)
    for eid in won:
        enqueue(eid)
    return won
