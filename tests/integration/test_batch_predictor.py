"""The batch predictor (workers/vm/batch_predictor.py) as the runner runs it on a job's server:
``runner prepare`` + ``runner start`` under the TensorFlow runtime, reading real SavedModels
(tests/integration/savedmodels.py) and the inputs through signed URLs of the real store gateway
(service/api/store.py over HTTP, a LocalStore behind it), with the job.json the provision step
writes (workers/steps/batch.build).

- JSONL over two objects with bad rows: results in input order, equal to the SavedModel's own
  predictions on the same rows (computed by TensorFlow in another process); each bad row in its
  shard's errors object with its reason; the manifest says every shard is done.
- CSV with a header; TFRecord of tf.train.Example fed to a signature of serialized examples.
- The predictor SIGKILLed after some shards: the runner starts it again, it computes only the
  missing shards (the ledger: no shard computed twice), the output is complete and ordered.
- A manifest of another request under the output prefix stops the run.
- Several servers (job.json's `worker` k of `workers` W): the same job as W=2, two predictors
  on two homes over one output prefix at once, each computing only its shards (n % 2 == k) and
  writing its part manifest, never manifest.json; the parts merge (dom.merge_parts, as export
  does) into the manifest a W=1 run writes, with the same results and errors. A re-run of
  worker 1 computes nothing again, and after the merge (manifest.json, parts gone) only its
  shard whose results were deleted. W=3 over 2 shards: worker 2 owns none, fetches no model,
  writes its part and exits 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from werkzeug.serving import make_server

from service.api.store import create_gateway_app
from service.backends.storage.local import LocalStore
from service.config import Settings
from service.domain import batch as dom
from service.domain.spec import JobSpec
from tests.envutil import free_port
from tests.integration.test_model_server import expected, models, runtime_python  # noqa: F401
from workers.steps import batch

REPO = Path(__file__).resolve().parents[2]
VM = REPO / "workers" / "vm"
AREA = "projects/p/"
RUN_DEADLINE = 300.0
N = 20  # the linear model's input width


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LocalStore]:
    port = free_port()
    st = LocalStore(tmp_path / "store", f"http://127.0.0.1:{port}", b"k" * 32)
    server = make_server("127.0.0.1", port, create_gateway_app(Settings(), store=st), threaded=True)
    t = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    t.start()
    yield st
    server.shutdown()
    t.join(timeout=10)


def put_model(store: LocalStore, src: Path, prefix: str) -> dict[str, Any]:
    sums = {}
    for path in sorted(src.rglob("*")):
        if path.is_file():
            rel = path.relative_to(src).as_posix()
            data = path.read_bytes()
            store.put(prefix + rel, data)
            sums[rel] = {"size": len(data), "md5": hashlib.md5(data).hexdigest()}
    return sums


def server_home(tmp: Path, doc: dict[str, Any], name: str = "home") -> Path:
    """What provision leaves on a server: the runner, the batch files, job.json."""
    home = tmp / name
    (home / ".stackml" / "job").mkdir(parents=True)
    for src, dest in [
        (VM / "runner.py", "runner.py"),
        (VM / "batch_predictor.py", "batch_predictor.py"),
        (VM / "model_server.py", "model_server.py"),
        (REPO / "service" / "domain" / "batch.py", "batch_plan.py"),
    ]:
        shutil.copy(src, home / ".stackml" / dest)
    (home / ".stackml" / "job" / "job.json").write_text(json.dumps(doc))
    return home


def document(
    store: LocalStore,
    runtime: Path,
    artifact: str,
    sums: dict[str, Any],
    *,
    worker: int = 0,
    workers: int = 1,
    **pred: Any,
) -> dict[str, Any]:
    spec = JobSpec.model_validate(
        {
            "name": "b",
            "type": "batch_prediction",
            "prediction": {"model": "m", "version": 1, **pred},
        }
    )
    p = spec.predicting()
    request = {
        "model": "m",
        "version": 1,
        "artifact_uri": artifact,
        "format": p.format,
        "shard_rows": p.shard_rows,
        "input_uris": p.input_uris,
    }
    return batch.build(
        store,
        3600,
        job_id="job-test",
        project_id="p",
        runtime=str(runtime),
        spec=spec,
        request=request,
        artifact=artifact,
        checksums=sums,
        worker=worker,
        workers=workers,
    )


def runner(home: Path, py: Path, cmd: str) -> dict[str, Any]:
    r = subprocess.run(
        [str(py), str(home / ".stackml" / "runner.py"), cmd, str(home / ".stackml" / "job")],
        capture_output=True,
        text=True,
        timeout=120,
        env={"HOME": str(home), "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def wait_exit(job: Path, deadline: float = RUN_DEADLINE) -> int:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if (job / "exit_code").exists():
            return int((job / "exit_code").read_text().strip())
        time.sleep(0.05)
    log = (job / "log").read_text(errors="replace") if (job / "log").exists() else ""
    pytest.fail(f"the batch predictor did not finish within {deadline}s: {log[-3000:]}")


def run_job(home: Path, runtime_py: Path) -> tuple[int, str]:
    runner(home, runtime_py, "prepare")
    runner(home, runtime_py, "start")
    job = home / ".stackml" / "job"
    code = wait_exit(job)
    return code, (job / "log").read_text(errors="replace")


def read_output(store: LocalStore, prefix: str) -> tuple[dict, list[dict], list[dict]]:
    manifest = json.loads(store.get(prefix + dom.MANIFEST))
    results: list[dict] = []
    errors: list[dict] = []
    for sh in manifest["shards"]:
        results += [json.loads(x) for x in store.get(prefix + sh["results"]).splitlines()]
        errors += [json.loads(x) for x in store.get(prefix + sh["errors"]).splitlines()]
    return manifest, results, errors


def direct(runtime_py: Path, model_dir: Path, rows: list[list[float]]) -> list[Any]:
    """The SavedModel's own answers, TensorFlow in another process."""
    code = (
        "import json,sys,tensorflow as tf\n"
        "fn=tf.saved_model.load(sys.argv[1]).signatures['serving_default']\n"
        "rows=json.load(sys.stdin)\n"
        "print(json.dumps(fn(x=tf.constant(rows,dtype=tf.float32))['y'].numpy().tolist()))\n"
    )
    r = subprocess.run(
        [str(runtime_py), "-c", code, str(model_dir)],
        input=json.dumps(rows),
        capture_output=True,
        text=True,
        timeout=300,
        env={"TF_CPP_MIN_LOG_LEVEL": "2", "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return list(json.loads(r.stdout.strip().splitlines()[-1]))


def close(got: Any, want: Any, tol: float = 1e-4) -> None:
    if isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            close(g, w, tol)
    else:
        assert abs(got - want) <= tol * max(1.0, abs(want)), (got, want)


def linear_rows(n: int, seed: int = 5) -> list[list[float]]:
    import random

    rnd = random.Random(seed)
    return [[round(rnd.uniform(-1, 1), 4) for _ in range(N)] for _ in range(n)]


# -- tests --------------------------------------------------------------------------------------


def test_jsonl_with_bad_rows_in_order_equal_to_the_savedmodel(
    store: LocalStore,
    models: Path,  # noqa: F811
    runtime_python: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    sums = put_model(store, models / "linear" / "1", AREA + "models/lin/1/")
    rows = linear_rows(120)
    lines = [json.dumps(r) for r in rows]
    bad = {
        7: ("not json{", "not JSON"),
        50: (json.dumps([1.0, 2.0, 3.0]), "shape"),
        51: (json.dumps("text"), "JSON list or object"),
        99: (json.dumps(["a"] * N), "non-numeric"),
    }
    for i, (line, _) in bad.items():
        lines[i] = line
    store.put(AREA + "data/in/a.jsonl", ("\n".join(lines[:70]) + "\n").encode())
    store.put(AREA + "data/in/b.jsonl", ("\n\n".join(lines[70:]) + "\n").encode())  # blank lines
    out = AREA + "predictions/run1/"
    doc = document(
        store,
        runtime_python.parent.parent,
        f"local://{AREA}models/lin/1/",
        sums,
        input_uris=[f"local://{AREA}data/in/"],
        format="jsonl",
        output_prefix=f"local://{out}",
        batch_size=8,
        shard_rows=25,
    )
    code, log = run_job(server_home(tmp_path, doc), runtime_python)
    assert code == 0, log
    manifest, results, errors = read_output(store, out)
    assert [s["results"] for s in manifest["shards"]] == [
        f"prediction.results-{i:05d}-of-00005" for i in range(5)
    ]
    assert all(s["done"] for s in manifest["shards"])
    assert dom.read_manifest(manifest).rows == 120 and dom.read_manifest(manifest).errors == 4
    good = [i for i in range(120) if i not in bad]
    assert [r["index"] for r in results] == good  # input order, across objects and shards
    want = direct(runtime_python, models / "linear" / "1", [rows[i] for i in good])
    close([r["prediction"] for r in results], want)
    assert [e["index"] for e in errors] == sorted(bad)
    for e in errors:
        line, why = bad[e["index"]]
        assert e["row"] == line and why in e["reason"], e
    assert "batch: done: 120 rows, 4 failed, 5 shard(s)" in log


def test_csv_with_a_header_and_tfrecord_examples(
    store: LocalStore,
    models: Path,  # noqa: F811
    expected: dict,  # noqa: F811
    runtime_python: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    sums = put_model(store, models / "linear" / "1", AREA + "models/lin/1/")
    rows = linear_rows(30, seed=8)
    text = ",".join(f"x{i}" for i in range(N)) + "\n"
    text += "".join(",".join(map(str, r)) + "\n" for r in rows[:10])
    text += "1,2,oops\n"  # row 10: not a number
    text += "".join(",".join(map(str, r)) + "\n" for r in rows[10:])
    store.put(AREA + "data/rows.csv", text.encode())
    doc = document(
        store,
        runtime_python.parent.parent,
        f"local://{AREA}models/lin/1/",
        sums,
        input_uris=[f"local://{AREA}data/rows.csv"],
        format="csv",
        output_prefix=f"local://{AREA}predictions/csv/",
        shard_rows=16,
    )
    code, log = run_job(server_home(tmp_path, doc, "csv"), runtime_python)
    assert code == 0, log
    _, results, errors = read_output(store, AREA + "predictions/csv/")
    assert [r["index"] for r in results] == [i for i in range(31) if i != 10]
    close([r["prediction"] for r in results], direct(runtime_python, models / "linear/1", rows))
    assert [(e["index"], e["row"]) for e in errors] == [(10, "1,2,oops")]
    assert "not a number" in errors[0]["reason"]

    # TFRecord: tf.train.Example records (written by TensorFlow) to a signature that takes
    # serialized examples; one record is not an Example
    feats = expected["examples"]["features"]
    write = (
        "import json,sys,tensorflow as tf\n"
        "feats=json.loads(sys.argv[2])\n"
        "with tf.io.TFRecordWriter(sys.argv[1]) as w:\n"
        "  for f in feats:\n"
        "    w.write(tf.train.Example(features=tf.train.Features(feature={k:tf.train.Feature("
        "float_list=tf.train.FloatList(value=[v])) for k,v in f.items()})).SerializeToString())\n"
        "  w.write(b'\\xff\\xfenot an example')\n"
    )
    rec = tmp_path / "ex.tfrecord"
    r = subprocess.run(
        [str(runtime_python), "-c", write, str(rec), json.dumps(feats)],
        capture_output=True,
        text=True,
        timeout=300,
        env={"TF_CPP_MIN_LOG_LEVEL": "2", "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    store.put(AREA + "data/ex.tfrecord", rec.read_bytes())
    sums = put_model(store, models / "examples" / "1", AREA + "models/ex/1/")
    doc = document(
        store,
        runtime_python.parent.parent,
        f"local://{AREA}models/ex/1/",
        sums,
        input_uris=[f"local://{AREA}data/ex.tfrecord"],
        output_prefix=f"local://{AREA}predictions/tfr/",
    )
    assert doc["format"] == "tfrecord"  # from the extension
    code, log = run_job(server_home(tmp_path, doc, "tfr"), runtime_python)
    assert code == 0, log
    _, results, errors = read_output(store, AREA + "predictions/tfr/")
    assert [r["index"] for r in results] == [0, 1]
    close([r["prediction"]["scores"] for r in results], expected["examples"]["scores"])
    assert [e["index"] for e in errors] == [2]


def _ledger(job: Path) -> list[list[str]]:
    """The ledger's runs: each a list of its lines after "run"."""
    runs: list[list[str]] = []
    for line in (job / "batch-ledger").read_text().splitlines():
        if line == "run":
            runs.append([])
        else:
            runs[-1].append(line)
    return runs


def test_a_predictor_killed_mid_run_is_restarted_and_computes_only_missing_shards(
    store: LocalStore,
    models: Path,  # noqa: F811
    runtime_python: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    sums = put_model(store, models / "linear" / "1", AREA + "models/lin/1/")
    rows = linear_rows(600, seed=3)
    store.put(AREA + "data/big.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    out = AREA + "predictions/killed/"
    doc = document(
        store,
        runtime_python.parent.parent,
        f"local://{AREA}models/lin/1/",
        sums,
        input_uris=[f"local://{AREA}data/big.jsonl"],
        output_prefix=f"local://{out}",
        batch_size=1,
        shard_rows=50,
    )
    home = server_home(tmp_path, doc)
    job = home / ".stackml" / "job"
    runner(home, runtime_python, "prepare")
    runner(home, runtime_python, "start")
    # kill the predictor (not the runner's supervisor) once it has computed some shards
    end = time.monotonic() + RUN_DEADLINE
    while time.monotonic() < end:
        ledger = job / "batch-ledger"
        if ledger.exists() and ledger.read_text().count("computed ") >= 3:
            break
        assert not (job / "exit_code").exists(), (job / "log").read_text()
        time.sleep(0.005)
    pid = int((job / "pid").read_text())
    os.killpg(pid, signal.SIGKILL)
    code = wait_exit(job)
    log = (job / "log").read_text()
    assert code == 0, log
    assert "killed by signal 9" in log and "restarting the batch predictor" in log
    first, second = _ledger(job)[:2]
    computed = [int(x.split()[1]) for run in (first, second) for x in run if x[:8] == "computed"]
    assert len(computed) == len(set(computed)), computed  # no shard computed twice
    done_before = {int(x.split()[1]) for x in first if x.startswith("computed")}
    found = {int(x.split()[1]) for x in second if x.startswith("found")}
    assert len(done_before) >= 3
    assert done_before <= found  # what was in the store was not computed again
    assert set(computed) | found == set(range(12))
    manifest, results, errors = read_output(store, out)
    assert all(s["done"] for s in manifest["shards"]) and errors == []
    assert [r["index"] for r in results] == list(range(600))
    close([r["prediction"] for r in results], direct(runtime_python, models / "linear/1", rows))

    # a re-run of the same request (another server: nothing local) computes only what is
    # missing: here one shard whose results were deleted although the manifest says done
    store.delete(out + manifest["shards"][5]["results"])
    rerun = server_home(tmp_path, doc, "rerun")
    r = subprocess.run(
        [
            str(runtime_python),
            str(rerun / ".stackml" / "batch_predictor.py"),
            str(rerun / ".stackml" / "job"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HOME": str(rerun), "PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (again,) = _ledger(rerun / ".stackml" / "job")
    assert sorted(again) == sorted(
        [*(f"found {n}" for n in range(12) if n != 5), "start 5", "computed 5"]
    )
    assert read_output(store, out)[1] == results

    # the same prefix with another request (shard_rows) is another run's: refused
    doc["request"] = {**doc["request"], "shard_rows": 60}
    doc["shard_rows"] = 60
    other = server_home(tmp_path, doc, "other")
    r = subprocess.run(
        [
            str(runtime_python),
            str(other / ".stackml" / "batch_predictor.py"),
            str(other / ".stackml" / "job"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={"HOME": str(other), "PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert r.returncode == 3 and "manifest of another run" in r.stderr, r.stderr[-2000:]


# -- several servers ------------------------------------------------------------------------------


def predictor(home: Path, py: Path) -> subprocess.Popen[str]:
    """The predictor run directly (a server of its own: `home`), as the runner runs it."""
    return subprocess.Popen(
        [str(py), str(home / ".stackml" / "batch_predictor.py"), str(home / ".stackml" / "job")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={"HOME": str(home), "PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "2"},
    )


def finished(*procs: subprocess.Popen[str]) -> list[str]:
    """Each predictor's stdout once all exited 0."""
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=RUN_DEADLINE)
        assert proc.returncode == 0, (out[-2000:], err[-3000:])
        outs.append(out)
    return outs


def parts(store: LocalStore, out: str, workers: int) -> dict[int, object]:
    return {
        k: json.loads(store.get(out + dom.part_manifest_name(k, workers))) for k in range(workers)
    }


def test_two_servers_compute_the_shards_one_server_computes(
    store: LocalStore,
    models: Path,  # noqa: F811
    runtime_python: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    sums = put_model(store, models / "linear" / "1", AREA + "models/lin/1/")
    rows = linear_rows(130, seed=11)
    lines = [json.dumps(r) for r in rows]
    lines[3], lines[101] = "not json{", json.dumps([1.0, 2.0])  # shards 0 and 4
    store.put(AREA + "data/w/a.jsonl", ("\n".join(lines[:70]) + "\n").encode())
    store.put(AREA + "data/w/b.jsonl", ("\n".join(lines[70:]) + "\n").encode())

    def doc_for(out: str, worker: int, workers: int) -> dict[str, Any]:
        return document(
            store,
            runtime_python.parent.parent,
            f"local://{AREA}models/lin/1/",
            sums,
            worker=worker,
            workers=workers,
            input_uris=[f"local://{AREA}data/w/"],
            format="jsonl",
            output_prefix=f"local://{out}",
            batch_size=8,
            shard_rows=25,
            max_workers=workers,
        )

    # one server
    one = AREA + "predictions/one/"
    finished(predictor(server_home(tmp_path, doc_for(one, 0, 1), "one"), runtime_python))
    manifest1, results1, errors1 = read_output(store, one)
    assert len(manifest1["shards"]) == 6  # 70 rows: 3 shards, 60 rows: 3 shards
    assert not any(dom.is_part_name(o.key[len(one) :]) for o in store.list(one))

    # two servers over one prefix at once
    two = AREA + "predictions/two/"
    homes = [server_home(tmp_path, doc_for(two, k, 2), f"two-{k}") for k in range(2)]
    logs = finished(*(predictor(h, runtime_python) for h in homes))
    for k, (home, log) in enumerate(zip(homes, logs, strict=True)):
        (ledger,) = _ledger(home / ".stackml" / "job")
        assert ledger == [x for n in range(k, 6, 2) for x in (f"start {n}", f"computed {n}")]
        assert f"batch worker {k}/2: done: " in log and "batch: " not in log, log
    with pytest.raises(KeyError):
        store.get(two + dom.MANIFEST)  # only the export writes it
    mine = parts(store, two, 2)
    for k, part in mine.items():
        assert [sh["done"] for sh in part["shards"]] == [n % 2 == k for n in range(6)]  # type: ignore[index]
    merged = dom.merge_parts(mine, 2)
    assert merged == manifest1  # the same run: fingerprint, shards, counts
    s = dom.read_manifest(merged)
    assert (s.shards, s.done, s.rows, s.errors) == (6, 6, 130, 2)
    # the same shards' objects as one server's, row for row
    results2: list[dict] = []
    errors2: list[dict] = []
    for sh in merged["shards"]:
        results2 += [json.loads(x) for x in store.get(two + sh["results"]).splitlines()]
        errors2 += [json.loads(x) for x in store.get(two + sh["errors"]).splitlines()]
    assert [r["index"] for r in results2] == [r["index"] for r in results1]
    assert [i for i in range(130) if i not in (3, 101)] == [r["index"] for r in results2]
    close([r["prediction"] for r in results2], [r["prediction"] for r in results1], 1e-6)
    assert errors2 == errors1 and [e["index"] for e in errors2] == [3, 101]

    # worker 1 again (another server: nothing local), its part written: nothing to compute
    again = server_home(tmp_path, doc_for(two, 1, 2), "again")
    (log,) = finished(predictor(again, runtime_python))
    (ledger,) = _ledger(again / ".stackml" / "job")
    assert ledger == ["found 1", "found 3", "found 5"]
    assert "model loaded" not in log and not (again / ".stackml" / "job" / "model").exists()
    assert parts(store, two, 2) == mine

    # the export merged the parts into manifest.json and deleted them; a shard's results are
    # lost since: a re-run of worker 1 resumes from manifest.json and computes only that one
    store.put(two + dom.MANIFEST, json.dumps(merged).encode())
    for k in range(2):
        store.delete(two + dom.part_manifest_name(k, 2))
    store.delete(two + merged["shards"][3]["results"])
    rerun = server_home(tmp_path, doc_for(two, 1, 2), "rerun")
    finished(predictor(rerun, runtime_python))
    (ledger,) = _ledger(rerun / ".stackml" / "job")
    assert sorted(ledger) == ["computed 3", "found 1", "found 5", "start 3"]
    part1 = json.loads(store.get(two + dom.part_manifest_name(1, 2)))
    assert [sh["done"] for sh in part1["shards"]] == [False, True, False, True, False, True]
    with pytest.raises(KeyError):
        store.get(two + dom.part_manifest_name(0, 2))  # worker 0's is not rewritten by worker 1
    assert json.loads(store.get(two + dom.MANIFEST)) == merged  # nor is manifest.json


def test_a_worker_that_owns_no_shard_writes_its_part_and_exits(
    store: LocalStore,
    models: Path,  # noqa: F811
    runtime_python: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    sums = put_model(store, models / "linear" / "1", AREA + "models/lin/1/")
    rows = linear_rows(30, seed=2)
    store.put(AREA + "data/few.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    out = AREA + "predictions/few/"

    def doc_for(worker: int, workers: int = 3) -> dict[str, Any]:
        return document(
            store,
            runtime_python.parent.parent,
            f"local://{AREA}models/lin/1/",
            sums,
            worker=worker,
            workers=workers,
            input_uris=[f"local://{AREA}data/few.jsonl"],
            output_prefix=f"local://{out}",
            shard_rows=20,  # 2 shards over 3 workers
            max_workers=workers,
        )

    idle = server_home(tmp_path, doc_for(2), "idle")
    (log,) = finished(predictor(idle, runtime_python))
    job = idle / ".stackml" / "job"
    assert _ledger(job) == [[]]
    assert not (job / "model").exists() and "model loaded" not in log
    assert "batch worker 2/3: 30 rows in 1 input(s), 2 shard(s), 0 of them this worker's" in log
    assert "batch worker 2/3: done: 0 rows, 0 failed, 0 of 2 shard(s)" in log
    part = json.loads(store.get(out + dom.part_manifest_name(2, 3)))
    assert dom.read_manifest(part).shards == 2 and dom.read_manifest(part).done == 0
    assert [o.key[len(out) :] for o in store.list(out)] == [dom.part_manifest_name(2, 3)]

    # the two others compute a shard each; the three parts merge into a complete manifest
    finished(
        *(predictor(server_home(tmp_path, doc_for(k), f"w{k}"), runtime_python) for k in (0, 1))
    )
    s = dom.read_manifest(dom.merge_parts(parts(store, out, 3), 3))
    assert (s.shards, s.done, s.rows, s.errors) == (2, 2, 30, 0)

    # a job.json naming a worker the job does not have is refused before anything is fetched
    bad = server_home(tmp_path, {**doc_for(0), "worker": 3}, "bad")
    proc = predictor(bad, runtime_python)
    out_text, err = proc.communicate(timeout=120)
    assert proc.returncode == 3 and "worker is not an integer in 0..2" in err, err
