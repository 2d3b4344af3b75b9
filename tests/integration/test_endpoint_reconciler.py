"""The reconciler's endpoint duties on real PostgreSQL (migrated) and real sandboxes: endpoint
servers are never reaped as job orphans while a live row names them, a server tagged for an
endpoint that no live row names is reaped past orphan_grace, a stalled endpoint is re-driven,
a READY endpoint whose label moved starts its rolling switch, and a ready replica whose server
vanished gets its endpoint re-driven at once."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from service import queue
from service.backends.compute import sandbox
from service.backends.compute.sandbox import SandboxBackend
from service.backends.interfaces import Flavor, ServerSpec, ServerState
from service.config import Settings
from service.db.migrate import upgrade
from service.db.models import Endpoint, Model, ModelLabel, ModelVersion, Resource, utcnow
from service.db.session import session_scope
from tests.pgutil import temp_database
from workers import jobctx, reconciler, ssh

FLAVOR = Flavor(name="test.small", vcpus=1, ram_mb=512, pids=256)


@pytest.fixture(scope="module")
def pg() -> Iterator[str]:
    with temp_database("endpoint_reconciler") as url:
        upgrade(url)
        yield url


@pytest.fixture
def backend() -> Iterator[SandboxBackend]:
    assert Path(sandbox.SSHD).exists(), "openssh-server is required"
    base = Path(tempfile.mkdtemp(prefix="stackml-epreap-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    b = SandboxBackend(base / "sandboxes", [FLAVOR])
    yield b
    ssh.close_all()
    try:
        for ref in b.list_servers():
            b.delete_server(ref.id)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def enqueued(
    pg: str, backend: SandboxBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> list[tuple[str, str]]:
    settings = Settings(
        database_url=pg, data_dir=tmp_path, secret_key="ep-reap", orphan_grace=0, stuck_after=5
    )
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(jobctx, "settings", lambda: settings)
    monkeypatch.setattr(jobctx, "compute", lambda trust_id=None: backend)
    monkeypatch.setattr(
        jobctx, "next_step", lambda task, oid, countdown=0.0: calls.append((task, oid))
    )
    monkeypatch.setattr("workers.admission.admit_waiting", lambda: [])
    with session_scope(pg) as s:
        for table in ("resources", "endpoints", "model_labels", "model_versions", "models"):
            s.execute(Endpoint.metadata.tables[table].delete())
    return calls


def _endpoint(pg: str, ep_id: str, state: str, **kw: Any) -> None:
    mid = f"mdl-{ep_id[-12:]}"
    with session_scope(pg) as s:
        s.add(Model(id=mid, project_id="p", name=f"m{ep_id[-6:]}", created_by="t"))
        s.flush()
        for v in (1, 2):
            s.add(
                ModelVersion(
                    model_id=mid, version=v, state="READY", artifact_uri="x", created_by="t"
                )
            )
        s.add(ModelLabel(model_id=mid, name="default", version=kw.pop("label_at", 1)))
        s.add(
            Endpoint(
                id=ep_id,
                project_id="p",
                model_id=mid,
                state=state,
                target_label="default",
                replicas=1,
                flavor=FLAVOR.name,
                created_by="t",
                **kw,
            )
        )


def _server(backend: SandboxBackend, name: str, ep_id: str) -> str:
    _pem, pub = ssh.generate_keypair()
    tags = (("stackml-endpoint", ep_id), ("stackml-role", "replica"), ("stackml-project", "p"))
    return backend.create_server(ServerSpec(name, FLAVOR, "tensorflow-2.21", pub, tags=tags)).id


def _row(pg: str, ep_id: str, name: str, server_id: str | None, **kw: Any) -> int:
    with session_scope(pg) as s:
        r = Resource(
            owner_kind="endpoint",
            owner_id=ep_id,
            project_id="p",
            backend="sandbox",
            role="replica",
            name=name,
            server_id=server_id,
            flavor=FLAVOR.name,
            state=kw.pop("state", "active"),
            version=1,
            **kw,
        )
        s.add(r)
        s.flush()
        return r.id


def test_endpoint_servers_are_reaped_only_when_no_live_row_names_them(
    pg: str, backend: SandboxBackend, enqueued: list[tuple[str, str]]
) -> None:
    _endpoint(pg, "ep-00000000000a", "READY", serving_version=1)
    kept = _server(backend, "stackml-ep-00000000000a-v1-aaaaaa", "ep-00000000000a")
    _row(pg, "ep-00000000000a", "stackml-ep-00000000000a-v1-aaaaaa", kept, replica_state="booting")
    # a server of a DELETED endpoint whose row says deleted, and one of an unknown endpoint
    _endpoint(pg, "ep-00000000000b", "DELETED")
    stray = _server(backend, "stackml-ep-00000000000b-v1-bbbbbb", "ep-00000000000b")
    _row(pg, "ep-00000000000b", "stackml-ep-00000000000b-v1-bbbbbb", stray, state="deleted")
    unknown = _server(backend, "stackml-ep-00000000000c-v1-cccccc", "ep-00000000000c")
    report = reconciler.run()
    assert sorted(report.reaped) == sorted([stray, unknown])
    assert backend.get_server(kept).state is ServerState.ACTIVE
    assert backend.get_server(stray).state is ServerState.DELETED
    assert backend.get_server(unknown).state is ServerState.DELETED


def test_stalled_endpoints_are_redriven_and_a_moved_label_starts_the_switch(
    pg: str, backend: SandboxBackend, enqueued: list[tuple[str, str]]
) -> None:
    old = utcnow() - timedelta(seconds=60)
    _endpoint(pg, "ep-00000000000d", "CREATING", last_progress_at=old)
    _endpoint(pg, "ep-00000000000e", "CREATING")  # fresh: its own step is on its way
    _endpoint(pg, "ep-00000000000f", "READY", serving_version=1, label_at=2)
    _endpoint(pg, "ep-000000000010", "READY", serving_version=1)  # settled: left alone
    report = reconciler.run()
    assert sorted(report.endpoints) == ["ep-00000000000d", "ep-00000000000f"]
    assert sorted(enqueued) == [
        (queue.CONVERGE_ENDPOINT, "ep-00000000000d"),
        (queue.CONVERGE_ENDPOINT, "ep-00000000000f"),
    ]
    with session_scope(pg) as s:
        assert s.get_one(Endpoint, "ep-00000000000f").state == "UPDATING"
        assert s.get_one(Endpoint, "ep-000000000010").state == "READY"


def test_a_ready_replica_whose_server_vanished_is_replaced(
    pg: str, backend: SandboxBackend, enqueued: list[tuple[str, str]]
) -> None:
    _endpoint(pg, "ep-000000000011", "READY", serving_version=1)
    sid = _server(backend, "stackml-ep-000000000011-v1-dddddd", "ep-000000000011")
    st = backend.get_server(sid)
    rid = _row(
        pg,
        "ep-000000000011",
        "stackml-ep-000000000011-v1-dddddd",
        sid,
        replica_state="ready",
        host=st.host,
        serving_port=8501,
    )
    backend.delete_server(sid)
    report = reconciler.run()
    assert report.endpoints == ["ep-000000000011"]
    assert enqueued == [(queue.CONVERGE_ENDPOINT, "ep-000000000011")]
    with session_scope(pg) as s:
        assert s.get_one(Endpoint, "ep-000000000011").state == "UPDATING"
        assert s.get_one(Resource, rid).health_failures >= 3
        s.execute(update(Endpoint).values(state="DELETED"))


def test_a_boot_that_died_between_its_row_and_its_server_is_adopted_or_replaced(
    pg: str, backend: SandboxBackend, enqueued: list[tuple[str, str]]
) -> None:
    """Crash safety of a replica's boot (workers/steps/serve.py): the row is written before the
    server is created. A worker that died after creating the server is followed by a round
    that adopts the server by name (no second server); one that died before creating it is
    followed by a round that fails the row once boot_deadline has passed and boots another."""
    from workers.steps import serve

    _endpoint(pg, "ep-000000000012", "CREATING")
    _pem, pub = ssh.generate_keypair()
    with session_scope(pg) as s:
        s.execute(
            update(Endpoint)
            .where(Endpoint.id == "ep-000000000012")
            .values(ssh_public_key=pub, ssh_key_enc=jobctx.encrypt_key(_pem))
        )
    made = _server(backend, "stackml-ep-000000000012-v1-aaaaaa", "ep-000000000012")
    adopted = _row(
        pg, "ep-000000000012", "stackml-ep-000000000012-v1-aaaaaa", None, state="booting",
        replica_state="booting", creating="dead0001",
    )  # fmt: skip
    long_ago = utcnow() - timedelta(seconds=120)  # past boot_deadline (60 s)
    lost = _row(
        pg, "ep-000000000012", "stackml-ep-000000000012-v1-bbbbbb", None, state="booting",
        replica_state="booting", creating="dead0002", created_at=long_ago,
    )  # fmt: skip
    with session_scope(pg) as s:
        s.execute(update(Endpoint).values(replicas=2))
    assert serve.converge("ep-000000000012") is True
    with session_scope(pg) as s:
        a = s.get_one(Resource, adopted)
        assert a.server_id == made and a.replica_state == "provisioning"
        b = s.get_one(Resource, lost)
        assert b.replica_state == "failed" and "never created" in (b.last_error or "")
    # the next round deletes the failed row and boots its replacement: still 2 servers
    assert serve.converge("ep-000000000012") is True
    with session_scope(pg) as s:
        assert s.get_one(Resource, lost).state == "deleted"
        live = [
            r
            for r in s.query(Resource).filter_by(owner_id="ep-000000000012")
            if r.state != "deleted"
        ]
    assert len(live) == 2 and all(r.server_id for r in live)
    servers = backend.list_servers(("stackml-endpoint", "ep-000000000012"))
    assert sorted(r.id for r in servers) == sorted(r.server_id for r in live if r.server_id)
    with session_scope(pg) as s:
        s.execute(update(Endpoint).values(state="DELETED"))


def test_an_endpoint_with_nothing_to_do_does_not_spin(
    pg: str, backend: SandboxBackend, enqueued: list[tuple[str, str]]
) -> None:
    """Its label points nowhere (removed): no action, nothing under way, so the round does not
    hand itself back (the reconciler looks again every stuck_after)."""
    from service.db.models import ModelLabel
    from workers.steps import serve

    _endpoint(pg, "ep-000000000013", "CREATING")
    with session_scope(pg) as s:
        s.query(ModelLabel).filter_by(model_id="mdl-000000000013").delete()
    assert serve.converge("ep-000000000013") is False
    with session_scope(pg) as s:
        assert s.get_one(Endpoint, "ep-000000000013").state == "CREATING"
        s.execute(update(Endpoint).values(state="DELETED"))
