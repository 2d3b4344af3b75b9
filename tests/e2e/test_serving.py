"""Serving, end to end on the real platform (API, worker, sandboxes over SSH, TensorFlow):
train the example twice, register both models, deploy 2 replicas, predict through the API and
compare with the SavedModels loaded directly; kill a replica's server under a steady load (no
failed request, the replica replaced); switch the default label to the second version under a
steady load (no failed request, every answer names its version and matches that version's
SavedModel); delete the endpoint: no server, veth, netns or process left."""

from __future__ import annotations

import json
import math
import os
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from service.backends.compute.sandbox import SandboxBackend, _root_tag, leak_report
from service.client import StackMLClient
from service.config import REPO_ROOT, Settings
from service.platform import LocalPlatform
from tests.e2e.conftest import wait_state

EXAMPLE = REPO_ROOT / "examples" / "keras_regression"
TF_ENV = {"TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "2", "PATH": "/usr/bin:/bin"}
TOLERANCE = 1e-4
MODEL = "regress"
SERVE_MODELS = ".stackml/serve/models"  # where a replica's runner puts the versions (serve.py)


def model_servers_of(sandbox_dir: Path) -> list[str]:
    """Model servers still running in sandboxes of this root, found by their cgroup (named
    `<root tag>-<sandbox id>`; a job's process cannot leave it), not other roots' (the cloud
    tier may run beside this one)."""
    tag = _root_tag(Path(os.path.realpath(sandbox_dir)))
    found = subprocess.run(
        ["pgrep", "-af", f"model_base_path={SERVE_MODELS}"], capture_output=True, text=True
    ).stdout.splitlines()
    ours = []
    for line in found:
        try:
            cgroup = Path(f"/proc/{line.split()[0]}/cgroup").read_text()
        except OSError:
            continue  # it exited
        if f"/{tag}-" in cgroup:
            ours.append(line)
    return ours


def rows(width: int) -> list[list[float]]:
    """predict.py's three rows: linspace(-1, 1, 3 * width) reshaped to (3, width)."""
    n = 3 * width
    flat = [-1.0 + 2.0 * i / (n - 1) for i in range(n)]
    return [flat[i * width : (i + 1) * width] for i in range(3)]


def direct_predictions(runtime_python: Path, model_dir: Path) -> list[float]:
    out = subprocess.run(
        [str(runtime_python), str(EXAMPLE / "predict.py"), str(model_dir)],
        capture_output=True,
        text=True,
        timeout=300,
        env=TF_ENV,
    )
    assert out.returncode == 0, out.stderr
    preds = json.loads(out.stdout.strip().splitlines()[-1])["predictions"]
    return [float(p[0]) for p in preds]


def until(what: str, check: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f}s"
        time.sleep(every)


@dataclass
class Load:
    """A steady loop of predict requests through the API, in a thread, until stopped."""

    url: str
    body: dict[str, Any]
    answers: list[tuple[int, str | None, Any]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> Load:
        def loop() -> None:
            with requests.Session() as http:
                while not self.stop.is_set():
                    try:
                        r = http.post(self.url, json=self.body, timeout=60)
                        body = r.json() if r.content else None
                        self.answers.append((r.status_code, r.headers.get("X-Model-Version"), body))
                    except (requests.RequestException, ValueError) as e:
                        self.answers.append((0, None, repr(e)))
                    time.sleep(0.02)

        self.thread = threading.Thread(target=loop, daemon=True)
        self.thread.start()
        return self

    def finish(self) -> list[tuple[int, str | None, Any]]:
        self.stop.set()
        assert self.thread is not None
        self.thread.join(timeout=90)
        assert not self.thread.is_alive(), "the load loop did not stop"
        return self.answers


def assert_all_ok(answers: list[tuple[int, str | None, Any]], expected: dict[str, list[float]]):
    failed = [a for a in answers if a[0] != 200]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed, e.g. {failed[:3]}"
    for _status, version, body in answers:
        assert version in expected, f"an answer names version {version!r}"
        got = [float(p[0]) for p in body["predictions"]]
        want = expected[version]
        assert all(math.isclose(g, w, abs_tol=TOLERANCE) for g, w in zip(got, want, strict=True)), (
            f"version {version} answered {got}, its SavedModel predicts {want}"
        )


def exercise(
    api: Callable[..., Any],
    base_url: str,
    settings: Settings,
    model: str,
    body: dict[str, Any],
    expected: dict[str, list[float]],
) -> None:
    """Versions 1 and 2 of `model` are READY and `default` points at 1: deploy 2 replicas,
    predict, kill a replica under load, switch default to 2 under load, delete."""
    # deploy 2 replicas following the default label
    ep = api("POST", f"/v1/models/{model}/endpoints", json={"replicas": 2, "label": "default"})
    path = f"/v1/models/{model}/endpoints/{ep['id']}"

    def settled(version: int) -> dict[str, Any] | None:
        e = api("GET", path)
        assert e["state"] != "FAILED", e
        ready = [s for s in e["servers"] if s["replica_state"] == "ready"]
        ok = (
            e["state"] == "READY"
            and e["serving_version"] == version
            and len(e["servers"]) == 2
            and len(ready) == 2
            and all(s["version"] == version for s in ready)
        )
        return e if ok else None

    first = until("2 ready replicas of version 1", lambda: settled(1), 600)
    predict_url = f"{base_url}/v1/models/{model}:predict"
    r = requests.post(predict_url, json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["X-Model-Version"] == "1" and r.headers.get("X-Request-Id")
    assert_all_ok([(200, "1", r.json())], {"1": expected["1"]})

    # kill one replica's server under a steady load: no request fails, the replica is replaced
    backend = SandboxBackend(settings.sandbox_dir, settings.flavors())
    victim = first["servers"][0]["server_id"]
    load = Load(predict_url, body).start()
    until("some answers before the kill", lambda: len(load.answers) >= 5, 60, 0.1)
    backend.delete_server(victim)
    replaced = until(
        "the killed replica replaced",
        lambda: (e := settled(1)) and victim not in {s["server_id"] for s in e["servers"]} and e,
        600,
    )
    answers = load.finish()
    assert len(answers) >= 10
    assert_all_ok(answers, {"1": expected["1"]})
    assert len({s["server_id"] for s in replaced["servers"]}) == 2

    # switch the default label to version 2 under a steady load: zero failed requests, every
    # answer names the version that produced it and matches that version's SavedModel
    load = Load(predict_url, body).start()
    until("some answers before the switch", lambda: len(load.answers) >= 5, 60, 0.1)
    api("PUT", f"/v1/models/{model}/labels/default", json={"version": 2, "why": "e2e switch"})
    until("2 ready replicas of version 2", lambda: settled(2), 600)
    until("answers after the switch", lambda: load.answers[-1][1] == "2", 60, 0.1)
    answers = load.finish()
    assert_all_ok(answers, expected)
    versions = [a[1] for a in answers]
    assert versions[0] == "1" and versions[-1] == "2"
    # once version 2 answered, version 1 never did again (the switch is one way)
    assert "1" not in versions[versions.index("2") :]

    # delete: every replica drained and deleted, nothing left behind
    api("DELETE", path)
    until("endpoint DELETED", lambda: api("GET", path)["state"] == "DELETED", 300)
    assert api("GET", path)["servers"] == []
    assert backend.list_servers(("stackml-endpoint", ep["id"])) == []
    assert leak_report(settings.sandbox_dir) == []
    left = model_servers_of(settings.sandbox_dir)
    assert not left, f"model servers still run: {left}"
    dead = requests.post(predict_url, json=body, timeout=60)
    # the model has no endpoint any more (404 no_endpoint; 503 no_replica is for an endpoint
    # whose replicas are not ready)
    assert dead.status_code == 404 and dead.json()["error"]["code"] == "no_endpoint"


def train(client: StackMLClient, epochs: int) -> str:
    pkg = client.stage_package(EXAMPLE)
    job = client.create_job(
        {
            "name": f"e2e-serve-{epochs}",
            "trainer": {"package_uri": pkg["package_uri"], "module": "trainer.task"},
            "hyperparameters": {"epochs": epochs},
            "env": {"TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "2"},
            "max_runtime_seconds": 600,
        }
    )
    return str(job["id"])


def test_deploy_predict_replace_switch_delete(
    client: StackMLClient,
    e2e_settings: Settings,
    runtime_python: Path,
    platform: LocalPlatform,
) -> None:
    api = client._json  # the generic JSON call, for routes the client has no method for
    jobs = [train(client, 2), train(client, 1)]
    done = [wait_state(client, j, {"SUCCEEDED", "FAILED"}, timeout=900) for j in jobs]
    assert all(d["state"] == "SUCCEEDED" for d in done), [d["failure"] for d in done]
    dirs = [e2e_settings.store_dir / d["output"]["model_uri"].split("://", 1)[1] for d in done]
    direct = {str(i + 1): direct_predictions(runtime_python, d) for i, d in enumerate(dirs)}
    assert direct["1"] != direct["2"]  # two different models: answers tell them apart

    # register both (the registry's API): versions 1 and 2, READY once checked
    api("POST", "/v1/models", json={"name": MODEL, "description": "e2e serving"})
    for j in jobs:
        api("POST", f"/v1/models/{MODEL}/versions", json={"job_id": j})
    for v in (1, 2):

        def ready(v: int = v) -> bool:
            return bool(api("GET", f"/v1/models/{MODEL}/versions/{v}")["state"] == "READY")

        until(f"version {v} READY", ready, 120)
    sig = api("GET", f"/v1/models/{MODEL}/versions/1")["signature"]
    ((_, spec),) = sig["inputs"].items()
    width = int(spec["shape"][-1])
    body = {"instances": rows(width)}
    api("PUT", f"/v1/models/{MODEL}/labels/default", json={"version": 1, "why": "e2e"})

    exercise(api, platform.url, e2e_settings, MODEL, body, direct)


TINY = """
import sys
import tensorflow as tf


class Tiny(tf.Module):
    def __init__(self, scale):
        self.w = tf.Variable(tf.constant([[1.0], [2.0], [3.0]]) * scale)

    @tf.function(input_signature=[tf.TensorSpec([None, 3], tf.float32, name="x")])
    def serve(self, x):
        return {"y": tf.matmul(x, self.w)}


m = Tiny(float(sys.argv[2]))
tf.saved_model.save(m, sys.argv[1], signatures={"serving_default": m.serve})
"""


def seed_tiny_model(
    settings: Settings, runtime_python: Path, tmp: Path, name: str, scales: list[float]
) -> None:
    """A model whose versions compute x·[1,2,3]·scale, stored and recorded READY directly (no
    registry worker: this test is about the replicas)."""
    import hashlib

    from service.db.models import Model, ModelLabel, ModelVersion
    from service.db.session import session_scope

    script = tmp / "tiny.py"
    script.write_text(TINY)
    project = settings.local_project
    with session_scope(settings.db_url) as s:
        s.add(Model(id=f"mdl-{name[:12]}", project_id=project, name=name, created_by="e2e"))
        s.flush()
        for i, scale in enumerate(scales, start=1):
            key = f"projects/{project}/models/{name}-v{i}/"
            out = settings.store_dir / key
            run = subprocess.run(
                [str(runtime_python), str(script), str(out), str(scale)],
                capture_output=True,
                text=True,
                timeout=300,
                env=TF_ENV,
            )
            assert run.returncode == 0, run.stderr
            sums = {
                str(f.relative_to(out)): {
                    "size": f.stat().st_size,
                    "md5": hashlib.md5(f.read_bytes()).hexdigest(),  # the store's etag
                }
                for f in sorted(out.rglob("*"))
                if f.is_file()
            }
            s.add(
                ModelVersion(
                    model_id=f"mdl-{name[:12]}",
                    version=i,
                    state="READY",
                    artifact_uri=f"local://{key}",
                    checksums=sums,
                    signature={
                        "method_name": "tensorflow/serving/predict",
                        "inputs": {"x": {"dtype": "DT_FLOAT", "shape": [-1, 3]}},
                        "outputs": {"y": {"dtype": "DT_FLOAT", "shape": [-1, 1]}},
                    },
                    created_by="e2e",
                )
            )
        s.add(ModelLabel(model_id=f"mdl-{name[:12]}", name="default", version=1))


def test_replicas_of_a_recorded_version_serve_scale_and_go(
    client: StackMLClient,
    e2e_settings: Settings,
    runtime_python: Path,
    platform: LocalPlatform,
    tmp_path: Path,
) -> None:
    """The replica machinery alone, fast: a tiny SavedModel recorded READY, 1 replica, scale
    to 2 and back to 1, then delete."""
    api = client._json
    seed_tiny_model(e2e_settings, runtime_python, tmp_path, "tiny", [1.0])
    ep = api("POST", "/v1/models/tiny/endpoints", json={"replicas": 1})
    path = f"/v1/models/tiny/endpoints/{ep['id']}"

    def ready(n: int) -> dict[str, Any] | None:
        e = api("GET", path)
        assert e["state"] != "FAILED", e
        ok = e["state"] == "READY" and len(e["servers"]) == n
        ok = ok and all(s["replica_state"] == "ready" for s in e["servers"])
        return e if ok else None

    until("1 ready replica", lambda: ready(1), 300)
    url = f"{platform.url}/v1/models/tiny:predict"
    r = requests.post(url, json={"instances": [[1.0, 1.0, 1.0], [0.0, 0.0, 2.0]]}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json() == {"predictions": [[6.0], [6.0]]}
    assert r.headers["X-Model-Version"] == "1"
    api("PATCH", path, json={"replicas": 2})
    until("2 ready replicas", lambda: ready(2), 300)
    api("PATCH", path, json={"replicas": 1})
    until("back to 1 replica", lambda: ready(1), 120)
    api("DELETE", path)
    until("endpoint DELETED", lambda: api("GET", path)["state"] == "DELETED", 120)
    backend = SandboxBackend(e2e_settings.sandbox_dir, e2e_settings.flavors())
    assert backend.list_servers(("stackml-endpoint", ep["id"])) == []
    assert leak_report(e2e_settings.sandbox_dir) == []


def test_recorded_versions_survive_a_killed_replica_and_switch_without_a_failed_request(
    client: StackMLClient,
    e2e_settings: Settings,
    runtime_python: Path,
    platform: LocalPlatform,
    tmp_path: Path,
) -> None:
    """The replica machinery of the proof on tiny recorded versions (y = x·[1,2,3]·scale,
    scale 1 and 2): two replicas, a kill under load, a switch under load, a delete."""
    seed_tiny_model(e2e_settings, runtime_python, tmp_path, "tiny2", [1.0, 2.0])
    body = {"instances": [[1.0, 1.0, 1.0], [0.0, 0.5, 2.0]]}
    expected = {"1": [6.0, 7.0], "2": [12.0, 14.0]}
    exercise(client._json, platform.url, e2e_settings, "tiny2", body, expected)


def test_a_version_that_cannot_load_fails_the_endpoint_with_its_reason(
    client: StackMLClient,
    e2e_settings: Settings,
    runtime_python: Path,
    platform: LocalPlatform,
    tmp_path: Path,
) -> None:
    """A version whose stored files do not match their recorded checksums: every replica fails
    to start, the version is given up after serving_max_failures replicas, the endpoint is
    FAILED with the reason, its failed replicas are deleted, and DELETE leaves nothing."""
    from sqlalchemy import update

    from service.db.models import ModelVersion
    from service.db.session import session_scope

    seed_tiny_model(e2e_settings, runtime_python, tmp_path, "broken", [1.0])
    with session_scope(e2e_settings.db_url) as s:
        mv = s.query(ModelVersion).filter_by(model_id="mdl-broken", version=1).one()
        sums = dict(mv.checksums)
        sums["saved_model.pb"] = {**sums["saved_model.pb"], "md5": "0" * 32}
        s.execute(update(ModelVersion).where(ModelVersion.id == mv.id).values(checksums=sums))
    api = client._json
    ep = api("POST", "/v1/models/broken/endpoints", json={"replicas": 1})
    path = f"/v1/models/broken/endpoints/{ep['id']}"
    failed = until(
        "endpoint FAILED", lambda: (e := api("GET", path))["state"] == "FAILED" and e, 300
    )
    assert "version 1: 3 replicas failed and none became ready" in failed["failure_message"]
    # and why, in the replica's own words (the runner refused the file whose md5 is wrong)
    assert "saved_model.pb: md5" in failed["failure_message"], failed["failure_message"]
    assert "0" * 32 in failed["failure_message"]
    until("failed replicas deleted", lambda: api("GET", path)["servers"] == [], 120)
    api("DELETE", path)
    until("endpoint DELETED", lambda: api("GET", path)["state"] == "DELETED", 120)
    backend = SandboxBackend(e2e_settings.sandbox_dir, e2e_settings.flavors())
    assert backend.list_servers(("stackml-endpoint", ep["id"])) == []


def test_a_traffic_split_runs_both_versions_and_each_caller_sticks_to_one(
    client: StackMLClient,
    e2e_settings: Settings,
    runtime_python: Path,
    platform: LocalPlatform,
    tmp_path: Path,
) -> None:
    """traffic {"1": 50, "2": 50} with 1 replica: one replica of each version; callers are
    split between them, each caller always to the same version, each answer from its version;
    dropping the split drains version 2's replica."""
    from service.api.predict import CALLER_HEADER

    seed_tiny_model(e2e_settings, runtime_python, tmp_path, "split", [1.0, 2.0])
    api = client._json
    ep = api(
        "POST", "/v1/models/split/endpoints", json={"replicas": 1, "traffic": {"1": 50, "2": 50}}
    )
    path = f"/v1/models/split/endpoints/{ep['id']}"

    def versions_ready() -> list[int] | None:
        e = api("GET", path)
        assert e["state"] != "FAILED", e
        got = sorted(s["version"] for s in e["servers"] if s["replica_state"] == "ready")
        return got if e["state"] == "READY" and got == [1, 2] else None

    until("one ready replica of each version", versions_ready, 300)
    body = {"instances": [[1.0, 1.0, 1.0]]}
    expected = {"1": [6.0], "2": [12.0]}
    url = f"{platform.url}/v1/models/split:predict"
    seen: dict[str, set[str]] = {}
    with requests.Session() as http:
        for caller in range(24):
            for _ in range(3):
                r = http.post(url, json=body, headers={CALLER_HEADER: f"c{caller}"}, timeout=60)
                assert r.status_code == 200, r.text
                version = r.headers["X-Model-Version"]
                assert_all_ok([(200, version, r.json())], expected)
                seen.setdefault(f"c{caller}", set()).add(version)
    assert all(len(v) == 1 for v in seen.values()), seen  # sticky per caller
    assert set().union(*seen.values()) == {"1", "2"}  # both versions serve
    api("PATCH", path, json={"traffic": None, "version": 1})

    def only_v1() -> bool:
        e = api("GET", path)
        return e["state"] == "READY" and [s["version"] for s in e["servers"]] == [1]

    until("version 2's replica drained and deleted", only_v1, 120)
    api("DELETE", path)
    until("endpoint DELETED", lambda: api("GET", path)["state"] == "DELETED", 120)
