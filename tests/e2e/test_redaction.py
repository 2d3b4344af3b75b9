"""No secret leaks: a real job on the platform (API over HTTP, Celery worker, a sandbox VM over
OpenSSH), then every place a secret could surface is scanned for every secret of that job.

Secrets: the job's SSH private key (read back from the database while the job runs and
decrypted here; the database itself must hold it only Fernet-encrypted), the signatures of its
grants (`temp_url_sig=` values, taken from the VM's job.json, where they belong, and any
`temp_url_sig=<hex>` anywhere else), the platform's signing key (data_dir/secret.key) and a
canary X-Auth-Token sent with every API call.

Places: every file under the data dir, the platform's own log files among them (the worker's
logs/worker.log, the API's access log logs/api.log, the store gateway's; not the VM's files, the
signing key, the built runtimes), the VM's files captured while it ran (console.log, its home;
the job's private key must not be there, only its public half; a home that is a disk image is
read from the image), every API response of the job
(job JSON, listing, logs, events, metrics, flavors, health), every row of every table, every
key in the Redis database, and every log record of the API (served in this process). The
package's signed URL is also fetched through the API here: the access log must show that
request with its signature redacted."""

from __future__ import annotations

import itertools
import json
import logging
import re
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis
from sqlalchemy import MetaData, select

from service.client import StackMLClient
from service.config import Settings
from service.db import jobs as repo
from service.db.session import engine_for, session_scope
from service.platform import LocalPlatform
from tests.e2e.conftest import (
    REDIS_URL,
    job_spec,
    make_package,
    wait_resources_deleted,
    wait_state,
)

SIG_RE = re.compile(rb"temp_url_sig=([0-9a-fA-F]{16,})")
HOME_IMAGE = "home.img"  # service/backends/compute/sandbox.py: a root sandbox's home
SKIP_DIRS = {"runtimes", "sandboxes"}  # built runtimes (huge); the VMs (captured separately)
# long enough to look at the VM while it runs; exports a model (the write grant is used too)
SLOW_OK = """
    import json, os, sys, time
    print("argv", json.dumps(sys.argv[1:]), flush=True)
    for i in range(300):
        time.sleep(0.1)
    print(json.dumps({"stackml_metric": 1, "epoch": 1, "loss": 0.25}), flush=True)
    with open(os.path.join(os.environ["STACKML_MODEL_DIR"], "weights.txt"), "w") as fh:
        fh.write("1\\n")
"""


def _body_lines(pem: str) -> list[str]:
    return [ln.strip() for ln in pem.strip().splitlines() if ln and not ln.startswith("-----")]


def pem_fragments(pem: str) -> set[bytes]:
    """The key's base64 body, whole and line by line (a partial leak counts), without the
    lines every key of its kind shares (OpenSSH's "openssh-key-v1 none none" header)."""
    from workers.ssh import generate_keypair

    common = set(_body_lines(generate_keypair()[0]))
    lines = _body_lines(pem)
    specific = {ln.encode() for ln in lines if len(ln) >= 24 and ln not in common}
    assert specific, "the key has lines of its own"
    return {"".join(lines).encode()} | specific | raw_key_forms(pem)


def raw_key_forms(pem: str) -> set[bytes]:
    """The private key's raw bytes in the encodings a careless log line would use."""
    import base64

    from cryptography.hazmat.primitives import serialization

    key = serialization.load_ssh_private_key(pem.encode(), password=None)
    raw = key.private_bytes(  # type: ignore[union-attr]
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return {raw.hex().encode(), base64.b64encode(raw).rstrip(b"="), raw}


def files_under(root: Path, skip: Iterable[str] = ()) -> Iterable[Path]:
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).parts
        if rel and rel[0] in set(skip):
            continue
        if p.is_file() and not p.is_symlink():
            yield p


def read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""  # a socket, or gone meanwhile


def vm_home_files(server_dir: Path, dest: Path, deadline_s: float = 20) -> dict[str, bytes]:
    """The files of the VM's home where it is a disk image mounted only inside the VM (root
    sandboxes: home.img, ext4), read from the image itself (debugfs, read-only) after a sync;
    until the VM's ext4 commits its journal the image may not show job.json yet: read again."""
    image = server_dir / HOME_IMAGE
    if not image.exists():
        return {}  # the home is a plain directory of server_dir, already read
    deadline = time.monotonic() + deadline_s
    for attempt in itertools.count():
        subprocess.run(["sync"], check=True, timeout=120)
        out = dest / str(attempt)
        out.mkdir(parents=True)
        subprocess.run(
            ["debugfs", "-R", f"rdump / {out}", str(image)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        files = {f"{image}:/{p.relative_to(out)}": read(p) for p in files_under(out)}
        if any(k.endswith("/job.json") for k in files) or time.monotonic() > deadline:
            return files
        time.sleep(1)
    raise AssertionError("itertools.count() ended")


def db_dump(db_url: str) -> dict[str, bytes]:
    """Every row of every table, as bytes (repr of each value; raw bytes as they are)."""
    engine = engine_for(db_url)
    meta = MetaData()
    meta.reflect(bind=engine)
    out: dict[str, bytes] = {}
    with engine.connect() as conn:
        for table in meta.sorted_tables:
            parts: list[bytes] = []
            for row in conn.execute(select(table)):
                for value in row:
                    parts.append(value if isinstance(value, bytes) else repr(value).encode())
            out[f"db:{table.name}"] = b"\n".join(parts)
    return out


def redis_dump(url: str) -> bytes:
    r = redis.Redis.from_url(url)
    parts: list[bytes] = []
    for key in r.scan_iter():
        kind = r.type(key)
        if kind == b"string":
            parts.append(r.get(key) or b"")
        elif kind == b"list":
            parts += r.lrange(key, 0, -1)
        elif kind == b"hash":
            for k, v in r.hgetall(key).items():
                parts += [k, v]
        elif kind == b"set":
            parts += list(r.smembers(key))
        elif kind == b"zset":
            parts += r.zrange(key, 0, -1)
    return b"\n".join(parts)


def test_no_secret_reaches_logs_events_responses_or_rows(
    platform: LocalPlatform,
    e2e_settings: Settings,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    from workers.jobctx import decrypt_key

    caplog.set_level(logging.DEBUG)
    canary_token = "stackml-canary-token-" + "7f3a" * 8
    client = StackMLClient(platform.url, token=canary_token, timeout=30)
    package = client.stage_package(make_package(tmp_path / "pkg", {"slow_ok": SLOW_OK}))
    pwned = tmp_path / "pwned"
    spec = job_spec(package["package_uri"], "trainer.slow_ok")
    args = [f"; touch {pwned}", f"$(touch {pwned})", f"`touch {pwned}`", "a b", "'\"|&"]
    spec["trainer"]["args"] = args
    spec["hyperparameters"] = {"opt": f"adam; touch {pwned}"}
    job = client.create_job(spec)
    job_id = job["id"]

    # -- while it runs: the key (from the database, decrypted here) and the VM's files --------
    running = wait_state(
        client, job_id, {"RUNNING", "EXPORTING", "SUCCEEDED", "FAILED"}, timeout=120
    )
    assert running["state"] in ("RUNNING", "EXPORTING"), running  # the VM is still there
    # first the VM's files, while it runs: the server the job runs on now
    active = [r for r in running["resources"] if r["state"] == "active" and r["role"] == "chief"]
    assert len(active) == 1, running["resources"]
    server_dir = e2e_settings.sandbox_dir / active[0]["server_id"]
    # (a home image is read file by file from inside it, not as 10 GiB of sparse bytes)
    vm_files = {str(p): read(p) for p in files_under(server_dir) if p.name != HOME_IMAGE}
    vm_files.update(vm_home_files(server_dir, tmp_path / "vm-home"))
    with session_scope(e2e_settings.db_url) as s:
        enc = repo.get_job(s, job_id).ssh_key_enc
    assert enc is not None and enc.startswith(b"gAAAAA"), "the key is stored Fernet-encrypted"
    pem = decrypt_key(enc)
    assert "PRIVATE KEY" in pem
    key_parts = pem_fragments(pem)
    assert not any(f in enc for f in key_parts)
    job_docs = [v for k, v in vm_files.items() if k.endswith("/job.json")]
    assert job_docs, f"no job.json among the VM's files: {sorted(vm_files)}"
    sigs = {m.group(1) for doc in job_docs for m in SIG_RE.finditer(doc)}
    assert sigs, "the VM's job.json carries the grant's signed URLs"
    # the package's signed URL, fetched through the API itself (sandboxes may use the gateway)
    package_url = urlsplit(json.loads(job_docs[0])["package_url"])
    own_client_log = logging.getLogger("urllib3.connectionpool")  # this test's, not the API's:
    own_client_log.setLevel(logging.INFO)  # at DEBUG it would print the URL this test fetches
    try:
        fetched = client.session.get(f"{platform.url}{package_url.path}?{package_url.query}")
    finally:
        own_client_log.setLevel(logging.NOTSET)
    assert fetched.status_code == 200 and fetched.content[:2] == b"\x1f\x8b", fetched.status_code

    # -- after it ended -------------------------------------------------------------------------
    done = wait_state(client, job_id, {"SUCCEEDED", "FAILED"}, timeout=120)
    assert done["state"] == "SUCCEEDED", done["failure"]
    wait_resources_deleted(client, job_id)
    deadline = time.monotonic() + 30  # teardown clears the key just after the servers go
    while True:
        with session_scope(e2e_settings.db_url) as s:
            if repo.get_job(s, job_id).ssh_key_enc is None:
                break
        assert time.monotonic() < deadline, "the key dies with its servers"
        time.sleep(0.2)
    assert not pwned.exists()
    log, _ = client.logs(job_id)
    assert f"argv {json.dumps([*args, f'--opt=adam; touch {pwned}'])}" in log.decode()

    signing_key = (e2e_settings.data_dir / "secret.key").read_bytes().strip()
    secrets: dict[str, set[bytes]] = {
        "ssh private key": key_parts,
        "grant signature": sigs,
        "signing key": {signing_key},
        "auth token": {canary_token.encode()},
    }

    sources: dict[str, bytes] = {}
    for name, resp in {
        "api:job": client.session.get(f"{platform.url}/v1/jobs/{job_id}"),
        "api:list": client.session.get(f"{platform.url}/v1/jobs?limit=200"),
        "api:logs": client.session.get(f"{platform.url}/v1/jobs/{job_id}/logs"),
        "api:events": client.session.get(f"{platform.url}/v1/jobs/{job_id}/events"),
        "api:metrics": client.session.get(f"{platform.url}/v1/jobs/{job_id}/metrics"),
        "api:flavors": client.session.get(f"{platform.url}/v1/flavors"),
        "api:readyz": client.session.get(f"{platform.url}/readyz"),
        "api:missing": client.session.get(f"{platform.url}/v1/jobs/job-0000000000000000"),
    }.items():
        sources[name] = resp.content + repr(dict(resp.headers)).encode()
    for p in files_under(e2e_settings.data_dir, SKIP_DIRS):
        if p.name != "secret.key":
            sources[f"file:{p}"] = read(p)
    sources.update(db_dump(e2e_settings.db_url))
    sources["redis"] = redis_dump(REDIS_URL)
    sources["api log records"] = "\n".join(
        f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records
    ).encode()
    assert any("worker.log" in k for k in sources), sorted(sources)[:20]
    # the API's access log is one of the files scanned, and it logged the signed fetch redacted
    access_log = e2e_settings.data_dir / "logs" / "api.log"
    assert f"file:{access_log}" in sources, sorted(sources)[:20]
    access = sources[f"file:{access_log}"].decode()
    assert '"POST /v1/jobs HTTP/1.1" 202' in access, access[-2000:]
    assert f"GET {package_url.path}?temp_url_sig=REDACTED&" in access, access[-2000:]

    found: list[str] = []
    for where, data in sources.items():
        for what, values in secrets.items():
            for v in values:
                if v and v in data:
                    found.append(f"{what} in {where}")
        for m in SIG_RE.finditer(data):  # any grant's signature, not only this job's
            found.append(f"a temp_url_sig in {where}: ...{m.group(0)[-8:].decode()}")
    # the VM holds its grants (that is what they are for) but never the job's private key
    for where, data in vm_files.items():
        for what in ("ssh private key", "signing key", "auth token"):
            for v in secrets[what]:
                if v in data:
                    found.append(f"{what} on the VM in {where}")

    checked = sum(len(v) for v in secrets.values())
    with capsys.disabled():
        print(
            f"\nredaction: {checked} secret values x {len(sources) + len(vm_files)} places "
            f"scanned; secrets found: {len(found)}"
        )
    assert not found, "\n".join(sorted(set(found)))
