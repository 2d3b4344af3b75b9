"""The reconciler's endpoint duties on real PostgreSQL (migrated) and real sandboxes: endpoint
servers are never reaped as job orphans while a live row names them, a server tagged for an
endpoint that no live row names is reaped past orphan_grace, a stalled endpoint is re-driven,
a READY endpoint whose label moved starts its rolling switch, and a ready replica whose server
vanished gets its endpoint re-driven at once.

An endpoint holding a Keystone trust (tenancy=project) has its servers in its project, which a
second sandbox backend stands for here (`jobctx.compute(trust_id)` answers it; the service
backend does not see its servers) and Keystone's trust deletion is recorded (`trusts.delete`;
the real one: tests/cloud/test_endpoint_trusts.py, tests/cloud/test_serving_openstack.py): the
converge boots and deletes replicas through the trust, the reaper lists a live endpoint's tag
through it, and a DELETED endpoint's tag is swept through it before its trust is deleted, the
reconciler retrying while Keystone does not answer."""

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

from service import queue, trusts
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


# -- endpoints acting through a Keystone trust --------------------------------------------


class Keystone:
    """Stands in for `trusts.delete` (Keystone): records deleted trusts; `down` fails them."""

    def __init__(self) -> None:
        self.deleted: list[str] = []
        self.down = False

    def delete(self, settings: Settings, trust_id: str, conn: Any = None) -> str:
        if self.down:
            raise trusts.TrustUnavailable(f"deleting trust {trust_id}: Keystone does not answer")
        self.deleted.append(trust_id)
        return "deleted"


@pytest.fixture
def tenant(
    backend: SandboxBackend, enqueued: list[tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[SandboxBackend, Keystone]]:
    """The project an endpoint's trust acts in: its own sandboxes, seen only through a trust."""
    base = Path(tempfile.mkdtemp(prefix="stackml-eptenant-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    project = SandboxBackend(base / "sandboxes", [FLAVOR])
    keystone = Keystone()
    monkeypatch.setattr(jobctx, "compute", lambda trust_id=None: project if trust_id else backend)
    monkeypatch.setattr(trusts, "delete", keystone.delete)
    yield project, keystone
    ssh.close_all()
    try:
        for ref in project.list_servers():
            project.delete_server(ref.id)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _trust_of(pg: str, ep_id: str) -> str | None:
    with session_scope(pg) as s:
        return s.get_one(Endpoint, ep_id).trust_id


def test_a_trusted_endpoints_orphans_are_reaped_through_its_trust(
    pg: str,
    backend: SandboxBackend,
    tenant: tuple[SandboxBackend, Keystone],
    enqueued: list[tuple[str, str]],
) -> None:
    project, keystone = tenant
    _endpoint(pg, "ep-000000000020", "READY", serving_version=1, trust_id="trust-20")
    kept = _server(project, "stackml-ep-000000000020-v1-aaaaaa", "ep-000000000020")
    _row(pg, "ep-000000000020", "stackml-ep-000000000020-v1-aaaaaa", kept, replica_state="booting")
    stray = _server(project, "stackml-ep-000000000020-v1-bbbbbb", "ep-000000000020")
    assert backend.list_servers() == []  # stackml's own project holds none of them
    report = reconciler.run()
    assert report.reaped == [stray]
    assert project.get_server(kept).state is ServerState.ACTIVE
    assert project.get_server(stray).state is ServerState.DELETED
    assert keystone.deleted == [] and _trust_of(pg, "ep-000000000020") == "trust-20"
    with session_scope(pg) as s:
        s.execute(update(Endpoint).values(state="DELETED", trust_id=None))


def test_a_deleted_endpoints_trust_goes_after_its_tag_is_swept_and_is_retried(
    pg: str,
    backend: SandboxBackend,
    tenant: tuple[SandboxBackend, Keystone],
    enqueued: list[tuple[str, str]],
) -> None:
    project, keystone = tenant
    _endpoint(pg, "ep-000000000021", "DELETED", trust_id="trust-21")
    left = _server(project, "stackml-ep-000000000021-v1-cccccc", "ep-000000000021")
    keystone.down = True
    report = reconciler.run()
    assert report.endpoint_trusts == []
    assert project.get_server(left).state is ServerState.DELETED  # swept before the trust
    assert _trust_of(pg, "ep-000000000021") == "trust-21"  # owed: retried
    keystone.down = False
    report = reconciler.run()
    assert report.endpoint_trusts == ["ep-000000000021"]
    assert keystone.deleted == ["trust-21"] and _trust_of(pg, "ep-000000000021") is None
    assert reconciler.run().endpoint_trusts == []  # nothing owed any more
    assert keystone.deleted == ["trust-21"]


def test_converge_boots_and_deletes_through_the_trust_then_lets_it_go(
    pg: str,
    backend: SandboxBackend,
    tenant: tuple[SandboxBackend, Keystone],
    enqueued: list[tuple[str, str]],
) -> None:
    """Every backend call of a trusted endpoint's converge goes through its trust: the replica
    boots in the endpoint's project (none in stackml's), a stray server there is swept once the
    endpoint is DELETED, and then its trust is deleted and forgotten."""
    from workers.steps import serve

    project, keystone = tenant
    ep_id = "ep-000000000022"
    _endpoint(pg, ep_id, "CREATING", trust_id="trust-22")
    pem, pub = ssh.generate_keypair()
    with session_scope(pg) as s:
        s.execute(
            update(Endpoint)
            .where(Endpoint.id == ep_id)
            .values(ssh_public_key=pub, ssh_key_enc=jobctx.encrypt_key(pem))
        )
    assert serve.converge(ep_id) is True
    booted = project.list_servers(("stackml-endpoint", ep_id))
    assert len(booted) == 1 and backend.list_servers() == []
    with session_scope(pg) as s:
        (row,) = s.query(Resource).filter_by(owner_id=ep_id)
        assert row.server_id == booted[0].id
    stray = _server(project, f"stackml-{ep_id}-v1-dddddd", ep_id)  # a create that "failed"
    with session_scope(pg) as s:
        s.execute(update(Endpoint).where(Endpoint.id == ep_id).values(state="DELETING"))
    for _ in range(20):
        if not serve.converge(ep_id):
            break
    with session_scope(pg) as s:
        ep = s.get_one(Endpoint, ep_id)
        assert (ep.state, ep.trust_id, ep.ssh_key_enc) == ("DELETED", None, None)
    assert project.get_server(booted[0].id).state is ServerState.DELETED
    assert project.get_server(stray).state is ServerState.DELETED
    assert project.list_servers() == []
    assert keystone.deleted == ["trust-22"]
