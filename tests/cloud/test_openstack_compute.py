"""The openstack compute backend (openstacksdk) against the emulator process, faults included."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from service.backends.compute.openstack import (
    CloudError,
    ComputeLimits,
    OpenStackBackend,
    gpus_of,
    parse_host_key,
    template,
)
from service.backends.interfaces import Flavor, ServerSpec, ServerState, ServerStatus
from service.domain.errors import BackendError, QuotaExceeded, ServerNotFound
from tests.cloud.emulator_fixtures import (
    IMAGE,
    RUNTIME_KEY,
    EmulatorProcess,
    running_emulator,
    sdk_connection,
)
from workers import ssh

NO_VALID_HOST = "No valid host was found. There are not enough hosts available."
TAGS = (("stackml-job", "j-1"), ("stackml-role", "chief"), ("stackml-project", "p-1"))


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorProcess]:
    with running_emulator() as emu:
        yield emu


@pytest.fixture
def emu(emulator: EmulatorProcess) -> Iterator[EmulatorProcess]:
    """After each test: no fault armed; no server, keypair, floating IP or sandbox left."""
    yield emulator
    ssh.close_all()
    emulator.clear_faults()
    emulator.assert_clean()


def make_backend(emu: EmulatorProcess, **kw: Any) -> OpenStackBackend:
    kw.setdefault("network", "private")
    kw.setdefault("images", {RUNTIME_KEY: IMAGE, "cirros": "cirros"})
    kw.setdefault("call_timeout", 15.0)
    return OpenStackBackend(lambda: sdk_connection(emu), **kw)


@pytest.fixture
def backend(emu: EmulatorProcess) -> OpenStackBackend:
    return make_backend(emu, prices={"g1.a100x1": 2.5, "g1.a100x2": 5.0, "m1.small": 0.05})


@pytest.fixture(scope="module")
def keypair() -> tuple[str, str]:
    return ssh.generate_keypair()


def spec(
    backend: OpenStackBackend,
    public_key: str,
    name: str = "stackml-j-1-chief",
    flavor: str = "m1.small",
    image: str = RUNTIME_KEY,
    **kw: Any,
) -> ServerSpec:
    found = backend.find_flavor(flavor)
    assert found is not None
    return ServerSpec(name=name, flavor=found, image=image, public_key=public_key, tags=TAGS, **kw)


def wait_state(backend: OpenStackBackend, server_id: str, timeout: float = 20.0) -> ServerStatus:
    """Poll as the allocate step does, with a deadline, until the server leaves BUILD."""
    deadline = time.monotonic() + timeout
    while (st := backend.get_server(server_id)).state is ServerState.BUILD:
        assert time.monotonic() < deadline, f"server {server_id} stayed in BUILD"
        time.sleep(0.05)
    return st


def delete_and_confirm(backend: OpenStackBackend, server_id: str) -> None:
    backend.delete_server(server_id)
    deadline = time.monotonic() + 15
    while backend.get_server(server_id).state is not ServerState.DELETED:
        assert time.monotonic() < deadline, f"server {server_id} was not deleted"
        time.sleep(0.05)


# --------------------------------------------------------------------------- flavors


def test_flavors_carry_gpus_from_extra_specs_and_configured_prices(backend: OpenStackBackend):
    flavors = {f.name: f for f in backend.flavors()}
    assert flavors["m1.small"] == Flavor("m1.small", 1, 2048, 20, price_per_hour=0.05)
    assert (flavors["g1.a100x1"].gpus, flavors["g1.a100x1"].gpu_type) == (1, "a100")
    assert (flavors["g1.a100x2"].gpus, flavors["g1.a100x2"].gpu_type) == (2, "a100")
    assert flavors["g1.a100x2"].price_per_hour == 5.0
    assert (flavors["g1.vgpu"].gpus, flavors["g1.vgpu"].gpu_type) == (1, "vgpu")

    assert [f.name for f in backend.resolve_flavor(1, "a100")] == ["g1.a100x1", "g1.a100x2"]
    assert [f.name for f in backend.resolve_flavor(2, "a100")] == ["g1.a100x2"]
    assert [f.name for f in backend.resolve_flavor(1)] == ["g1.vgpu", "g1.a100x1", "g1.a100x2"]
    assert backend.resolve_flavor(4) == []
    assert [f.name for f in backend.resolve_flavor(0)] == ["m1.small", "m1.medium"]
    assert backend.find_flavor("g1.a100x1") == flavors["g1.a100x1"]


def test_gpu_names_map_through_the_configured_aliases(emu: EmulatorProcess):
    backend = make_backend(emu, gpu_aliases={"a100": "nvidia-a100", "VGPU": "grid"})
    types = {f.name: f.gpu_type for f in backend.flavors() if f.gpus}
    assert types == {"g1.a100x1": "nvidia-a100", "g1.a100x2": "nvidia-a100", "g1.vgpu": "grid"}
    assert [f.name for f in backend.resolve_flavor(1, "nvidia-a100")] == ["g1.a100x1", "g1.a100x2"]
    # other clouds' spellings
    assert gpus_of({"resources:PGPU": "2"}, {}) == (2, "pgpu")
    assert gpus_of({"pci_passthrough:alias": "a100:1,t4:2"}, {}) == (3, "t4")
    assert gpus_of({"resources:CUSTOM_A100": "4"}, {"CUSTOM_A100": "a100"}) == (4, "a100")
    assert gpus_of(
        {"resources:VGPU": "1", "trait:CUSTOM_NVIDIA_A100": "required"},
        {"CUSTOM_NVIDIA_A100": "a100"},
    ) == (1, "a100")
    assert gpus_of({"hw:cpu_policy": "dedicated"}, {}) == (0, None)


# --------------------------------------------------------------------------- a job's server


def test_boot_reach_and_delete_like_a_job(
    emu: EmulatorProcess, backend: OpenStackBackend, keypair: tuple[str, str]
):
    pem, pub = keypair
    backend.flavors()  # warm: what a job costs is what follows
    backend._image_id(RUNTIME_KEY)
    backend._network_id("private")
    backend._security_group_id()
    backend.calls.reset()

    started = time.time()
    ref = backend.create_server(spec(backend, pub))
    assert ref.name == "stackml-j-1-chief" and ref.tags == TAGS
    assert backend.calls.snapshot() == {
        "POST /compute/v2.1/os-keypairs": 1,
        "POST /compute/v2.1/servers": 1,
        "DELETE /compute/v2.1/os-keypairs/{id}": 1,
    }
    # the per-job keypair only lives for the create call: nothing of it can leak later
    assert emu.state()["keypairs"] == {}

    st = wait_state(backend, ref.id)
    assert st.state is ServerState.ACTIVE, st.fault
    assert st.host and st.host.startswith("127.77.") and st.port == 22
    assert st.username == "stackml" and st.fault is None and st.fault_reason is None
    assert st.created_at is not None and abs(st.created_at - started) < 5
    console = backend.console_log(ref.id)
    assert st.host_key == parse_host_key(console)
    assert st.host_key and st.host_key.startswith("ssh-ed25519 ")
    server = emu.state()["servers"][ref.id]
    assert server["metadata"] == dict(TAGS)
    assert sorted(server["tags"]) == sorted(["stackml", *(f"{k}={v}" for k, v in TAGS)])
    assert server["security_groups"] == ["stackml-ssh"]

    target = ssh.SSHTarget(st.host, st.port, st.username, pem, st.host_key)
    with ssh.wait_for_ssh(target, 15) as conn:
        assert conn.run("id -un", timeout=10).text.strip() == "stackml"
        assert conn.exists(f"/opt/stackml/runtimes/{RUNTIME_KEY}/bin/python")
    ssh.close_all()

    assert [r.id for r in backend.list_servers(("stackml-job", "j-1"))] == [ref.id]
    assert [r.id for r in backend.list_servers()] == [ref.id]
    assert backend.list_servers(("stackml-job", "j-2")) == []
    assert backend.list_servers(("stackml-role", "chief"))[0].tags == TAGS

    delete_and_confirm(backend, ref.id)
    backend.delete_server(ref.id)  # idempotent
    assert backend.get_server(ref.id) == ServerStatus(id=ref.id, state=ServerState.DELETED)
    with pytest.raises(ServerNotFound):
        backend.console_log(ref.id)


def test_security_group_is_ensured_once_and_idempotently(
    emu: EmulatorProcess, backend: OpenStackBackend
):
    conn = sdk_connection(emu)
    first = backend._security_group_id()
    again = make_backend(emu)._security_group_id()  # another worker process, same cloud
    assert first == again
    [sg] = conn.network.security_groups(name="stackml-ssh")
    ssh_rules = [r for r in sg.security_group_rules if r["direction"] == "ingress"]
    assert [(r["protocol"], r["port_range_min"], r["remote_ip_prefix"]) for r in ssh_rules] == [
        ("tcp", 22, "0.0.0.0/0")
    ]


def test_a_peer_group_is_a_security_group_of_its_own_admitting_its_members_alone(
    emu: EmulatorProcess, backend: OpenStackBackend, keypair: tuple[str, str]
):
    conn = sdk_connection(emu)
    assert backend.peer_network is None
    peers = {"peer_group": "j-1", "peer_ports": (2222, 2223)}
    chief = backend.create_server(spec(backend, keypair[1], image="cirros", **peers))
    backend.calls.reset()
    worker = backend.create_server(
        spec(backend, keypair[1], name="stackml-j-1-worker-1", image="cirros", **peers)
    )
    # the second member finds the group and its rules: one list, nothing made
    calls = backend.calls.snapshot()
    assert not any(k.startswith("POST /network") for k in calls), calls
    assert sum(n for k, n in calls.items() if k.startswith("GET /network")) == 1, calls
    [sg] = conn.network.security_groups(name="stackml-peers-j-1")
    ingress = sorted(
        (r["protocol"], r["port_range_min"], r["port_range_max"], r["remote_group_id"])
        for r in sg.security_group_rules
        if r["direction"] == "ingress"
    )
    # only the group's own members, only on the peer ports: no address range is admitted
    assert ingress == [("tcp", 2222, 2222, sg.id), ("tcp", 2223, 2223, sg.id)]
    servers = emu.state()["servers"]
    for ref in (chief, worker):
        assert servers[ref.id]["security_groups"] == ["stackml-ssh", "stackml-peers-j-1"]
        st = wait_state(backend, ref.id)
        assert st.state is ServerState.ACTIVE and st.peer_host == st.host  # the fixed address
    # a server of no group is in the SSH group alone
    lone = backend.create_server(
        spec(backend, keypair[1], name="stackml-j-2-chief", image="cirros")
    )
    assert emu.state()["servers"][lone.id]["security_groups"] == ["stackml-ssh"]

    # while a member's port holds it, Neutron refuses (409): teardown retries
    with pytest.raises(CloudError, match="in use"):
        backend.release_peer_group("j-1")
    assert len(list(conn.network.security_groups(name="stackml-peers-j-1"))) == 1
    for ref in (chief, worker, lone):
        delete_and_confirm(backend, ref.id)
    backend.release_peer_group("j-1")
    assert list(conn.network.security_groups(name="stackml-peers-j-1")) == []
    backend.release_peer_group("j-1")  # idempotent


def test_floating_ip_when_configured(
    emu: EmulatorProcess, backend: OpenStackBackend, keypair: tuple[str, str]
):
    fb = make_backend(emu, floating_network="public")
    ref = fb.create_server(spec(fb, keypair[1], image="cirros"))
    st = wait_state(fb, ref.id)
    assert st.state is ServerState.ACTIVE
    conn = sdk_connection(emu)
    [fip] = conn.network.ips(description=f"stackml server {ref.id}")
    assert st.host == fip.floating_ip_address and fip.port_id
    assert fb.get_server(ref.id).host == st.host  # now read from the server's addresses
    assert len(list(conn.network.ips())) == 1  # polling again made no second one
    delete_and_confirm(fb, ref.id)
    assert list(conn.network.ips()) == []


def test_limits(emu: EmulatorProcess, backend: OpenStackBackend, keypair: tuple[str, str]):
    before = backend.limits()
    assert before == ComputeLimits(10, 0, 64, 0, 262144, 0)
    ref = backend.create_server(spec(backend, keypair[1], flavor="g1.a100x1", image="cirros"))
    after = backend.limits()
    assert (after.instances_used, after.cores_used, after.ram_used_mb) == (1, 8, 32768)
    big = backend.find_flavor("g1.a100x2")
    assert big is not None and after.fits(big) and not after.fits(big, count=4)
    wait_state(backend, ref.id)
    delete_and_confirm(backend, ref.id)


# --------------------------------------------------------------------------- Nova's faults


def test_no_valid_host_is_an_error_with_its_reason(
    emu: EmulatorProcess, backend: OpenStackBackend, keypair: tuple[str, str]
):
    emu.inject("no_valid_host", match={"flavor": "g1.a100x2"})
    ref = backend.create_server(spec(backend, keypair[1], flavor="g1.a100x2"))
    st = wait_state(backend, ref.id)
    assert st.state is ServerState.ERROR
    assert st.fault == NO_VALID_HOST and st.fault_reason == "no_valid_host"
    assert st.host_key is None
    delete_and_confirm(backend, ref.id)  # the worker deletes it, then tries the next flavor
    retry = backend.create_server(spec(backend, keypair[1], flavor="g1.a100x1", image="cirros"))
    assert wait_state(backend, retry.id).state is ServerState.ACTIVE
    delete_and_confirm(backend, retry.id)


def test_quota_exceeded_raises_with_novas_message(
    emu: EmulatorProcess, backend: OpenStackBackend, keypair: tuple[str, str]
):
    emu.inject("quota_exceeded", match={"flavor": "g1.a100x2"})
    with pytest.raises(QuotaExceeded) as exc:
        backend.create_server(spec(backend, keypair[1], flavor="g1.a100x2"))
    assert exc.value.reason == "quota_exceeded"
    assert "Quota exceeded for cores: Requested 16, but already used 64 of 64 cores" in str(
        exc.value
    )
    assert exc.value.__cause__ is not None  # chained to openstacksdk's ForbiddenException
    assert backend.list_servers() == []


def test_slow_build_stays_build_then_becomes_active(
    emu: EmulatorProcess, backend: OpenStackBackend, keypair: tuple[str, str]
):
    emu.inject("slow_build", match={"name_regex": "-slow$"}, seconds=1.0)
    ref = backend.create_server(spec(backend, keypair[1], name="stackml-j-1-slow", image="cirros"))
    st = backend.get_server(ref.id)
    assert st.state is ServerState.BUILD and st.host is None and st.host_key is None
    assert wait_state(backend, ref.id).state is ServerState.ACTIVE
    delete_and_confirm(backend, ref.id)


def test_stuck_in_build_past_the_deadline_is_deleted_cleanly(
    emu: EmulatorProcess, backend: OpenStackBackend, keypair: tuple[str, str]
):
    emu.inject("slow_build", match={"name_regex": "-stuck$"}, seconds=600)
    ref = backend.create_server(spec(backend, keypair[1], name="stackml-j-1-stuck"))
    deadline = time.monotonic() + 0.5  # the worker's boot deadline, shortened
    while time.monotonic() < deadline:
        assert backend.get_server(ref.id).state is ServerState.BUILD
        time.sleep(0.1)
    delete_and_confirm(backend, ref.id)


def test_vanished_server_reports_deleted_and_leaves_nothing(
    emu: EmulatorProcess, keypair: tuple[str, str]
):
    fb = make_backend(emu, floating_network="public")
    ref = fb.create_server(spec(fb, keypair[1], name="stackml-j-1-gone", image="cirros"))
    assert wait_state(fb, ref.id).state is ServerState.ACTIVE
    emu.inject("vanish", match={"name_regex": "-gone$"})
    st = fb.get_server(ref.id)
    assert st.state is ServerState.DELETED  # the worker fails the job with server_lost
    assert fb.list_servers(("stackml-job", "j-1")) == []
    fb.delete_server(ref.id)  # teardown still runs: it removes the orphaned floating IP
    assert list(sdk_connection(emu).network.ips()) == []


def test_delete_that_fails_twice_surfaces_then_succeeds(
    emu: EmulatorProcess, backend: OpenStackBackend, keypair: tuple[str, str]
):
    ref = backend.create_server(
        spec(backend, keypair[1], name="stackml-j-1-sticky", image="cirros")
    )
    assert wait_state(backend, ref.id).state is ServerState.ACTIVE
    emu.inject("delete_fails", match={"name_regex": "-sticky$"}, count=2)
    for _ in range(2):
        with pytest.raises(CloudError) as exc:
            backend.delete_server(ref.id)
        assert isinstance(exc.value, BackendError) and exc.value.__cause__ is not None
        assert backend.get_server(ref.id).state is ServerState.ACTIVE
    delete_and_confirm(backend, ref.id)


# --------------------------------------------------------------------------- transport


def test_every_call_is_bounded_by_the_call_timeout():
    """A cloud that accepts connections and never answers: CloudError after call_timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]

        def conn() -> Any:
            import openstack.config
            from openstack.connection import Connection

            region = openstack.config.get_cloud_region(
                load_yaml_config=False,
                load_envvars=False,
                auth_type="none",
                compute_endpoint_override=f"http://127.0.0.1:{port}/compute/v2.1",
            )
            return Connection(config=region)

        backend = OpenStackBackend(conn, network="private", images={}, call_timeout=1.0)
        started = time.monotonic()
        with pytest.raises(CloudError) as exc:
            backend.get_server("00000000-0000-0000-0000-000000000000")
        assert time.monotonic() - started < 10
        assert exc.value.__cause__ is not None


def test_call_kinds_are_templated():
    assert template("http://h:1/compute/v2.1/servers/0f2c1e4a-3b5d-4c6e-8f70-123456789abc") == (
        "/compute/v2.1/servers/{id}"
    )
    assert template("http://h/compute/v2.1/servers/detail?tags=a%3Db&limit=5") == (
        "/compute/v2.1/servers/detail?limit&tags"
    )
    assert template("http://h/compute/v2.1/os-keypairs/stackml-j-1-chief") == (
        "/compute/v2.1/os-keypairs/{id}"
    )
    assert template("http://h/compute/v2.1/servers/abc/action") == (
        "/compute/v2.1/servers/{id}/action"
    )


# --------------------------------------------------------------------------- through Keystone


def test_through_keystone_token_and_catalog(devcloud_emulator: Any, keypair: tuple[str, str]):
    """The devcloud's emulator behind real Keystone: the demo user's token, the catalog's
    compute/network/image endpoints; its server lives in the demo project; only admin may
    inject faults; a server of another project is a 404."""
    from openstack import exceptions as sdk_exc

    from service.backends.compute.sandbox import leak_report

    cloud = devcloud_emulator
    demo = OpenStackBackend(
        lambda: cloud.connection("devcloud-demo"),
        network="private",
        images={RUNTIME_KEY: IMAGE},
        call_timeout=15.0,
    )
    admin = cloud.connection("devcloud")
    alt = cloud.connection("devcloud-alt")
    assert admin.compute.get_endpoint().startswith(cloud.emulator_url)  # from the catalog
    ref = None
    try:
        ref = demo.create_server(spec(demo, keypair[1], name="stackml-ks-chief"))
        st = wait_state(demo, ref.id)
        assert st.state is ServerState.ACTIVE, st.fault
        server = admin.compute.get_server(ref.id)
        assert server.project_id == cloud.projects["demo"]
        with pytest.raises(sdk_exc.NotFoundException):
            alt.compute.get_server(ref.id)  # another project's server does not exist for it
        assert list(alt.compute.servers()) == []
        target = ssh.SSHTarget(st.host or "", st.port, "stackml", keypair[0], st.host_key)
        with ssh.wait_for_ssh(target, 15) as conn:
            assert conn.exists(f"/opt/stackml/runtimes/{RUNTIME_KEY}/bin/python")
        ssh.close_all()

        fault = {"kind": "vanish", "match": {"name_regex": "^stackml-ks-"}}
        faults_url = f"{cloud.emulator_url}/compute/_stackml/faults"
        r = cloud.connection("devcloud-demo").session.post(faults_url, json=fault, raise_exc=False)
        assert r.status_code == 403 and "forbidden" in r.json()  # a member may not
        r = admin.session.post(faults_url, json=fault, raise_exc=False)
        assert r.status_code == 201, r.text
        assert demo.get_server(ref.id).state is ServerState.DELETED
    finally:
        if ref is not None:
            delete_and_confirm(demo, ref.id)
        with contextlib.suppress(Exception):
            admin.session.delete(f"{cloud.emulator_url}/compute/_stackml/faults", raise_exc=False)
    assert list(admin.compute.servers(all_projects=True)) == []
    assert list(admin.network.ips()) == []
    assert leak_report(cloud.sandbox_root) == []
