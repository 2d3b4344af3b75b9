"""Who writes where in the object store: every job's model goes under a prefix it owns.

A job's output prefix is either its default, ``<project area>models/<job id>/`` (a prefix no
one else can name), or a prefix the submitter gives. A given prefix is accepted only when it
is new and unshared: inside the project's area, not the staging area (packages), not the
models area itself nor a job's default ``models/job-*/``, nothing stored under it, and no
other job that may still write there (or whose model is there) holding the same prefix, one
above it or one below it. The job's database row is the reservation (service/api/jobs.py
checks and inserts under one lock), so two submissions cannot both take one prefix.
"""

from __future__ import annotations

STAGING = "staging/"  # POST /v1/packages writes here (service/api/packages.py)
MODELS = "models/"
JOB_DIR = "job-"  # models/job-<hex>/ are default prefixes (service/db/jobs.py new_job_id)
# the platform's own areas: datasets the builder writes (service/db/datasets.py), the serving
# log (service/serving_log.py); a job writing there could forge training data
RESERVED = ("datasets/", "serving-logs/")


def default_prefix(area: str, job_id: str) -> str:
    """The output prefix of a job that names none: its own directory in the models area."""
    return f"{area}{MODELS}{job_id}/"


def as_prefix(key: str) -> str:
    """A key as a directory-like prefix: `a/b` names everything under `a/b/`."""
    return key if key.endswith("/") else key + "/"


def prefix_problem(prefix: str, area: str) -> str | None:
    """Why `prefix` (ending in '/', inside `area` and not `area` itself) may not be a
    submitter's output prefix, or None when it may."""
    rel = prefix[len(area) :] if prefix.startswith(area) else prefix
    if rel.startswith(STAGING):
        return f"must not be in the staging area {area}{STAGING} (where packages are stored)"
    for area_dir in RESERVED:
        if rel.startswith(area_dir):
            return f"must not be in {area}{area_dir} (the platform writes there)"
    if rel == MODELS:
        return (
            f"must not be the models area {area}{MODELS} itself; name a new directory in it, "
            f"e.g. {area}{MODELS}<name>/"
        )
    if rel.startswith(MODELS + JOB_DIR):
        return f"{area}{MODELS}{JOB_DIR}*/ are the jobs' own default prefixes; choose another name"
    return None


def ancestors(prefix: str) -> list[str]:
    """`prefix` and every directory prefix above it: "a/b/c/" -> ["a/", "a/b/", "a/b/c/"]."""
    parts = as_prefix(prefix).split("/")[:-1]
    return ["/".join(parts[: i + 1]) + "/" for i in range(len(parts))]


def overlaps(a: str, b: str) -> bool:
    """Whether two output prefixes share an object: one is the other or lies inside it."""
    a, b = as_prefix(a), as_prefix(b)
    return a.startswith(b) or b.startswith(a)


def holdout_problem(prefix: str, area: str) -> str | None:
    """Why `prefix` (ending in '/', inside `area`) may not be a gate's holdout, or None: not
    the models area nor the staging area, where jobs and uploads write (a trainer must not be
    able to write the data it is judged on)."""
    rel = prefix[len(area) :] if prefix.startswith(area) else prefix
    if rel.startswith(MODELS) or rel.startswith(STAGING):
        return (
            f"must not be in {area}{MODELS} or {area}{STAGING}, where jobs and uploads write: "
            "a trainer must not be able to write the data it is judged on"
        )
    return None
