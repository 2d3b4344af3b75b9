"""`stackml demo --loop`: the closed loop on the local platform, end to end, as a user runs it.

A weak first version of the example model (one epoch at a tiny learning rate) is registered
and deployed on an endpoint that logs every request; rows of features are predicted through
the API and labelled afterwards, by the `X-Request-Id` each answer carried, with the values of
the function the example learns (computed by the example's own code in the TensorFlow
runtime); beat's index pass joins the labels with the logged predictions (the version's live
metrics) and a dataset is built from them. Two schedules then fire every minute, each
rebuilding the dataset before its job: one retrains the example well, one badly, both behind an
evaluation gate (rmse below THRESHOLD) scored on the rebuilt version's holdout. The good
candidate is promoted to `default`, the bad one refused; the endpoint, following `default`,
switches to the promoted version while a steady load of predictions runs, and every answer is
counted. `closed_loop` returns what happened; the e2e test asserts on it
(tests/e2e/test_closed_loop.py).
"""

from __future__ import annotations

import functools
import http.client
import json
import secrets
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from service.client import ClientError, Json, StackMLClient, describe_error
from service.config import REPO_ROOT, Settings

EXAMPLE_DIR = REPO_ROOT / "examples" / "keras_regression"
REQUESTS, PER_REQUEST = 60, 10
THRESHOLD = 2.0  # rmse: the target's std is ~4.5 (20 unit-normal features, unit-normal weights)
ENV = {"TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "2"}
WEAK = {"epochs": 1, "learning_rate": 0.00001}
GOOD = {"epochs": 40, "batch_size": 32}
DEADLINE = 600.0  # for each wait below

ROWS = f"""
import json, sys
sys.path.insert(0, {str(EXAMPLE_DIR)!r})
import numpy as np
from trainer.task import N_FEATURES, target
x = np.random.default_rng(777).normal(size=({REQUESTS * PER_REQUEST}, N_FEATURES))
x = x.astype("float32")
print(json.dumps({{"x": x.tolist(), "y": target(x)[:, 0].tolist()}}))
"""


class LoopFailed(Exception):
    """A step of the loop did not reach what it waits for; the message says which."""


@dataclass
class Load:
    """Single-row predictions on the model's default route, in a thread, until stopped."""

    url: str
    body: bytes
    answers: list[tuple[int, str]] = field(default_factory=list)  # (status, X-Model-Version)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> Load:
        parts = urlsplit(self.url)

        def loop() -> None:
            conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=60)
            while not self.stop.is_set():
                try:
                    conn.request(
                        "POST", parts.path, self.body, {"Content-Type": "application/json"}
                    )
                    r = conn.getresponse()
                    r.read()
                    self.answers.append((r.status, r.getheader("X-Model-Version") or ""))
                except (OSError, http.client.HTTPException) as e:
                    self.answers.append((0, repr(e)))
                    conn.close()
                    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=60)
                time.sleep(0.02)
            conn.close()

        self.thread = threading.Thread(target=loop, name="loop-demo-load", daemon=True)
        self.thread.start()
        return self

    def finish(self) -> list[tuple[int, str]]:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=90)
        return self.answers


@dataclass
class LoopResult:
    model: str
    dataset: str
    endpoint: str
    first_job: str
    jobs: dict[str, str]  # schedule name -> the job its slot started
    runs: dict[str, Json]  # schedule name -> its slot
    live: Json  # the champion's live metrics from the labelled predictions
    manifest: Json  # the first dataset version's
    promoted: Json  # the good candidate's version (with its evaluation)
    refused: Json  # the bad candidate's version
    labels: dict[str, int]
    history: list[Json]
    answers: list[tuple[int, str]]  # the steady load across the switch

    @property
    def failed(self) -> list[tuple[int, str]]:
        return [a for a in self.answers if a[0] != 200]

    @property
    def versions(self) -> Counter[str]:
        return Counter(v for status, v in self.answers if status == 200)


def until(
    what: str, check: Callable[[], Any], timeout: float = DEADLINE, every: float = 1.0
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise LoopFailed(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)


def _template(pkg: str, model: str, hp: dict[str, Any], gate: bool = True) -> Json:
    output: Json = {"register_as": model}
    if gate:
        output["gate"] = {"metric": "rmse", "threshold": THRESHOLD}
    return {
        "name": f"{model}-retrain",
        "trainer": {"package_uri": pkg, "module": "trainer.task"},
        "hyperparameters": hp,
        "env": ENV,
        "output": output,
        "max_runtime_seconds": 600,
    }


def _succeeded(client: StackMLClient, job_id: str) -> Json:
    job = until(
        f"job {job_id} finished",
        lambda: (
            (j := client.get_job(job_id))["state"] in ("SUCCEEDED", "FAILED", "CANCELLED") and j
        ),
    )
    if job["state"] != "SUCCEEDED":
        raise LoopFailed(f"job {job_id} {job['state']}: {job.get('failure')}")
    return job


def _serving(client: StackMLClient, model: str, endpoint: str, version: int) -> bool:
    e = client.get_endpoint(model, endpoint)
    if e["state"] == "FAILED":
        raise LoopFailed(f"endpoint {endpoint} FAILED: {e.get('failure_message')}")
    ready = [s for s in e["servers"] if s["replica_state"] == "ready"]
    return e["serving_version"] == version and bool(ready) and len(ready) == len(e["servers"])


def _started(client: StackMLClient, sid: str) -> Json | None:
    runs = client.schedule_runs(sid)
    failed = [r for r in runs if r["outcome"] == "failed"]
    if failed:
        raise LoopFailed(f"schedule {sid}'s slot failed: {failed[0]['reason']}")
    started = [r for r in runs if r["outcome"] == "started"]
    return started[-1] if started else None  # runs come latest first: the first slot's


def _evaluated(client: StackMLClient, model: str, job_id: str) -> Json | None:
    for v in client.list_versions(model):
        ev = v.get("evaluation") or {}
        if ev.get("job_id") == job_id and ev.get("state") == "DONE":
            return v
    return None


def closed_loop(
    client: StackMLClient, python: Path, api_url: str, echo: Callable[[str], None], model: str
) -> LoopResult:
    """Run the loop once on a running platform (the API at `api_url`) with model `model`
    (new: its versions start at 1); the endpoint and schedules are left for the caller."""
    dataset = f"{model}-data"
    pkg = str(client.stage_package(EXAMPLE_DIR)["package_uri"])
    first = client.create_job(_template(pkg, model, WEAK, gate=False))
    echo(f"1. training a weak first version of {model} ({first['id']})...")
    _succeeded(client, first["id"])
    until(f"{model} v1 READY", lambda: client.get_model(model)["labels"].get("default") == 1)
    ep = client.deploy(model, replicas=1, log_sample_rate=1.0)
    until("the endpoint serving v1", functools.partial(_serving, client, model, ep["id"], 1))
    echo(f"   v1 serves on endpoint {ep['id']}, every request logged")

    out = subprocess.run(
        [str(python), "-c", ROWS], capture_output=True, text=True, timeout=120, check=False
    )
    if out.returncode != 0:
        raise LoopFailed(f"computing the example's rows failed: {out.stderr[-2000:]}")
    data = json.loads(out.stdout)
    url = f"{api_url}/v1/models/{model}:predict"
    feedback = []
    for i in range(REQUESTS):
        rows = slice(i * PER_REQUEST, (i + 1) * PER_REQUEST)
        answer, rid = _predict(url, {"instances": data["x"][rows]})
        feedback.append({"request_id": rid, "label": data["y"][rows]})
    echo(f"2. {REQUESTS * PER_REQUEST} rows predicted in {REQUESTS} requests; labelling them")
    client.post_feedback(model, feedback)

    def labelled() -> Json | None:
        live = client.get_version(model, 1).get("live_metrics")
        return live if live and live["labelled"] == REQUESTS else None

    live = until("the serving log indexed and joined with the labels", labelled, every=2.0)
    echo(f"   v1's live metrics: rmse {live['rmse']:.3f} over {live['scored']} labelled rows")
    dv = client.create_dataset(dataset, model, holdout_fraction=0.25)
    dv = client.wait_dataset(dataset, int(dv["version"]), timeout=DEADLINE)
    if dv["state"] != "READY":
        raise LoopFailed(f"dataset {dataset} {dv['state']}: {dv.get('failure_message')}")
    echo(f"   dataset {dataset} v{dv['version']}: {dv['manifest']['rows']} rows")

    schedules = {
        f"{model}-good": _template(pkg, model, GOOD),
        f"{model}-bad": _template(pkg, model, WEAK),
    }
    ids = {
        name: client.create_schedule(name, "* * * * *", job, dataset=dataset)["id"]
        for name, job in schedules.items()
    }
    echo("3. two schedules every minute rebuild the dataset and retrain (well, badly), gated")
    load = Load(url, json.dumps({"instances": data["x"][:1]}).encode()).start()
    try:
        for name, sid in ids.items():  # one slot each: paused once it fired (its job starts)
            until(f"{name} fired", functools.partial(_fired, client, sid), 120)
            client.pause_schedule(sid)
        runs = {
            name: until(f"{name} started its job", functools.partial(_started, client, sid))
            for name, sid in ids.items()
        }
        jobs = {name: str(run["job_id"]) for name, run in runs.items()}
        for name, job_id in jobs.items():
            echo(f"   {name}: dataset v{runs[name]['dataset_version']}, job {job_id}")
            _succeeded(client, job_id)
        good, bad = (
            until(f"{name} evaluated", functools.partial(_evaluated, client, model, jobs[name]))
            for name in ids
        )
        winner = int(good["version"])
        for v in (good, bad):
            ev = v["evaluation"]
            why = f" ({ev['reason']})" if ev.get("reason") else ""
            echo(
                f"4. v{v['version']}: rmse {ev['candidate_score']:.3f} against the champion's "
                f"{ev['champion_score']:.3f} on {ev['holdout_rows']} holdout rows: "
                f"{ev['decision']}{why}"
            )
        labels = client.get_model(model)["labels"]
        if labels.get("default") == winner:
            until(
                f"the endpoint serving v{winner}",
                functools.partial(_serving, client, model, ep["id"], winner),
            )
            time.sleep(1.0)  # some answers from the winner under the load
    finally:
        answers = load.finish()
    history = client.model_history(model)["history"]
    return LoopResult(
        model=model,
        dataset=dataset,
        endpoint=ep["id"],
        first_job=first["id"],
        jobs=jobs,
        runs=runs,
        live=live,
        manifest=dv["manifest"],
        promoted=good,
        refused=bad,
        labels=labels,
        history=history,
        answers=answers,
    )


def _predict(url: str, body: Json) -> tuple[Json, str]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=60)
    try:
        conn.request("POST", parts.path, json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
    finally:
        conn.close()
    if r.status != 200:
        raise LoopFailed(f"predict answered {r.status}: {data[:300]!r}")
    return json.loads(data), r.getheader("X-Request-Id") or ""


def run_loop_demo(settings: Settings, echo: Callable[[str], None]) -> int:
    """Start the local platform, run the loop once with a new model, report, clean up."""
    from service.platform import LocalPlatform
    from service.runtime import ensure_runtime

    started = time.monotonic()
    python = ensure_runtime(settings, settings.default_runtime, echo=echo)
    model = f"loop-{secrets.token_hex(3)}"
    echo(f"starting the local platform (data in {settings.data_dir})...")
    with LocalPlatform(settings, quiet=True) as platform, StackMLClient(platform.url) as client:
        code = 1
        try:
            result = closed_loop(client, python, platform.url, echo, model)
            code = _report(result, echo)
        except (ClientError, LoopFailed) as e:
            echo(f"the loop failed: {describe_error(e) if isinstance(e, ClientError) else e}")
        finally:
            _clean_up(client, model, echo)
        echo("stopping the platform...")
    verdict = "succeeded" if code == 0 else "failed"
    echo(f"closed loop {verdict} in {time.monotonic() - started:.0f}s (model {model} is kept)")
    return code


def _report(r: LoopResult, echo: Callable[[str], None]) -> int:
    echo("5. the model's history (who moved which label, and why):")
    for h in r.history:
        echo(
            f"   {h['at']}  {h['kind']:<8} {h['from_version']} -> {h['to_version']}  "
            f"by {h['by']}: {h['why'][:100]}"
        )
    shown = ", ".join(f"v{v}: {n}" for v, n in sorted(r.versions.items()))
    echo(f"6. {len(r.answers)} predictions during the switch, {len(r.failed)} failed ({shown})")
    good = r.promoted["evaluation"]
    ok = (
        good["decision"] == "promoted"
        and r.refused["evaluation"]["decision"] == "refused"
        and r.labels.get("default") == int(r.promoted["version"])
        and not r.failed
    )
    echo(f"   default -> v{r.labels.get('default')}")
    return 0 if ok else 1


def _clean_up(client: StackMLClient, model: str, echo: Callable[[str], None]) -> None:
    """Schedules deleted, the endpoint undeployed and gone (its replicas are servers)."""
    for sch in client.list_schedules():
        if sch["name"] in (f"{model}-good", f"{model}-bad"):
            client.delete_schedule(sch["id"])
    if not any(m["name"] == model for m in client.list_models()):
        return  # the loop failed before the model existed
    for ep in client.list_endpoints(model):
        if ep["state"] in ("DELETED", "DELETING"):
            continue
        client.undeploy(model, ep["id"])
        try:
            until(
                f"endpoint {ep['id']} deleted",
                functools.partial(_deleted, client, model, ep["id"]),
                120,
            )
        except LoopFailed as e:
            echo(f"{e}; the reconciler goes on deleting it")


def _deleted(client: StackMLClient, model: str, endpoint: str) -> bool:
    return bool(client.get_endpoint(model, endpoint)["state"] == "DELETED")


def _fired(client: StackMLClient, sid: str) -> bool:
    return bool(client.schedule_runs(sid))
