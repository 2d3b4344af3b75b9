"""Converge an endpoint: boot, provision, health-check, replace, scale, switch, drain, delete.

One task (`stackml.converge_endpoint`, an endpoint id in) holds the endpoint's lease while it
runs (as export holds a job's), reads the endpoint and its replica rows, asks the pure plan
(service/domain/endpoints.py) what to do, does each action once (every one short and bounded:
one look at a booting server, one provisioning, one health probe), and hands itself back with
a countdown until the plan is empty. A killed worker loses nothing: the lease lapses and the
reconciler re-drives the endpoint; every action is idempotent.

A replica is a `resources` row (owner_kind 'endpoint', role 'replica'), written before its
server is booted (a crash between the two leaves a row: the server is adopted by name or the
row fails and is replaced), with the tags `stackml-endpoint`, `stackml-role`, `stackml-project`.
The endpoint's own SSH key (encrypted as jobs' are) opens its replicas; provisioning ships
runner.py and model_server.py, writes serve.json with signed GET URLs for the version's files
(from model_versions.checksums) and runs `runner serve`. The replica is ready once
`GET /v1/models/<name>` answers AVAILABLE for its version and one warm-up predict answered.

An endpoint created with Keystone auth and `tenancy: project` holds a Keystone trust
(`endpoints.trust_id`, made by the API with the caller's token; service/trusts.py): every
backend call for it (boot, look at a boot, health, delete, list by tag) goes through
`jobctx.compute(trust_id)`, in the caller's project, and the model is read from the project's
store through the same trust. Once the endpoint is DELETED its tag is swept through the trust
(a server no row names: a create that answered an error after the cloud made it), then the
trust is deleted and the column cleared (`release_trust`); when that fails the reconciler
retries (`repo.trust_debts`), as it does for jobs' trusts.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
import urllib.error
import urllib.request
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from service import queue, trusts
from service.backends import registry
from service.backends.interfaces import (
    Access,
    ComputeBackend,
    HostKeySource,
    ServerSpec,
    ServerState,
)
from service.db import endpoints as repo
from service.db.models import Endpoint, Model, Resource, utcnow
from service.domain import endpoints as dom
from service.domain.errors import BackendError, TransientBackendError
from service.domain.states import OwnerKind, ResourceState
from workers import chaos, jobctx, pipeline, ssh
from workers.jobctx import db
from workers.steps.provision import runtime_on_server, sign

log = logging.getLogger("stackml.worker.serve")

VM_DIR = Path(__file__).resolve().parents[1] / "vm"
SERVE_DIR = ".stackml/serve"
MODEL_SERVER = ".stackml/model_server.py"
TAG = "stackml-endpoint"
CONVERGE_AGAIN = 0.5  # seconds between rounds while converging
HTTP_TIMEOUT = 5.0
DELETE_DEADLINE = 60.0
# replicas are reached directly, never through an HTTP proxy of the environment
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# -- the endpoint's lease (as a job's: workers/pipeline.py) --------------------------------


@dataclass(frozen=True)
class Lease:
    endpoint_id: str
    owner: str
    ttl: float


def _no_live_lease() -> Any:
    return pipeline.lease_free(Endpoint)


def take_lease(endpoint_id: str, ttl: float) -> Lease | None:
    with db() as s:
        owner = pipeline.take_row_lease(
            s, Endpoint, endpoint_id, ttl, Endpoint.state != dom.EndpointState.DELETED.value
        )
    return Lease(endpoint_id, owner, ttl) if owner else None


def _renew(lease: Lease) -> bool:
    with db() as s:
        return pipeline.renew_row_lease(s, Endpoint, lease.endpoint_id, lease.owner, lease.ttl)


def release_lease(lease: Lease) -> None:
    with db() as s:
        pipeline.release_row_lease(s, Endpoint, lease.endpoint_id, lease.owner)


def heartbeat(lease: Lease) -> AbstractContextManager[None]:
    return pipeline.lease_heartbeat(
        lease.ttl,
        lambda: _renew(lease),
        lambda: release_lease(lease),
        what=f"endpoint {lease.endpoint_id}",
        lease_name="its lease",
        thread_name=f"lease-{lease.endpoint_id}",
        warn_lost=False,
    )


def enqueue(endpoint_id: str, countdown: float = 0.0) -> None:
    jobctx.next_step(queue.CONVERGE_ENDPOINT, endpoint_id, countdown)


# -- the task -----------------------------------------------------------------------------


def run(endpoint_id: str) -> None:
    cfg = jobctx.settings()
    lease = take_lease(endpoint_id, max(1.0, cfg.stuck_after))
    if lease is None:
        return  # another converge holds it (or the endpoint is gone)
    again = False
    with heartbeat(lease):
        chaos.pause("serve")  # tests/chaos: a worker killed while it holds the endpoint
        _ensure_key(endpoint_id)
        again = converge(endpoint_id)
    if again:
        enqueue(endpoint_id, CONVERGE_AGAIN)


def _ensure_key(endpoint_id: str) -> None:
    with db() as s:
        ep = s.get_one(Endpoint, endpoint_id)
        if ep.ssh_key_enc is not None or ep.state == dom.EndpointState.DELETING.value:
            return
        pem, pub = ssh.generate_keypair(comment=f"stackml-{endpoint_id}")
        s.execute(
            update(Endpoint)
            .where(Endpoint.id == endpoint_id, Endpoint.ssh_key_enc.is_(None))
            .values(ssh_key_enc=jobctx.encrypt_key(pem), ssh_public_key=pub)
        )


def limits() -> dom.Limits:
    cfg = jobctx.settings()
    return dom.Limits(
        max_health_failures=cfg.serving_health_failures,
        drain_seconds=cfg.serving_drain_seconds,
        stuck_after=cfg.serving_load_deadline + cfg.boot_deadline + cfg.provision_deadline,
        max_failures=cfg.serving_max_failures,
    )


def converge(endpoint_id: str) -> bool:
    """One round: plan, act. True while there is more to do (the caller hands it back)."""
    with db() as s:
        ep = s.get(Endpoint, endpoint_id)
        if ep is None or ep.state == dom.EndpointState.DELETED.value:
            return False
        trust_id = ep.trust_id
        rows = repo.replicas(s, endpoint_id)
        desired = repo.desired(s, ep)
        failures = repo.failures(s, endpoint_id)
        ready_servers = [
            (r.id, r.server_id)
            for r in rows
            if r.replica_state == dom.ReplicaState.READY.value and r.server_id
        ]
        repo.touch(s, endpoint_id)
    backend = jobctx.compute(trust_id)  # through the endpoint's trust, in its project
    gone = set()
    for rid, server_id in ready_servers:
        if backend.get_server(server_id).state in (ServerState.DELETED, ServerState.ERROR):
            gone.add(rid)
    with db() as s:
        view = repo.plan_view(repo.replicas(s, endpoint_id), gone)
    p = dom.plan(desired, view, limits(), failures)
    for action in p.actions:
        try:
            _act(endpoint_id, backend, action)
        except TransientBackendError:
            raise
        except BackendError as e:
            log.warning("endpoint %s: %s failed: %s", endpoint_id, action, e)
    if p.settle is not None:
        _settle(endpoint_id, p.settle, p)
    if p.settle is dom.EndpointState.DELETED:
        _finish_deleted(endpoint_id, backend, trust_id)
        return False
    if p.settle is dom.EndpointState.READY and not p.actions:
        return False
    waiting = any(r.state in (*dom.COMING, dom.ReplicaState.DRAINING) for r in view)
    if not p.actions and not waiting:
        # nothing to do and nothing under way (a label that points nowhere yet): the
        # reconciler looks again every stuck_after instead of a round every half second
        return False
    if p.settle is dom.EndpointState.FAILED and not any(
        isinstance(a, dom.Boot | dom.Advance | dom.Delete | dom.Drain) for a in p.actions
    ):
        return False
    return True


def _settle(endpoint_id: str, to: dom.EndpointState, p: dom.Plan) -> None:
    with db() as s:
        values: dict[str, Any] = {}
        if to is dom.EndpointState.DELETED:
            values = {"ssh_key_enc": None}  # the key dies with the servers it opened
        if to is dom.EndpointState.FAILED:
            why = "; ".join(
                _with_last_error(s, endpoint_id, a)
                for a in p.of(dom.GiveUp)
                if isinstance(a, dom.GiveUp)
            )
            values = {"failure_message": why}
        if to is dom.EndpointState.READY:
            values = {"failure_message": None}
        moved = repo.set_state(s, endpoint_id, to, **values)
    if moved:
        log.info("endpoint %s is %s", endpoint_id, to)


def _with_last_error(s: Any, endpoint_id: str, give_up: dom.GiveUp) -> str:
    """The give-up sentence with what the last failed replica of that version said (its
    `last_error`: a model server that did not start, a server in ERROR, a stuck boot)."""
    last = s.scalar(
        select(Resource.last_error)
        .where(
            Resource.owner_kind == OwnerKind.ENDPOINT.value,
            Resource.owner_id == endpoint_id,
            Resource.version == give_up.version,
            Resource.last_error.is_not(None),
        )
        .order_by(Resource.id.desc())
        .limit(1)
    )
    return f"{give_up.why} (the last one: {last[:500]})" if last else give_up.why


def _act(endpoint_id: str, backend: ComputeBackend, action: dom.Action) -> None:
    if isinstance(action, dom.Boot):
        _boot(endpoint_id, backend, action.version)
    elif isinstance(action, dom.Advance):
        _advance(endpoint_id, backend, action.replica_id)
    elif isinstance(action, dom.MarkFailed):
        _replica_failed(action.replica_id, action.why)
    elif isinstance(action, dom.Drain):
        with db() as s:
            r = s.get_one(Resource, action.replica_id)
            if r.replica_state == dom.ReplicaState.READY.value:
                r.replica_state = dom.ReplicaState.DRAINING.value
                r.last_health_at = utcnow()  # the drain's start (repo.state_since)
    elif isinstance(action, dom.Delete):
        delete_replica(backend, action.replica_id)
    elif isinstance(action, dom.Serve):
        with db() as s:
            s.execute(
                update(Endpoint)
                .where(Endpoint.id == endpoint_id)
                .values(serving_version=action.version, updated_at=utcnow())
            )
        log.info("endpoint %s now serves version %d", endpoint_id, action.version)
    elif isinstance(action, dom.GiveUp):
        log.warning("endpoint %s: %s", endpoint_id, action.why)


def _replica_failed(replica_id: int, why: str) -> None:
    with db() as s:
        r = s.get_one(Resource, replica_id)
        if r.state != ResourceState.DELETED.value:
            r.replica_state = dom.ReplicaState.FAILED.value
            r.last_error = why[:2000]
    log.warning("replica %d failed: %s", replica_id, why)


# -- boot ---------------------------------------------------------------------------------


def _boot(endpoint_id: str, backend: ComputeBackend, version: int) -> None:
    """Record the replica's row, then create its server (the row first: crash safety)."""
    with db() as s:
        ep = s.get_one(Endpoint, endpoint_id)
        if ep.state == dom.EndpointState.DELETING.value:
            return
        project_id, flavor_name, public_key = ep.project_id, ep.flavor, ep.ssh_public_key or ""
        name = f"stackml-{endpoint_id}-v{version}-{secrets.token_hex(3)}"
        row = Resource(
            owner_kind=OwnerKind.ENDPOINT.value,
            owner_id=endpoint_id,
            project_id=project_id,
            backend=backend.name,
            role=repo.ROLE,
            name=name,
            flavor=flavor_name,
            state=ResourceState.BOOTING.value,
            version=version,
            replica_state=dom.ReplicaState.BOOTING.value,
            creating=secrets.token_hex(4),
        )
        s.add(row)
        s.flush()
        rid = row.id
    flavor = backend.find_flavor(flavor_name)
    if flavor is None:
        _replica_failed(rid, f"flavor {flavor_name!r} is not offered by the {backend.name} backend")
        return
    cfg = jobctx.settings()
    try:
        ref = backend.create_server(
            ServerSpec(
                name=name,
                flavor=flavor,
                image=cfg.default_runtime,
                public_key=public_key,
                tags=(
                    (TAG, endpoint_id),
                    ("stackml-role", "replica"),
                    ("stackml-project", project_id),
                ),
                ingress_ports=(cfg.serving_port,),
            )
        )
    except TransientBackendError:
        raise  # the row stays booting without a server: adopted by name or replaced
    except BackendError as e:
        _replica_failed(rid, f"could not boot the server: {e}")
        return
    with db() as s:
        r = s.get_one(Resource, rid)
        r.server_id, r.creating = ref.id, None
    log.info("endpoint %s: booting replica %s (version %d)", endpoint_id, ref.id, version)


# -- advance ------------------------------------------------------------------------------


def _advance(endpoint_id: str, backend: ComputeBackend, replica_id: int) -> None:
    with db() as s:
        r = s.get_one(Resource, replica_id)
        state = r.replica_state
    if state == dom.ReplicaState.BOOTING.value:
        _look_at_boot(endpoint_id, backend, replica_id)
    elif state == dom.ReplicaState.PROVISIONING.value:
        _provision(endpoint_id, replica_id)
    elif state == dom.ReplicaState.LOADING.value:
        _check_loaded(endpoint_id, replica_id)


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def _look_at_boot(endpoint_id: str, backend: ComputeBackend, replica_id: int) -> None:
    cfg = jobctx.settings()
    with db() as s:
        r = s.get_one(Resource, replica_id)
        server_id, name, created = r.server_id, r.name, _aware(r.created_at)
    age = (datetime.now(UTC) - created).total_seconds()
    if server_id is None:
        # a boot that died between the row and the create: adopt its server by name
        found = [ref for ref in backend.list_servers((TAG, endpoint_id)) if ref.name == name]
        if found:
            with db() as s:
                row = s.get_one(Resource, replica_id)
                row.server_id, row.creating = found[0].id, None
            server_id = found[0].id
        elif age > cfg.boot_deadline:
            _replica_failed(replica_id, "its server was never created")
            return
        else:
            return
    status = backend.get_server(server_id)
    if status.state is ServerState.ACTIVE:
        console_key = backend.capabilities.host_key_source is HostKeySource.CONSOLE
        if status.host_key is None and console_key and age <= cfg.boot_deadline:
            return  # cloud-init prints the host key shortly after ACTIVE
        with db() as s:
            row = s.get_one(Resource, replica_id)
            row.state = ResourceState.ACTIVE.value
            row.active_at = utcnow()
            row.host, row.port, row.username = status.host, status.port, status.username
            row.host_key = status.host_key
            row.serving_port = cfg.serving_port
            row.replica_state = dom.ReplicaState.PROVISIONING.value
        return
    if status.state is ServerState.BUILD and age <= cfg.boot_deadline:
        return
    why = (
        f"still building after {cfg.boot_deadline:.0f}s"
        if status.state is ServerState.BUILD
        else f"server {server_id} is {status.state}: {status.fault or ''}".strip()
    )
    _replica_failed(replica_id, why)


def _target(endpoint_id: str, replica_id: int) -> ssh.SSHTarget:
    with db() as s:
        ep = s.get_one(Endpoint, endpoint_id)
        r = s.get_one(Resource, replica_id)
        if ep.ssh_key_enc is None or r.host is None:
            raise BackendError(f"replica {replica_id} has no reachable server")
        return ssh.SSHTarget(
            host=r.host,
            port=r.port or 22,
            username=r.username or "root",
            private_key_pem=jobctx.decrypt_key(ep.ssh_key_enc),
            host_key=r.host_key,
        )


def serve_document(endpoint_id: str, version: int, runtime: str, host: str) -> dict[str, Any]:
    """serve.json: the model's name, the port, and signed GET URLs for every file of the
    version (from its recorded checksums)."""
    cfg = jobctx.settings()
    with db() as s:
        ep = s.get_one(Endpoint, endpoint_id)
        model = s.get_one(Model, ep.model_id)
        row = repo.version_row(s, ep.model_id, version)
        if row is None:
            raise BackendError(f"model {model.name} has no version {version}")
        project_id, trust_id = ep.project_id, ep.trust_id
        artifact, checksums, name = row.artifact_uri, dict(row.checksums or {}), model.name
    store = jobctx.store(project_id, trust_id)
    prefix = store.key_of(artifact)
    if not prefix.endswith("/"):
        prefix += "/"
    grant = store.grant(prefix, Access.READ, cfg.grant_ttl)
    files = [
        {
            "path": rel,
            "url": sign(grant.url_prefix, grant.query, rel),
            "size": int(meta["size"]),
            "md5": str(meta["md5"]),
        }
        for rel, meta in sorted(checksums.items())
    ]
    return {
        "runtime": runtime,
        "model_name": name,
        "port": cfg.serving_port,
        "bind": host,
        "versions": [{"version": version, "files": files}],
    }


def _provision(endpoint_id: str, replica_id: int) -> None:
    cfg = jobctx.settings()
    with db() as s:
        r = s.get_one(Resource, replica_id)
        version, backend_name, host = r.version or 0, r.backend, r.host or ""
    target = _target(endpoint_id, replica_id)
    try:
        conn = ssh.wait_for_ssh(target, cfg.ssh_deadline)
        jobctx.ship_runner(conn, SERVE_DIR)
        conn.put_bytes((VM_DIR / "model_server.py").read_bytes(), MODEL_SERVER, 0o644)
        runtime = runtime_on_server(backend_name, cfg.default_runtime)
        doc = serve_document(endpoint_id, version, runtime, host)
        conn.put_bytes(json.dumps(doc).encode(), f"{SERVE_DIR}/serve.json", 0o600)
        python = f"{runtime}/bin/python"
        conn.run(jobctx.runner_argv(python, "serve", SERVE_DIR), timeout=cfg.provision_deadline)
    except ssh.RemoteCommandError as e:
        _replica_failed(replica_id, f"starting the model server failed: {e.stderr_tail.strip()}")
        return
    except (ValueError, KeyError, TypeError) as e:
        # a version record the worker cannot turn into signed URLs (its artifact URI or its
        # checksums): the replica fails with why, its version is given up after a few
        _replica_failed(replica_id, f"cannot stage version {version}: {e}")
        return
    except ssh.SSHError as e:
        ssh.drop(target)
        # the server may be slow to answer: the next round tries again, until the plan's
        # stuck_after calls the replica dead
        log.info("replica %d: SSH not yet usable (%s); retrying", replica_id, e)
        return
    with db() as s:
        row = s.get_one(Resource, replica_id)
        if row.replica_state == dom.ReplicaState.PROVISIONING.value:
            row.replica_state = dom.ReplicaState.LOADING.value


def health(host: str, port: int, model: str, version: int) -> str | None:
    """The state TF Serving's status API gives `version` (AVAILABLE when loaded), or None
    when the server does not answer."""
    url = f"http://{host}:{port}/v1/models/{model}"
    try:
        with _OPENER.open(url, timeout=HTTP_TIMEOUT) as resp:
            body = json.loads(resp.read(1 << 20) or b"{}")
    except (OSError, ValueError, urllib.error.URLError):
        return None
    for st in body.get("model_version_status") or []:
        if str(st.get("version")) == str(version):
            return str(st.get("state"))
    return "UNKNOWN"


def warm_up_body(signature: dict[str, Any] | None) -> dict[str, Any] | None:
    """One instance of zeros in the shape of serving_default's inputs (None: no signature)."""
    inputs = (signature or {}).get("inputs") or {}
    if not inputs:
        return None

    def zeros(spec: dict[str, Any]) -> Any:
        dtype = str(spec.get("dtype", "DT_FLOAT"))
        zero: Any = (
            "" if dtype == "DT_STRING" else (0 if "INT" in dtype or dtype == "DT_BOOL" else 0.0)
        )
        if dtype == "DT_BOOL":
            zero = False
        value = zero
        for dim in reversed(list(spec.get("shape") or [])[1:]):
            value = [value] * (int(dim) if isinstance(dim, int) and dim > 0 else 1)
        return value

    if len(inputs) == 1:
        (spec,) = inputs.values()
        return {"instances": [zeros(spec)]}
    return {"instances": [{k: zeros(v) for k, v in inputs.items()}]}


def _check_loaded(endpoint_id: str, replica_id: int) -> None:
    cfg = jobctx.settings()
    with db() as s:
        r = s.get_one(Resource, replica_id)
        ep = s.get_one(Endpoint, endpoint_id)
        model = s.get_one(Model, ep.model_id)
        vrow = repo.version_row(s, ep.model_id, r.version or 0)
        host, port, version = r.host or "", r.serving_port or cfg.serving_port, r.version or 0
        since = _aware(r.active_at or r.created_at)
        signature, name = (vrow.signature if vrow else None), model.name
    state = health(host, port, name, version)
    if state != "AVAILABLE":
        if (datetime.now(UTC) - since).total_seconds() > cfg.serving_load_deadline:
            _replica_failed(
                replica_id,
                f"version {version} not AVAILABLE after {cfg.serving_load_deadline:.0f}s "
                f"(status: {state or 'no answer'})",
            )
        return
    body = warm_up_body(signature)
    if body is not None:
        url = f"http://{host}:{port}/v1/models/{name}/versions/{version}:predict"
        req = urllib.request.Request(
            url,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with _OPENER.open(req, timeout=cfg.command_timeout) as resp:
                resp.read()
        except urllib.error.HTTPError as e:
            if e.code >= 500:
                return  # not warm yet: the next round tries again
            # a 4xx: our guess of an input did not fit the model; it loaded all the same
        except OSError:
            return
    with db() as s:
        row = s.get_one(Resource, replica_id)
        if row.replica_state == dom.ReplicaState.LOADING.value:
            row.replica_state = dom.ReplicaState.READY.value
            row.ready_at = row.last_health_at = utcnow()
            row.health_failures = 0
    log.info("endpoint %s: replica %d ready (version %d)", endpoint_id, replica_id, version)


# -- delete -------------------------------------------------------------------------------


def delete_replica(backend: ComputeBackend, replica_id: int) -> bool:
    """Delete the replica's server until the backend confirms; True once the row is deleted."""
    cfg = jobctx.settings()
    with db() as s:
        r = s.get_one(Resource, replica_id)
        if r.state == ResourceState.DELETED.value:
            return True
        r.state = ResourceState.DELETING.value
        server_id, name, owner, created = r.server_id, r.name, r.owner_id, _aware(r.created_at)
        host, port = r.host, r.port
    if server_id is None:
        found = [ref for ref in backend.list_servers((TAG, owner)) if ref.name == name]
        if found:
            server_id = found[0].id
        elif (datetime.now(UTC) - created).total_seconds() < cfg.boot_deadline + 30:
            return False  # a create may still be under way: look again later
    if server_id is not None:
        backend.delete_server(server_id)
        deadline = time.monotonic() + DELETE_DEADLINE
        while backend.get_server(server_id).state is not ServerState.DELETED:
            if time.monotonic() > deadline:
                with db() as s:
                    s.get_one(Resource, replica_id).delete_attempts += 1
                return False
            time.sleep(0.2)
    if host:
        ssh.drop_host(host, port or 22)
    with db() as s:
        r = s.get_one(Resource, replica_id)
        r.state, r.deleted_at = ResourceState.DELETED.value, utcnow()
    return True


# -- once DELETED: the tag's sweep, the trust ----------------------------------------------


def _finish_deleted(endpoint_id: str, backend: ComputeBackend, trust_id: str | None) -> None:
    """The endpoint is DELETED (no replica row left): sweep its tag, then let its trust go.
    Without a trust a failed sweep is left to the reaper (the service project is the
    reconciler's to list); with one, the reconciler retries the whole release."""
    if trust_id is not None:
        release_trust(endpoint_id, trust_id)
        return
    try:
        sweep(backend, endpoint_id)
    except BackendError as e:
        log.warning(
            "endpoint %s: its tag is not swept (the reaper deletes the rest): %s", endpoint_id, e
        )


def sweep(backend: ComputeBackend, endpoint_id: str) -> list[str]:
    """Delete what the backend still lists under the endpoint's tag, once the endpoint is
    DELETED (no row names a server of it any more): a server whose create answered an error
    after the cloud had made it. Waits for each to be gone; TransientBackendError when one is
    not within DELETE_DEADLINE. The ids deleted."""
    deleted = []
    for ref in backend.list_servers((TAG, endpoint_id)):
        if backend.get_server(ref.id).state is ServerState.DELETED:
            continue  # listed while on its way out (a cloud that soft-deletes)
        backend.delete_server(ref.id)
        deadline = time.monotonic() + DELETE_DEADLINE
        while backend.get_server(ref.id).state is not ServerState.DELETED:
            if time.monotonic() > deadline:
                raise TransientBackendError(f"server {ref.id} ({ref.name}) not yet deleted")
            time.sleep(0.2)
        log.warning(
            "endpoint %s: deleted server %s (%s) that no record named",
            endpoint_id,
            ref.id,
            ref.name,
        )
        deleted.append(ref.id)
    return deleted


def release_trust(endpoint_id: str, trust_id: str, *, swept: bool = False) -> bool:
    """Delete a DELETED endpoint's Keystone trust: first sweep its tag through the trust
    (unless the caller has just done so), since after the trust nothing of stackml sees its
    project; then delete the trust (through itself) and clear `endpoints.trust_id`. False when
    the endpoint is not DELETED, or the sweep or Keystone failed: the reconciler retries every
    DELETED endpoint's trust until it is gone (repo.trust_debts)."""
    with db() as s:
        ep = s.get(Endpoint, endpoint_id)
        if ep is None or ep.trust_id != trust_id:
            return True  # released already (by another round)
        if ep.state != dom.EndpointState.DELETED.value:
            return False  # its replicas may still be booted or deleted through the trust
    backend = jobctx.compute(trust_id)
    if not swept:
        try:
            sweep(backend, endpoint_id)
        except BackendError as e:
            if not trusts.refused(e):
                log.warning(
                    "endpoint %s: trust kept until its tag is swept (retried): %s", endpoint_id, e
                )
                return False
            # the trust no longer logs in: nothing can be seen through it; `delete` says why
    try:
        outcome = trusts.delete(jobctx.settings(), trust_id, trusts.logged_in(backend, trust_id))
    except trusts.TrustUnavailable as e:
        log.warning(
            "endpoint %s: trust not deleted yet (the reconciler retries): %s", endpoint_id, e
        )
        return False
    registry.forget_trust(trust_id)
    with db() as s:
        cleared = repo.clear_trust(s, endpoint_id, trust_id)
    if cleared:
        log.info(
            "endpoint %s: %s",
            endpoint_id,
            "Keystone trust deleted"
            if outcome == "deleted"
            else "Keystone trust already gone (deleted by its user, or no longer usable)",
        )
    return True


# -- the reconciler's part ----------------------------------------------------------------


def check_health(endpoint_id: str) -> bool:
    """Probe every ready replica once: a success resets its count, a failure (or a vanished
    server) adds one. True when some replica now needs the converge step."""
    cfg = jobctx.settings()
    with db() as s:
        ep = s.get(Endpoint, endpoint_id)
        if ep is None:
            return False
        trust_id = ep.trust_id
        name = s.get_one(Model, ep.model_id).name
        rows = [
            (r.id, r.server_id, r.host, r.serving_port, r.version)
            for r in repo.replicas(s, endpoint_id)
            if r.replica_state == dom.ReplicaState.READY.value
        ]
    backend = jobctx.compute(trust_id)
    needs = False
    for rid, server_id, host, port, version in rows:
        ok, gone = False, False
        if server_id is not None and host and port:
            gone = backend.get_server(server_id).state is not ServerState.ACTIVE
            ok = not gone and health(host, port, name, version or 0) == "AVAILABLE"
        with db() as s:
            r = s.get_one(Resource, rid)
            if r.replica_state != dom.ReplicaState.READY.value:
                continue
            r.last_health_at = utcnow()
            r.health_failures = 0 if ok else (r.health_failures or 0) + 1
            if gone:  # its server vanished: nothing to wait for
                r.health_failures = max(r.health_failures, cfg.serving_health_failures)
            if r.health_failures >= cfg.serving_health_failures:
                needs = True
    return needs


def stalled(before: datetime) -> list[str]:
    """Live endpoints without a live lease that are not settled (or whose label moved), whose
    last progress is older than `before`; and READY ones whose target moved at once."""
    out = []
    with db() as s:
        eps = list(
            s.scalars(
                select(Endpoint).where(
                    Endpoint.state != dom.EndpointState.DELETED.value, _no_live_lease()
                )
            )
        )
        for ep in eps:
            moved = (
                ep.state in (dom.EndpointState.READY.value,)
                and ep.traffic is None
                and repo.target_of(s, ep) not in (None, ep.serving_version)
            )
            if moved:
                repo.set_state(s, ep.id, dom.EndpointState.UPDATING)
                out.append(ep.id)
                continue
            if ep.state in (dom.EndpointState.READY.value, dom.EndpointState.FAILED.value):
                continue
            last = _aware(ep.last_progress_at)
            if last < _aware(before):
                out.append(ep.id)
    return out


def ready_endpoints() -> list[str]:
    with db() as s:
        return list(
            s.scalars(
                select(Endpoint.id).where(
                    Endpoint.state.in_(
                        [dom.EndpointState.READY.value, dom.EndpointState.UPDATING.value]
                    )
                )
            )
        )


def known_endpoints() -> dict[str, str]:
    with db() as s:
        return dict(s.execute(select(Endpoint.id, Endpoint.state)).all())
