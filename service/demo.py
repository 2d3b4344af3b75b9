"""`stackml demo`: start the local platform, train the bundled Keras example, predict with it."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from service.client import (
    TERMINAL_STATES,
    APIError,
    ClientError,
    Json,
    StackMLClient,
    describe_error,
)
from service.config import REPO_ROOT, Settings, get_settings, reset_settings
from service.domain.errors import StackMLError, StoreError

EXAMPLE_DIR = REPO_ROOT / "examples" / "keras_regression"
JOB_NAME = "demo-keras-regression"
JOB_DEADLINE = 15 * 60.0
TEARDOWN_DEADLINE = 60.0
PREDICT_TIMEOUT = 120.0


def run_demo(settings: Settings, echo: Callable[[str], None], *, clean: bool = False) -> int:
    """Run the whole loop once; 0 when the model trained and answered predictions."""
    from service.cli import watch_job
    from service.platform import LocalPlatform
    from service.runtime import ensure_runtime

    started = time.monotonic()
    # the API's access log would drown the job's own output
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    python = ensure_runtime(settings, settings.default_runtime, echo=echo)
    echo(f"runtime {settings.default_runtime}: {python}")
    where = f"{settings.compute} compute, {settings.store} store"
    echo(f"starting the local platform ({where}; data in {settings.data_dir})...")
    with LocalPlatform(settings, quiet=True) as platform:
        redis = "embedded Redis" if platform.redis_embedded else platform.redis_url
        echo(f"platform up in {time.monotonic() - started:.1f}s: API {platform.url}, {redis}")
        with StackMLClient(platform.url) as client:
            job: Json | None = None
            try:
                job = _submit(client, echo)
                job = watch_job(client, job["id"], timeout=JOB_DEADLINE, console=_console())
                code = _report(settings, job, python, echo)
            except ClientError as e:  # WaitTimeout included: the job is cancelled below
                echo(f"demo failed: {describe_error(e)}")
                code = 1
            finally:
                if job is not None:
                    job = _await_teardown(client, job, echo)
                    if clean:
                        _cleanup(settings, client, job, echo)
        echo("stopping the platform...")
    echo(f"demo {'succeeded' if code == 0 else 'failed'} in {time.monotonic() - started:.1f}s")
    return code


def _console() -> Console:
    return Console(highlight=False, soft_wrap=True, markup=False)


def _submit(client: StackMLClient, echo: Callable[[str], None]) -> Json:
    staged = client.stage_package(EXAMPLE_DIR)
    echo(f"staged {EXAMPLE_DIR} as {staged['package_uri']}")
    job = client.create_job(
        {
            "name": JOB_NAME,
            "trainer": {"package_uri": staged["package_uri"], "module": "trainer.task"},
            "hyperparameters": {"epochs": 3},
            "labels": {"app": "stackml-demo"},
        }
    )
    echo(f"submitted job {job['id']}")
    return job


def _report(
    settings: Settings,
    job: Json,
    python: Path,
    echo: Callable[[str], None],
) -> int:
    from service.cli import failure_sentence

    if job.get("state") != "SUCCEEDED":
        echo(failure_sentence(job))
        return 1
    model_uri = str((job.get("output") or {}).get("model_uri") or "")
    echo(f"model: {model_uri}")
    model_dir = local_path(settings, model_uri)
    if model_dir is None:
        try:
            model_dir = fetch_model(settings, job, echo)
        except (StackMLError, OSError) as e:
            echo(f"the model could not be fetched and verified: {e}")
            return 1
    else:
        echo(f"on disk: {model_dir}")
    predict = EXAMPLE_DIR / "predict.py"
    env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "2"}
    try:
        proc = subprocess.run(
            [str(python), str(predict), str(model_dir)],
            capture_output=True,
            text=True,
            timeout=PREDICT_TIMEOUT,
            env=env,
            cwd=EXAMPLE_DIR,
        )
    except subprocess.TimeoutExpired:
        echo(f"predict.py did not finish within {PREDICT_TIMEOUT:.0f}s")
        return 1
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        echo(f"predict.py failed with status {proc.returncode}: " + " | ".join(tail))
        return 1
    echo(f"predictions for 3 rows: {proc.stdout.strip()}")
    return 0


def fetch_model(settings: Settings, job: Json, echo: Callable[[str], None]) -> Path:
    """Download the job's model from its store (Swift) and check every object's size, and its
    MD5 where the etag is one (a Static Large Object's etag is the MD5 of its segments')."""
    from service.backends import registry

    store = registry.store(settings)
    output = job.get("output") or {}
    prefix = store.key_of(str(output.get("model_uri")))
    target = Path(tempfile.mkdtemp(prefix="stackml-demo-model-"))
    checked = 0
    for obj in output.get("objects") or []:
        data = store.get(prefix + obj["key"])
        if len(data) != int(obj["size"]):
            raise StoreError(
                f"{obj['key']}: {len(data)} bytes in the store, {obj['size']} exported"
            )
        if len(data) <= store_segment_bytes(settings):
            if hashlib.md5(data, usedforsecurity=False).hexdigest() != obj["etag"]:
                raise StoreError(f"{obj['key']}: its MD5 differs from the exported etag")
            checked += 1
        path = target / obj["key"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    n = len(output.get("objects") or [])
    echo(
        f"fetched {n} objects from {output.get('model_uri')} into {target}: sizes verified, "
        f"MD5 verified for {checked}"
    )
    return target


def store_segment_bytes(settings: Settings) -> int:
    return settings.swift_segment_bytes if settings.store == "swift" else 1 << 62


def cloud_settings(cloud: str) -> Settings:
    """Settings for running the demo on an OpenStack cloud: `devcloud` is the one that
    `stackml devcloud up` runs; any other name is a clouds.yaml entry."""
    env = {"STACKML_COMPUTE": "openstack", "STACKML_STORE": "swift"}
    if cloud == "devcloud":
        from devcloud.cloud import DevCloud

        dc = DevCloud()
        if not dc.is_up():
            raise ClientError(
                f"the devcloud in {dc.state_dir} is not up: run `stackml devcloud up` first"
            )
        env.update(
            OS_CLIENT_CONFIG_FILE=str(dc.clouds_yaml),
            STACKML_OPENSTACK_CLOUD="devcloud-stackml",
            STACKML_DEFAULT_FLAVOR=os.environ.get("STACKML_DEFAULT_FLAVOR", "m1.small"),
        )
    else:
        env["STACKML_OPENSTACK_CLOUD"] = cloud
    os.environ.update(env)
    reset_settings()
    return get_settings()


def local_path(settings: Settings, uri: str) -> Path | None:
    """Where a local:// object (or prefix) lies on disk; None for another store."""
    if settings.store != "local" or not uri.startswith("local://"):
        return None
    key = uri[len("local://") :].strip("/")
    root = settings.store_dir.resolve()
    path = (root / key).resolve()
    if path != root and root not in path.parents:
        return None
    return path


def _await_teardown(client: StackMLClient, job: Json, echo: Callable[[str], None]) -> Json:
    """Leave no sandbox behind: cancel the job if it still runs (the watch gave up), then
    wait (bounded) until every server of the job is deleted. Returns the last job seen."""
    deadline = time.monotonic() + TEARDOWN_DEADLINE
    pending: list[str] = []
    cancelled = False
    while time.monotonic() < deadline:
        try:
            job = client.get_job(job["id"])
        except ClientError as e:
            echo(f"cannot check the job's servers: {describe_error(e)}")
            return job
        terminal = job.get("state") in TERMINAL_STATES
        if not terminal and not cancelled:
            echo(f"cancelling job {job['id']}")
            with contextlib.suppress(ClientError):  # it may have just ended
                client.cancel_job(job["id"])
            cancelled = True
        pending = [
            r.get("name", "?") for r in job.get("resources") or [] if r.get("state") != "deleted"
        ]
        if terminal and not pending:
            return job
        time.sleep(0.5)
    echo(
        f"servers still being deleted after {TEARDOWN_DEADLINE:.0f}s: {', '.join(pending)} "
        "(the reconciler finishes it at the next `stackml up`)"
    )
    return job


def _cleanup(
    settings: Settings, client: StackMLClient, job: Json, echo: Callable[[str], None]
) -> None:
    """Delete the demo job and, on the local store, its model (the staged package is
    content-addressed and may be shared, so it stays)."""
    try:
        client.delete_job(job["id"])
    except APIError as e:
        echo(f"kept job {job['id']}: {describe_error(e)}")
        return
    except ClientError as e:
        echo(f"could not delete job {job['id']}: {describe_error(e)}")
        return
    path = local_path(settings, str((job.get("output") or {}).get("model_uri") or ""))
    if path is not None and path != settings.store_dir.resolve() and path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    echo(f"deleted job {job['id']} and its model")
