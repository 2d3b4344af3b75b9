"""Hostile input everywhere a client can send it: each case is a clear 4xx in the one error
shape and changes nothing (rows and stored objects counted before and after); shell
metacharacters are data where the schema allows them, and reach the trainer only as argv
elements and environment values (proved by running the VM runner on this machine)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select

from service.backends.storage.local import LocalStore
from service.db.models import Job, JobEvent, JobLabel
from service.db.session import session_scope
from service.domain.spec import JobSpec

SHELL = [
    "; touch {canary}",
    "$(touch {canary})",
    "`touch {canary}`",
    "| touch {canary}",
    "&& touch {canary}",
    "> {canary}",
    "a b  c",
    "'single' \"double\"",
    "\\",
    "*",
    "~",
    "--flag=$HOME",
    "line\nbreak",
    "tab\there",
    "ünïcödé ✓",
]


def counts(db_url: str, store: LocalStore) -> tuple[int, int, int, int]:
    """Rows that any accepted request would add, and the objects in the store."""
    with session_scope(db_url) as s:
        rows = tuple(
            int(s.scalar(select(func.count()).select_from(m)) or 0)
            for m in (Job, JobEvent, JobLabel)
        )
    files = sum(len(f) for _, _, f in os.walk(store.root)) if store.root.exists() else 0
    return (*rows, files)


@pytest.fixture
def unchanged(db_url: str, store: LocalStore, package_uri: str) -> Any:
    """Call with a zero-argument function; asserts nothing was created by it."""

    def check(fn: Any) -> Any:
        before = counts(db_url, store)
        out = fn()
        assert counts(db_url, store) == before, "a refused request changed something"
        return out

    return check


def deep(levels: int) -> bytes:
    return b'{"name": "x", "labels": ' + b"[" * levels + b"]" * levels + b"}"


# -- POST /v1/jobs: bodies --------------------------------------------------------------------

RAW_CASES = [
    # (id, body bytes, content type, status, code)
    ("nested-10000", deep(10_000), "application/json", 400, "invalid_request"),
    ("nested-past-the-limit", deep(100_000), "application/json", 413, "payload_too_large"),
    ("nested-33", deep(33), "application/json", 400, "invalid_request"),
    ("bad-utf8", b'{"name": "\xff\xfe\xc3\x28"}', "application/json", 400, "invalid_request"),
    ("latin1", '{"name": "café"}'.encode("latin-1"), "application/json", 400, "invalid_request"),
    ("truncated", b'{"name": "x", "trainer": {', "application/json", 400, "invalid_request"),
    ("empty", b"", "application/json", 400, "invalid_request"),
    ("array", b"[1, 2, 3]", "application/json", 400, "invalid_request"),
    ("string", b'"job"', "application/json", 400, "invalid_request"),
    ("null", b"null", "application/json", 400, "invalid_request"),
    ("nan", b'{"name": "x", "max_runtime_seconds": NaN}', "application/json", 400, None),
    ("infinity", b'{"name": "x", "max_runtime_seconds": Infinity}', "application/json", 400, None),
    (
        "float-overflow",
        b'{"name": "x", "hyperparameters": {"lr": 1e999}}',
        "application/json",
        400,
        None,
    ),
    (
        "int-10e30",
        b'{"name": "x", "max_runtime_seconds": 1000000000000000000000000000000}',
        "application/json",
        400,
        None,
    ),
    (
        "int-5000-digits",
        b'{"name": "x", "hyperparameters": {"n": ' + b"9" * 5000 + b"}}",
        "application/json",
        400,
        None,
    ),
    ("duplicate-keys", b'{"name": "a", "name": "b"}', "application/json", 400, "invalid_request"),
    ("duplicate-nested", b'{"labels": {"k": "1", "k": "2"}}', "application/json", 400, None),
    ("lone-surrogate", b'{"name": "x", "labels": {"k": "\\ud800"}}', "application/json", 400, None),
    ("surrogate-key", b'{"name": "x", "env": {"\\udfff": "v"}}', "application/json", 400, None),
    ("text-plain", b'{"name": "x"}', "text/plain", 415, "unsupported_media_type"),
    ("form", b"name=x", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
    ("no-type", b'{"name": "x"}', "", 415, "unsupported_media_type"),
    ("xml", b"<job/>", "application/xml", 415, "unsupported_media_type"),
]


@pytest.mark.parametrize(
    ("body", "ctype", "status", "code"),
    [c[1:] for c in RAW_CASES],
    ids=[c[0] for c in RAW_CASES],
)
def test_malformed_bodies_are_4xx_and_create_nothing(
    client: FlaskClient, unchanged, error_of, body, ctype, status, code
) -> None:
    headers = {"Content-Type": ctype} if ctype else {}
    resp = unchanged(lambda: client.post("/v1/jobs", data=body, headers=headers))
    err = error_of(resp, status, code)
    assert len(err["message"]) < 500


def test_body_over_the_limit_is_413(client: FlaskClient, settings, unchanged, error_of) -> None:
    body = b'{"name": "x", "trainer": {"args": ["' + b"a" * settings.max_body_bytes + b'"]}}'
    resp = unchanged(
        lambda: client.post("/v1/jobs", data=body, headers={"Content-Type": "application/json"})
    )
    error_of(resp, 413, "payload_too_large")


def test_deep_json_is_refused_on_every_json_route(client: FlaskClient, unchanged, error_of):
    for path in ("/v1/jobs", "/v1/quotas/local"):
        resp = unchanged(
            lambda p=path: client.open(
                p,
                method="POST" if p == "/v1/jobs" else "PUT",
                data=deep(10_000),
                headers={"Content-Type": "application/json"},
            )
        )
        error_of(resp, 400, "invalid_request")


def _spec(package_uri: str, **over: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "ok",
        "trainer": {"package_uri": package_uri, "module": "trainer.task", "args": []},
    }
    for dotted, value in over.items():
        node = spec
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return spec


FIELD_CASES: list[tuple[str, dict[str, Any]]] = [
    ("name-shell", {"name": "a;rm -rf /"}),
    ("name-subst", {"name": "$(id)"}),
    ("name-dotdot", {"name": ".."}),
    ("name-path", {"name": "a/../b"}),
    ("name-nul", {"name": "a\x00b"}),
    ("name-newline", {"name": "a\nb"}),
    ("name-long", {"name": "a" * 10_000}),
    ("name-empty", {"name": ""}),
    ("name-number", {"name": 5}),
    ("module-shell", {"trainer__module": "os; rm -rf /"}),
    ("module-dotdot", {"trainer__module": "..trainer"}),
    ("module-long", {"trainer__module": "a" * 5000}),
    ("uri-dotdot", {"trainer__package_uri": "local://projects/local/../other/p.tar.gz"}),
    ("uri-dot", {"trainer__package_uri": "local://projects/local/./p.tar.gz"}),
    ("uri-nul", {"trainer__package_uri": "local://projects/local/p\x00.tar.gz"}),
    ("uri-scheme", {"trainer__package_uri": "file:///etc/passwd"}),
    ("uri-other-project", {"trainer__package_uri": "local://projects/other/p.tar.gz"}),
    ("uri-absolute", {"trainer__package_uri": "local:///etc/passwd"}),
    ("uri-long", {"trainer__package_uri": "local://projects/local/" + "a" * 5000}),
    ("data-dotdot", {"inputs__data_uri": "local://projects/local/data/../../x/"}),
    ("model-dotdot", {"output__model_uri": "local://projects/local/../../etc/"}),
    ("args-nul", {"trainer__args": ["a\x00b"]}),
    ("args-escape", {"trainer__args": ["\x1b[31mred"]}),
    ("args-long", {"trainer__args": ["a" * 5000]}),
    ("args-many", {"trainer__args": ["a"] * 300}),
    ("args-not-strings", {"trainer__args": [{"x": 1}]}),
    ("env-key-shell", {"env": {"A;B": "v"}}),
    ("env-key-space", {"env": {"A B": "v"}}),
    ("env-key-reserved", {"env": {"STACKML_JOB_ID": "x"}}),
    ("env-key-tfconfig", {"env": {"TF_CONFIG": "{}"}}),
    ("env-value-nul", {"env": {"A": "x\x00y"}}),
    ("env-value-long", {"env": {"A": "x" * 5000}}),
    ("env-value-object", {"env": {"A": {"nested": 1}}}),
    ("label-key-shell", {"labels": {"a;b": "v"}}),
    ("label-key-dotdot", {"labels": {"../x": "v"}}),
    ("label-value-nul", {"labels": {"k": "a\x00"}}),
    ("label-value-control", {"labels": {"k": "a\x07b"}}),
    ("label-value-long", {"labels": {"k": "v" * 300}}),
    ("labels-many", {"labels": {f"k{i}": "v" for i in range(100)}}),
    ("hp-key-shell", {"hyperparameters": {"lr;rm": 1}}),
    ("hp-nested", {"hyperparameters": {"lr": {"x": 1}}}),
    ("hp-value-nul", {"hyperparameters": {"opt": "a\x00"}}),
    ("runtime-version", {"runtime__version": "2.21; rm -rf /"}),
    ("runtime-framework", {"runtime__framework": "pytorch"}),
    ("flavor-shell", {"resources__flavor": "m1;reboot"}),
    ("gpus-negative", {"resources__gpus": -1}),
    ("gpus-huge", {"resources__gpus": 10**12}),
    ("workers-zero", {"resources__workers": 0}),
    ("runtime-seconds-huge", {"max_runtime_seconds": 10**15}),
    ("runtime-seconds-negative", {"max_runtime_seconds": -1}),
    ("type-bogus", {"type": "bitcoin_mining"}),
    ("extra-field", {"shell": "rm -rf /"}),
    ("extra-nested", {"trainer__command": "sh -c id"}),
]


@pytest.mark.parametrize("over", [c[1] for c in FIELD_CASES], ids=[c[0] for c in FIELD_CASES])
def test_hostile_fields_are_422_and_create_nothing(
    client: FlaskClient, package_uri: str, unchanged, error_of, over
) -> None:
    resp = unchanged(lambda: client.post("/v1/jobs", json=_spec(package_uri, **over)))
    err = error_of(resp, 422, None)
    assert err["code"] in ("validation_failed",)
    assert err["details"]["fields"], err
    # the refused values are not echoed back (they may be secrets, or terminal escapes)
    text = resp.get_data(as_text=True)
    assert "\\u0000" not in text and "\\u001b" not in text and "rm -rf" not in text


# -- what is data: shell metacharacters where the schema allows text ------------------------


def test_shell_metacharacters_are_accepted_as_data_verbatim(
    client: FlaskClient, package_uri: str, db_url: str, tmp_path: Path
) -> None:
    canary = tmp_path / "pwned"
    args = [a.format(canary=canary) for a in SHELL]
    body = _spec(
        package_uri,
        trainer__args=args,
        env={"SHELLY": "; touch " + str(canary), "QUOTES": "'\"`$"},
        labels={"team": "$(id) && `id` | x; y", "dots": "../../etc/passwd"},
        hyperparameters={"opt": "adam; rm -rf /"},
    )
    resp = client.post("/v1/jobs", json=body)
    assert resp.status_code == 202, resp.get_json()
    job = resp.get_json()
    assert job["spec"]["trainer"]["args"] == args
    assert job["spec"]["env"] == dict.fromkeys(body["env"], "***")  # masked in responses...
    with session_scope(db_url) as s:
        stored = s.get(Job, job["id"])
        assert stored is not None
        assert stored.spec["env"] == body["env"]  # ...and stored verbatim
    assert job["spec"]["labels"] == body["labels"]
    again = client.get(f"/v1/jobs/{job['id']}").get_json()
    assert again["spec"]["trainer"]["args"] == args
    listed = client.get("/v1/jobs", query_string={"label": "team=$(id) && `id` | x; y"})
    assert [j["id"] for j in listed.get_json()["jobs"]] == [job["id"]]
    assert not canary.exists()


def test_user_values_reach_the_trainer_as_argv_and_env_never_through_a_shell(
    client: FlaskClient, package_uri: str, db_url: str, tmp_path: Path
) -> None:
    """The VM side for real: the runner (workers/vm/runner.py, the code that runs on every VM)
    starts a probe trainer from a job.json built from the stored spec exactly as the provision
    step builds it (`JobSpec.trainer_argv()`, `env`); the probe records what it received."""
    from workers.vm import runner

    canary = tmp_path / "pwned"
    args = [a.format(canary=canary) for a in SHELL]
    env = {"SHELLY": f"$(touch {canary}); `touch {canary}`", "IFS": " ; "}
    resp = client.post(
        "/v1/jobs",
        json=_spec(
            package_uri, trainer__args=args, env=env, hyperparameters={"opt": f"; touch {canary}"}
        ),
    )
    assert resp.status_code == 202, resp.get_json()
    with session_scope(db_url) as s:
        stored = s.get(Job, resp.get_json()["id"])
        assert stored is not None
        spec = JobSpec.model_validate(stored.spec)
    job_dir = tmp_path / "job"
    (job_dir / "env" / "bin").mkdir(parents=True)
    (job_dir / "env" / "bin" / "python").symlink_to(sys.executable)
    (job_dir / "package").mkdir()
    out = tmp_path / "received.json"
    (job_dir / "package" / "probe.py").write_text(
        "import json, os, sys\n"
        f"json.dump({{'argv': sys.argv[1:], 'env': {{k: os.environ.get(k) for k in "
        f"{sorted(env)!r}}}}}, open({str(out)!r}, 'w'))\n"
    )
    doc = {
        "job_id": stored.id,
        "project_id": "local",
        "module": "probe",
        "argv": spec.trainer_argv(),
        "env": dict(spec.env),
    }
    (job_dir / "job.json").write_text(json.dumps(doc))
    assert runner._supervise(str(job_dir)) == 0, (job_dir / "log").read_text()
    received = json.loads(out.read_text())
    assert received["argv"] == [*args, f"--opt=; touch {canary}"]
    assert received["env"] == env
    assert not canary.exists()


def test_no_shell_between_the_worker_and_the_trainer() -> None:
    """Static backstop for the test above: nothing on the path uses a shell string."""
    root = Path(__file__).resolve().parents[2]
    for rel in ("workers/vm/runner.py", "workers/steps/provision.py", "workers/steps/poll.py"):
        text = (root / rel).read_text()
        assert "shell=True" not in text and "os.system(" not in text, rel


# -- query parameters and path segments -------------------------------------------------------

QUERY_CASES = [
    "limit=-1",
    "limit=0",
    "limit=201",
    f"limit={10**30}",
    "limit=1e3",
    "limit=ten",
    "limit=%00",
    "marker=garbage%00",
    "marker=" + "a" * 5000,
    "marker=../../etc/passwd",
    "marker=job-0000000000000000",
    "state=bogus",
    "state=QUEUED,bogus",
    "state=%00",
    "label=novalue",
    "label==value",
    "label=a%00b=c",
    "label=k=v%00",
    "label=k=" + "v" * 300,
    "label=bad key=v",
    "all_projects=maybe",
]


@pytest.mark.parametrize("query", QUERY_CASES)
def test_bad_list_parameters_are_400(client: FlaskClient, unchanged, error_of, query) -> None:
    resp = unchanged(lambda: client.get(f"/v1/jobs?{query}"))
    err = error_of(resp, 400, "invalid_request")
    said = err["details"].get("parameter") or next(iter(err["details"]), None)
    assert said in ("limit", "marker", "state", "label", "all_projects")


@pytest.mark.parametrize(
    "query",
    [
        "offset=-1",
        f"offset={10**30}",
        "offset=x",
        "limit=0",
        f"limit={10**30}",
        "follow=perhaps",
        "follow=true&timeout=-1",
        "follow=true&timeout=nan",
        "follow=true&timeout=inf",
        f"follow=true&timeout={10**30}",
    ],
)
def test_bad_log_parameters_are_400(client, package_uri, spec, error_of, query) -> None:
    job_id = client.post("/v1/jobs", json=spec(package_uri)).get_json()["id"]
    error_of(client.get(f"/v1/jobs/{job_id}/logs?{query}"), 400, "invalid_request")


@pytest.mark.parametrize(
    "job_id",
    ["%00", "job-%00", "..", "%2e%2e", "job-" + "a" * 5000, "job;rm", "$(id)", "%ff%fe", "job%0a"],
)
def test_strange_job_ids_are_404(client: FlaskClient, unchanged, error_of, job_id) -> None:
    for method, suffix in [
        ("GET", ""),
        ("GET", "/logs"),
        ("GET", "/events"),
        ("GET", "/metrics"),
        ("POST", "/cancel"),
        ("DELETE", ""),
    ]:
        resp = unchanged(
            lambda m=method, sfx=suffix: client.open(f"/v1/jobs/{job_id}{sfx}", method=m)
        )
        assert resp.status_code == 404, (method, suffix, resp.get_data(as_text=True)[:200])
        error_of(resp, 404, "not_found")


@pytest.mark.parametrize(
    "query",
    [
        "gpus=-1",
        "gpus=x",
        f"gpus={10**30}",
        "gpu_type=a;b",
        "gpu_type=%00",
        "gpu_type=" + "a" * 100,
    ],
)
def test_bad_flavor_parameters_are_400(client: FlaskClient, error_of, query) -> None:
    error_of(client.get(f"/v1/flavors?{query}"), 400, "invalid_request")


# -- packages and the signed store --------------------------------------------------------


@pytest.mark.parametrize(
    "filename",
    [
        "../../etc/passwd",
        "/etc/passwd",
        "a\x00b.tar.gz",
        "$(id).tar.gz",
        ".." + "/" * 50,
        "é" * 300,
    ],
)
def test_package_filenames_cannot_escape_the_staging_area(
    client: FlaskClient, store: LocalStore, tarball, filename
) -> None:
    resp = client.post(
        "/v1/packages",
        query_string={"filename": filename},
        data=tarball({"trainer/__init__.py": b""}),
        content_type="application/gzip",
    )
    assert resp.status_code == 201, resp.get_json()
    uri = resp.get_json()["package_uri"]
    key = store.key_of(uri)
    assert key.startswith("projects/local/staging/")
    assert ".." not in key.split("/") and "\x00" not in key and "$" not in key
    assert (store.root / key).resolve().is_relative_to(store.root.resolve())


@pytest.mark.parametrize(
    ("data", "ctype", "status"),
    [
        (b"", "application/gzip", 422),
        (b"not a tarball", "application/gzip", 422),
        (b"\x1f\x8b" + b"\x00" * 50, "application/gzip", 422),
        (b"x", "text/plain", 415),
        (b"x", "application/json", 415),
    ],
)
def test_bad_packages_store_nothing(client, unchanged, error_of, data, ctype, status) -> None:
    resp = unchanged(lambda: client.post("/v1/packages", data=data, content_type=ctype))
    error_of(resp, status, None)


def test_package_over_the_limit_is_413(client, settings, unchanged, error_of) -> None:
    data = b"\x1f\x8b" + os.urandom(settings.max_package_bytes + 10)
    resp = unchanged(
        lambda: client.post("/v1/packages", data=data, content_type="application/gzip")
    )
    error_of(resp, 413, "payload_too_large")


@pytest.mark.parametrize(
    "path",
    [
        "/v1/store/projects/local/%00?temp_url_sig=0&temp_url_expires=1&temp_url_prefix=",
        "/v1/store/../../etc/passwd?temp_url_sig=0&temp_url_expires=1&temp_url_prefix=",
        "/v1/store/x?temp_url_sig=%00&temp_url_expires=99999999999999999999999&temp_url_prefix=",
        "/v1/store/x?temp_url_sig=0&temp_url_expires=nan&temp_url_prefix=%00",
        "/v1/store/x",
    ],
)
def test_the_signed_store_refuses_strange_requests(client, unchanged, path) -> None:
    for method in ("GET", "HEAD", "PUT"):
        resp = unchanged(
            lambda m=method: client.open(path, method=m, data=b"x" if m == "PUT" else None)
        )
        assert 400 <= resp.status_code < 500, (method, path, resp.status_code)
