"""What acting through a Keystone trust costs a job (tenancy: project) against real Keystone and
the Nova emulator (a devcloud on free loopback ports in a scratch directory).

Each round is one single-server job done the way the workers do it: boot, poll until ACTIVE with
the host key, delete, confirm; through a fresh trust (created with the user's token, used
through a new backend the way a worker's first step for that job does, sharing the project's
lookups with the earlier trusts of the project, deleted at the end) and,
as the baseline in the same run, through the service user's own backend (tenancy: service) with
warm caches. Prints the Keystone round trips of the trust (create, delete) and the Nova /
Neutron / Glance calls per job, the seconds per job of both and their ratio, then one JSON line.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from devcloud.cloud import DevCloud, default_venv_root  # noqa: E402
from service import trusts  # noqa: E402
from service.backends.compute.openstack import LookupCache, OpenStackBackend  # noqa: E402
from service.backends.interfaces import ServerSpec, ServerState  # noqa: E402
from service.config import Settings  # noqa: E402
from tests.envutil import environ  # noqa: E402
from workers import ssh  # noqa: E402

CACHED_VENVS = Path("/var/cache/stackml/devcloud-venvs")
ROUNDS = 8
POLL = 0.2  # the allocate step's poll interval
DEADLINE = 60.0
TAGS = (("stackml-job", "bench"), ("stackml-role", "chief"), ("stackml-project", "bench"))


def one_job(backend: OpenStackBackend, public_key: str, name: str) -> dict[str, int]:
    """What the allocate and teardown steps do with the backend for one single-server job, on
    the emulator's instant boots: the calls a trust adds, not a boot's polling (that is
    bench_openstack_calls.py's subject)."""
    backend.calls.reset()
    flavor = backend.find_flavor("m1.small")
    assert flavor is not None
    ref = backend.create_server(
        ServerSpec(name=name, flavor=flavor, image="cirros", public_key=public_key, tags=TAGS)
    )
    deadline = time.monotonic() + DEADLINE
    status = backend.get_server(ref.id)
    while status.state is ServerState.BUILD and time.monotonic() < deadline:
        time.sleep(POLL)
        status = backend.get_server(ref.id)
    assert status.state is ServerState.ACTIVE and status.host_key, status
    backend.delete_server(ref.id)
    while backend.get_server(ref.id).state is not ServerState.DELETED:
        assert time.monotonic() < deadline, "delete not confirmed"
        time.sleep(POLL)
    # teardown's sweep before the trust goes: what is still listed under the job's tag
    assert backend.list_servers(TAGS[0]) == []
    return backend.calls.snapshot()


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="bench-trusts-", dir="/var/tmp"))
    work.chmod(0o755)
    venvs = CACHED_VENVS if CACHED_VENVS.exists() else default_venv_root()
    cloud = DevCloud(work / "devcloud", venv_root=venvs)
    figures: dict[str, Any] = {"bench": "trusts"}
    try:
        cloud.up(keystone_port=0, swift_port=0, emulator_port=0, emulator=True)
        with environ({"OS_CLIENT_CONFIG_FILE": str(cloud.clouds_yaml)}):
            s = Settings(
                auth="keystone",
                compute="openstack",
                openstack_cloud="devcloud-stackml",
                openstack_network="private",
            )
            demo = cloud.connection("devcloud-demo")
            token, user, project = (
                str(demo.session.get_token()),
                str(demo.current_user_id),
                str(demo.current_project_id),
            )
            _, pub = ssh.generate_keypair()
            images = {"cirros": "cirros"}
            lookups: dict[str, LookupCache] = {}
            service = OpenStackBackend("devcloud-stackml", network="private", images=images)
            one_job(service, pub, "stackml-bench-warmup-chief")  # the baseline runs warm
            create_s, delete_s, trust_job_s, base_job_s = [], [], [], []
            trust_calls, base_calls = [], []
            for i in range(ROUNDS):
                t0 = time.perf_counter()
                base_calls.append(sum(one_job(service, pub, f"stackml-base-{i}-chief").values()))
                base_job_s.append(time.perf_counter() - t0)

                t0 = time.perf_counter()
                trust_id = trusts.create(
                    s, token=token, user_id=user, project_id=project, roles=frozenset({"member"})
                )
                t1 = time.perf_counter()
                # what registry.compute(trust_id=...) makes: a new backend for a new trust, with
                # the project's lookups shared by every trust of the project
                backend = OpenStackBackend(
                    lambda tid=trust_id: trusts.connect("devcloud-stackml", tid, 30.0),  # type: ignore[misc]
                    network="private",
                    images=images,
                    shared_cache=lambda p: lookups.setdefault(p, LookupCache()),
                )
                trust_calls.append(sum(one_job(backend, pub, f"stackml-trust-{i}-chief").values()))
                t2 = time.perf_counter()
                # as teardown does: through the backend's connection, logged in already
                assert trusts.delete(s, trust_id, backend.connection()) == "deleted"
                t3 = time.perf_counter()
                create_s.append(t1 - t0)
                delete_s.append(t3 - t2)
                trust_job_s.append(t3 - t0)
        med = statistics.median
        print(f"rounds: {ROUNDS} single-server jobs each way")
        print(f"trust create (POST /v3/OS-TRUST/trusts)   median {med(create_s) * 1000:7.1f} ms")
        print(f"trust delete (through the trust)           median {med(delete_s) * 1000:7.1f} ms")
        print(
            f"OpenStack calls per job through a fresh trust: first of the project "
            f"{trust_calls[0]}, later ones {med(trust_calls[1:]):.0f} (the project's lookups "
            f"shared); service user warm {med(base_calls):.0f}"
        )
        print(
            f"seconds per job: through a trust {med(trust_job_s):.3f} (create..delete), "
            f"service user {med(base_job_s):.3f}; ratio {med(trust_job_s) / med(base_job_s):.2f}x"
        )
        figures.update(
            rounds=ROUNDS,
            trust_create_ms=round(med(create_s) * 1000, 1),
            trust_delete_ms=round(med(delete_s) * 1000, 1),
            calls_per_job_trust_first=trust_calls[0],
            calls_per_job_trust=med(trust_calls[1:]),
            calls_per_job_service_warm=med(base_calls),
            job_s_trust=round(med(trust_job_s), 3),
            job_s_service=round(med(base_job_s), 3),
            ratio=round(med(trust_job_s) / med(base_job_s), 3),
        )
    finally:
        cloud.down()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
