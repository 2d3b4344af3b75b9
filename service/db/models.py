"""SQLAlchemy 2 models: jobs, their events, resources (servers), log chunks, metrics, quotas."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Text,
    UniqueConstraint,
    false,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from service.domain.states import OwnerKind


def utcnow() -> datetime:
    return datetime.now(UTC)


def iso(dt: datetime | None) -> str | None:
    """A timestamp as the API writes it: UTC, microseconds always, `Z` (so that the strings of
    one API sort as the times do). SQLite drops the zone of stored values: they are UTC."""
    if dt is None:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class Base(DeclarativeBase):
    type_annotation_map = {datetime: DateTime(timezone=True), dict[str, Any]: JSON}


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(63))
    type: Mapped[str] = mapped_column(String(32), default="training")
    state: Mapped[str] = mapped_column(String(16), index=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    failure_phase: Mapped[str | None] = mapped_column(String(16))
    failure_reason: Mapped[str | None] = mapped_column(String(64))
    failure_message: Mapped[str | None] = mapped_column(Text)
    output: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # bytes of the trainer's log already stored (the next offset to pull from the VM)
    log_offset: Mapped[int] = mapped_column(BigInteger, default=0)
    # when the next task for this job was last handed to the queue (for the reconciler)
    last_progress_at: Mapped[datetime] = mapped_column(default=utcnow)
    poll_interval: Mapped[float] = mapped_column(Float, default=0.1)
    # the job's SSH private key, Fernet-encrypted; cleared when its servers are gone
    ssh_key_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    ssh_public_key: Mapped[str | None] = mapped_column(Text)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    # the Keystone trust the workers act through in the job's project (auth=keystone with the
    # openstack backend); cleared once the trust is deleted, after the job's servers are gone
    trust_id: Mapped[str | None] = mapped_column(String(64))
    # why a QUEUED job waits (capacity, quota, backoff), and not before when it retries
    queue_reason: Mapped[str | None] = mapped_column(Text)
    not_before: Mapped[datetime | None]
    # index into the allocation plan (flavor x availability zone) being tried
    alloc_attempt: Mapped[int] = mapped_column(default=0, server_default="0")
    # why a QUEUED job waits, for the machines (service.domain.states.QueueWait); the prose
    # for people is queue_reason
    queue_wait: Mapped[str | None] = mapped_column(String(16))
    # the step in progress holds the job until step_lease_until (renewed by its heartbeat);
    # the reconciler re-drives nothing while the lease is live (workers/pipeline.py)
    step_lease_owner: Mapped[str | None] = mapped_column(String(64))
    step_lease_until: Mapped[datetime | None]
    # when SSH to the job's server began failing in its current state (cleared on transition)
    ssh_failing_since: Mapped[datetime | None]
    # the output prefix's objects (key -> etag) when the job's first export began: a failed
    # export removes only what appeared or changed since (workers/steps/export.py)
    export_baseline: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # restarts of the trainer on a new server (restart_policy), and the job's log offset at
    # which the current server's log file starts (workers/steps/restart.py)
    restarts: Mapped[int] = mapped_column(default=0, server_default="0")
    log_base: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # a hyperparameter tuning trial: its tuning job, its number there, and whether the median
    # rule stopped it (workers/steps/tune.py)
    parent_id: Mapped[str | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="SET NULL", name="fk_jobs_parent_id")
    )
    trial: Mapped[int | None]
    trial_stopped: Mapped[bool] = mapped_column(default=False, server_default=false())

    __table_args__ = (
        Index("ix_jobs_project_created", "project_id", "created_at", "id"),
        UniqueConstraint("parent_id", "trial", name="uq_jobs_parent_trial"),
        Index("ix_jobs_trust_owed", "state", postgresql_where=text("trust_id IS NOT NULL")),
    )


class JobLabel(Base):
    __tablename__ = "job_labels"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(63), primary_key=True)
    value: Mapped[str] = mapped_column(String(256), index=True)


class JobEvent(Base):
    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(32), default="transition")
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str | None] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text, default="")
    # the replica the event is about (k >= 1: `worker-<k>`); None: the job as a whole
    replica: Mapped[int | None] = mapped_column(SmallInteger)


class Resource(Base):
    """One server of an owner (a job today: owner_kind 'job', owner_id its id, and job_id).
    A terminal job whose resources are not all `deleted` is a debt."""

    __tablename__ = "resources"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # the job that owns the server; None for an endpoint's replica (owner_kind 'endpoint')
    job_id: Mapped[str | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), index=True
    )
    owner_kind: Mapped[str] = mapped_column(String(16), default="job", server_default="job")
    owner_id: Mapped[str] = mapped_column(String(64))
    project_id: Mapped[str] = mapped_column(String(64))
    backend: Mapped[str] = mapped_column(String(16))
    role: Mapped[str] = mapped_column(String(16), default="chief")
    name: Mapped[str] = mapped_column(String(128), unique=True)
    server_id: Mapped[str | None] = mapped_column(String(64))
    flavor: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), index=True)
    host: Mapped[str | None] = mapped_column(String(255))
    port: Mapped[int | None]
    username: Mapped[str | None] = mapped_column(String(64))
    host_key: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    active_at: Mapped[datetime | None]
    deleted_at: Mapped[datetime | None]
    delete_attempts: Mapped[int] = mapped_column(default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    # the token of the allocate run that claimed this server's creation (server_id is None
    # until it is created); None once created, or when nobody claimed it
    creating: Mapped[str | None] = mapped_column(String(32))
    # a serving replica (owner_kind 'endpoint', role 'replica'): the model version it serves,
    # its REST port (`port` above is the SSH port), where it is in its life, its health
    version: Mapped[int | None]
    serving_port: Mapped[int | None]
    replica_state: Mapped[str | None] = mapped_column(String(16))
    ready_at: Mapped[datetime | None]
    last_health_at: Mapped[datetime | None]
    health_failures: Mapped[int] = mapped_column(default=0, server_default="0")
    # a job's other server (replica k >= 1): the bytes of its log file stored so far, in
    # ReplicaLogChunk (the chief's log goes to LogChunk, counted by jobs.log_offset)
    log_offset: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")

    __table_args__ = (Index("ix_resources_owner", "owner_kind", "owner_id"),)

    def __init__(self, **kw: Any) -> None:
        if "job_id" in kw:  # a job's server: the owner is the job unless said otherwise
            kw.setdefault("owner_kind", OwnerKind.JOB.value)
            kw.setdefault("owner_id", kw["job_id"])
        super().__init__(**kw)


class LogChunk(Base):
    __tablename__ = "log_chunks"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    offset: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class ReplicaLogChunk(Base):
    """The log of a job's server other than the chief: replica k >= 1 of a distributed job
    (`worker-<k>`), worker k of a batch prediction job. One stream per replica, across
    restarts (each new server's log follows the last one's)."""

    __tablename__ = "replica_log_chunks"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    replica: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    offset: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class ReplicaMetricRow(Base):
    """A metric point from replica k's log (ReplicaLogChunk): `metrics` holds the chief's."""

    __tablename__ = "replica_metrics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    replica: Mapped[int] = mapped_column(SmallInteger)
    name: Mapped[str] = mapped_column(String(128))
    value: Mapped[float] = mapped_column(Float)
    step: Mapped[int | None]
    epoch: Mapped[int | None]
    log_offset: Mapped[int] = mapped_column(BigInteger)  # in the replica's log
    at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        UniqueConstraint(
            "job_id", "replica", "log_offset", "name", name="uq_replica_metrics_point"
        ),
    )


class MetricRow(Base):
    __tablename__ = "metrics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    value: Mapped[float] = mapped_column(Float)
    step: Mapped[int | None]
    epoch: Mapped[int | None]
    # byte offset of the log line it came from: makes re-ingesting the same bytes a no-op
    log_offset: Mapped[int] = mapped_column(BigInteger)
    at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("job_id", "log_offset", "name"),)


class ProjectQuota(Base):
    """A project's quota overrides; a NULL limit (or no row) means the configured default."""

    __tablename__ = "quotas"

    project_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    jobs: Mapped[int | None]
    servers: Mapped[int | None]
    gpus: Mapped[int | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())


class FairShare(Base):
    """When admission last started a job of each project: round-robin goes to the project
    served longest ago."""

    __tablename__ = "fair_share"

    project_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_admitted_at: Mapped[datetime] = mapped_column(default=utcnow, server_default=func.now())
    admitted: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class Model(Base):
    """A registered model of a project: named versions of SavedModels, labels that point at them."""

    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(63))
    description: Mapped[str] = mapped_column(Text, default="", server_default="")
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # the number the next version gets: versions are never reused, even after a delete
    next_version: Mapped[int] = mapped_column(default=1, server_default="1")

    __table_args__ = (UniqueConstraint("project_id", "name", name="uq_models_project_name"),)


class ModelVersion(Base):
    """One version of a model: a SavedModel in the store, checked (checksums, signature)."""

    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    version: Mapped[int]
    state: Mapped[str] = mapped_column(String(16))  # CREATING | READY | FAILED
    artifact_uri: Mapped[str] = mapped_column(Text)
    # {"<path relative to the artifact>": {"size": int, "md5": str}}
    checksums: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # serving_default: {"method_name", "inputs": {name: {"dtype", "shape"}}, "outputs": {...}}
    signature: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    source_job_id: Mapped[str | None] = mapped_column(String(40))
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    failure_message: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        UniqueConstraint("model_id", "version", name="uq_model_versions_model_version"),
    )


class ModelLabel(Base):
    """A label (`default`, any name) pointing at a version of its model."""

    __tablename__ = "model_labels"

    model_id: Mapped[str] = mapped_column(
        ForeignKey("models.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    version: Mapped[int]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class ModelLabelHistory(Base):
    """Every move of a label, append-only: to_version None = the label was removed."""

    __tablename__ = "model_label_history"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    label: Mapped[str] = mapped_column(String(63))
    from_version: Mapped[int | None]
    to_version: Mapped[int | None]
    at: Mapped[datetime] = mapped_column(default=utcnow)
    by: Mapped[str] = mapped_column(String(64))  # a user id, or "system"
    why: Mapped[str] = mapped_column(Text, default="", server_default="")
    # move (set, remove, a gate's promotion), rollback, or refusal (a gate that did not move
    # the label: from_version = to_version = where it stays; "where was it at T" skips these)
    kind: Mapped[str] = mapped_column(String(16), default="move", server_default="move")

    __table_args__ = (Index("ix_model_label_history_model_at", "model_id", "at", "id"),)


class ModelEvaluation(Base):
    """A job's evaluation gate for the version it registered (service/domain/gate.py): the
    candidate and the label's version (the champion) scored on one holdout by the platform's
    evaluator on a server of the job's (`resource_id`, role 'evaluator'), and the decision.
    Its server is held from the job's teardown until `state` is DONE."""

    __tablename__ = "model_evaluations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project_id: Mapped[str] = mapped_column(String(64))
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    version_id: Mapped[int] = mapped_column(
        ForeignKey("model_versions.id", ondelete="CASCADE"), index=True
    )
    version: Mapped[int]
    job_id: Mapped[str] = mapped_column(String(40), index=True)
    gate: Mapped[dict[str, Any]] = mapped_column(JSON)
    # PENDING (the version is being registered) -> BOOTING -> SCORING -> DONE
    state: Mapped[str] = mapped_column(String(16))
    resource_id: Mapped[int | None]
    ssh_key_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    ssh_public_key: Mapped[str | None] = mapped_column(Text)
    champion_version: Mapped[int | None]
    candidate_score: Mapped[float | None] = mapped_column(Float)
    champion_score: Mapped[float | None] = mapped_column(Float)
    holdout_rows: Mapped[int | None]
    # the holdout's objects as scored: {"<path>": {"size", "md5"}}
    holdout: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    decision: Mapped[str | None] = mapped_column(String(16))  # promoted | passed | refused
    reason: Mapped[str | None] = mapped_column(String(32))
    message: Mapped[str | None] = mapped_column(Text)
    step_lease_owner: Mapped[str | None] = mapped_column(String(64))
    step_lease_until: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]


class Endpoint(Base):
    """A model's online-prediction endpoint: replicas (resources rows with owner_kind
    'endpoint') serving the version its label points at, or a pinned version."""

    __tablename__ = "endpoints"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(64), index=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(63), default="default", server_default="default")
    # CREATING | READY | UPDATING | DELETING | DELETED | FAILED
    state: Mapped[str] = mapped_column(String(16), index=True)
    # exactly one set: the endpoint follows a label, or pins a version
    target_label: Mapped[str | None] = mapped_column(String(63))
    target_version: Mapped[int | None]
    # the version that receives traffic now (moved by the rolling switch only)
    serving_version: Mapped[int | None]
    # optional split {"<version>": percent, ...} summing to 100
    traffic: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    replicas: Mapped[int] = mapped_column(default=1)
    flavor: Mapped[str] = mapped_column(String(64))
    log_sample_rate: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    failure_message: Mapped[str | None] = mapped_column(Text)
    # the endpoint's own SSH key for its replicas, Fernet-encrypted (as for jobs)
    ssh_key_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    ssh_public_key: Mapped[str | None] = mapped_column(Text)
    # the Keystone trust the workers act through in the project (as jobs.trust_id)
    trust_id: Mapped[str | None] = mapped_column(String(64))
    step_lease_owner: Mapped[str | None] = mapped_column(String(64))
    step_lease_until: Mapped[datetime | None]
    last_progress_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        # at most one endpoint per model that is not DELETED
        Index(
            "uq_endpoints_model_live",
            "model_id",
            unique=True,
            postgresql_where=text("state <> 'DELETED'"),
            sqlite_where=text("state <> 'DELETED'"),
        ),
    )


class Schedule(Base):
    """A cron schedule of a project that submits a job template at each of its slots
    (service/domain/schedules.py; fired by workers/steps/schedules.py)."""

    __tablename__ = "schedules"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(63))
    cron: Mapped[str] = mapped_column(String(200))
    timezone: Mapped[str] = mapped_column(String(64), default="UTC", server_default="UTC")
    # the job spec each slot submits (as POST /v1/jobs takes it; env values in clear, as jobs)
    job: Mapped[dict[str, Any]] = mapped_column(JSON)
    concurrency: Mapped[str] = mapped_column(String(16), default="Forbid")
    catchup: Mapped[str] = mapped_column(String(8), default="none")
    max_catchup: Mapped[int] = mapped_column(default=10)
    paused: Mapped[bool] = mapped_column(default=False)
    # the dataset each slot rebuilds before its job starts (the job trains on the new version)
    dataset: Mapped[str | None] = mapped_column(String(63))
    # every slot at or before this instant is handled (fired, skipped, or passed over); set
    # to the creation time, and to the resume time (slots while paused never fire)
    handled_until: Mapped[datetime]
    # the first slot after handled_until: what the firing pass looks for (None while paused)
    next_fire_at: Mapped[datetime | None]
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        UniqueConstraint("project_id", "name", name="uq_schedules_project_name"),
        Index("ix_schedules_due", "next_fire_at", postgresql_where=text("NOT paused")),
    )


class ScheduleRun(Base):
    """One slot of a schedule, handled: the unique (schedule_id, fire_time) is what makes a
    slot fire at most once, whoever fires it. job_id names the job it started (no foreign
    key: a job may be deleted, its slot stays)."""

    __tablename__ = "schedule_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    schedule_id: Mapped[str] = mapped_column(ForeignKey("schedules.id", ondelete="CASCADE"))
    fire_time: Mapped[datetime]
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow)
    # started | skipped | failed, or building (its dataset is being rebuilt; the job starts
    # when the version is READY)
    outcome: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text, default="", server_default="")
    job_id: Mapped[str | None] = mapped_column(String(40))
    # earlier slots passed over by this pass (catchup none, or past max_catchup)
    missed: Mapped[int] = mapped_column(default=0, server_default="0")
    # the dataset version the slot rebuilt (dataset_versions.id, and its number), if any
    dataset_version_id: Mapped[int | None] = mapped_column(Integer)
    dataset_version: Mapped[int | None] = mapped_column(Integer)

    __table_args__ = (
        UniqueConstraint("schedule_id", "fire_time", name="uq_schedule_runs_slot"),
        Index("ix_schedule_runs_job", "job_id"),
        Index(
            "ix_schedule_runs_building", "outcome", postgresql_where=text("outcome = 'building'")
        ),
    )


class Feedback(Base):
    """A ground-truth label for one prediction (request id) of a model: one row per (model,
    request id); a different label replaces it (a correction)."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project_id: Mapped[str] = mapped_column(String(64))
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    request_id: Mapped[str] = mapped_column(String(128))
    label: Mapped[Any] = mapped_column(JSON)
    # the SHA-256 of the label's canonical JSON: the same label again is `unchanged`
    label_key: Mapped[str] = mapped_column(String(64))
    labelled_at: Mapped[datetime]  # when the truth was observed (the client's `time`)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    by: Mapped[str] = mapped_column(String(64))

    __table_args__ = (UniqueConstraint("model_id", "request_id", name="uq_feedback_request"),)


class LoggedPrediction(Base):
    """One logged prediction (a request of the serving log), indexed from the store by the
    `stackml.index_serving_logs` pass: its instances and predictions, for the join with
    feedback. The unique (model_id, request_id) makes indexing a line twice a no-op."""

    __tablename__ = "logged_predictions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project_id: Mapped[str] = mapped_column(String(64))
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    request_id: Mapped[str] = mapped_column(String(128))
    version: Mapped[int | None]
    at: Mapped[datetime]
    instances: Mapped[Any] = mapped_column(JSON)
    predictions: Mapped[Any | None] = mapped_column(JSON)
    source_id: Mapped[int | None]  # the serving_log_objects row it came from

    __table_args__ = (
        UniqueConstraint("model_id", "request_id", name="uq_logged_predictions_request"),
        Index("ix_logged_predictions_model_version", "model_id", "version", "id"),
        Index("ix_logged_predictions_model_at", "model_id", "at"),
    )


class ServingLogObject(Base):
    """A serving-log object already indexed (its lines are in logged_predictions): the
    unique (model_id, key) is what makes an object's effect happen once."""

    __tablename__ = "serving_log_objects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project_id: Mapped[str] = mapped_column(String(64))
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(1024))
    lines: Mapped[int] = mapped_column(default=0)
    indexed: Mapped[int] = mapped_column(default=0)  # new logged_predictions rows
    skipped: Mapped[int] = mapped_column(default=0)  # lines that are not usable predictions
    note: Mapped[str] = mapped_column(Text, default="", server_default="")
    indexed_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("model_id", "key", name="uq_serving_log_objects_key"),)


class ServingLogCursor(Base):
    """How far the index pass has listed a model's serving-log hours: the next pass lists
    from the hour of `listed_through` (minus a margin for late batches) to the hour now."""

    __tablename__ = "serving_log_cursors"

    model_id: Mapped[str] = mapped_column(
        ForeignKey("models.id", ondelete="CASCADE"), primary_key=True
    )
    project_id: Mapped[str] = mapped_column(String(64))
    listed_through: Mapped[datetime]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class Dataset(Base):
    """A named, versioned training dataset of a project, built from a model's logged
    predictions joined with their feedback."""

    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(63))
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # the number the next version gets (an atomic UPDATE, as models.next_version)
    next_version: Mapped[int] = mapped_column(default=1, server_default="1")

    __table_args__ = (UniqueConstraint("project_id", "name", name="uq_datasets_project_name"),)


class DatasetVersion(Base):
    """One build of a dataset: BUILDING until `stackml.build_dataset` wrote its objects and
    manifest, then READY, or FAILED with a sentence."""

    __tablename__ = "dataset_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    dataset_id: Mapped[str] = mapped_column(
        ForeignKey("datasets.id", ondelete="CASCADE"), index=True
    )
    version: Mapped[int]
    state: Mapped[str] = mapped_column(String(16), index=True)  # BUILDING | READY | FAILED
    model_name: Mapped[str] = mapped_column(String(63))
    # {"window": {"start", "end"}, "holdout_fraction", "format"}
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    prefix_uri: Mapped[str] = mapped_column(Text)  # <store>://<area>datasets/<name>/<n>/
    manifest: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    failure_message: Mapped[str | None] = mapped_column(Text)
    # the build task holds the version until then (past the task's hard time limit): a
    # re-driven or redelivered build finds it held and returns
    lease_until: Mapped[datetime | None]
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        UniqueConstraint("dataset_id", "version", name="uq_dataset_versions_version"),
    )
