"""The Nova/Neutron/Glance emulator, as a process, against real openstacksdk and raw HTTP."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openstack import exceptions as sdk_exc

from devcloud.emulator import cleanup
from devcloud.emulator.app import Emulator
from devcloud.emulator.catalog import EmulatorConfig
from service.backends.compute.openstack import parse_host_key
from service.backends.compute.sandbox import leak_report
from tests.cloud.emulator_fixtures import (
    IMAGE,
    RUNTIME_KEY,
    EmulatorProcess,
    ensure_runtime,
    new_base,
    running_emulator,
    sdk_connection,
    wait_status,
)
from workers import ssh

NO_VALID_HOST = "No valid host was found. There are not enough hosts available."


@pytest.fixture(scope="module")
def emulator() -> Iterator[EmulatorProcess]:
    with running_emulator("--quota", "instances=10,cores=40,ram=262144") as emu:
        yield emu


@pytest.fixture
def emu(emulator: EmulatorProcess) -> Iterator[EmulatorProcess]:
    """The module's emulator; after the test nothing may be left (servers, keypairs, floating
    IPs, sandboxes) and no fault stays armed."""
    yield emulator
    emulator.clear_faults()
    emulator.assert_clean()


@pytest.fixture
def conn(emu: EmulatorProcess) -> Any:
    return sdk_connection(emu)


@pytest.fixture(scope="module")
def keypair() -> tuple[str, str]:
    return ssh.generate_keypair()


def boot(conn: Any, name: str, *, flavor: str = "m1.small", image: str = IMAGE, **kw: Any) -> Any:
    net = next(conn.network.networks(name="private"))
    return conn.compute.create_server(
        name=name,
        flavor_id=conn.compute.find_flavor(flavor).id,
        image_id=conn.image.find_image(image).id,
        networks=[{"uuid": net.id}],
        **kw,
    )


def delete_and_wait(conn: Any, server_id: str) -> None:
    conn.compute.delete_server(server_id)
    deadline = time.monotonic() + 15
    while True:
        try:
            conn.compute.get_server(server_id)
        except sdk_exc.NotFoundException:
            return
        assert time.monotonic() < deadline, f"server {server_id} was not deleted"
        time.sleep(0.05)


# --------------------------------------------------------------------------- versions, errors


def test_version_documents_and_microversions(emu: EmulatorProcess):
    versions = emu.call("GET", "/compute/").json()["versions"]
    current = next(v for v in versions if v["id"] == "v2.1")
    assert (current["version"], current["min_version"], current["status"]) == (
        "2.100",
        "2.1",
        "CURRENT",
    )
    doc = emu.call("GET", "/compute/v2.1").json()["version"]
    assert doc["version"] == "2.100" and doc["min_version"] == "2.1"

    r = emu.call("GET", "/compute/v2.1/flavors", mv="2.61")
    assert r.headers["OpenStack-API-Version"] == "compute 2.61"
    assert r.headers["X-OpenStack-Nova-API-Version"] == "2.61"
    r = emu.call(
        "GET", "/compute/v2.1/flavors", mv=None, headers={"X-OpenStack-Nova-API-Version": "2.47"}
    )
    assert r.headers["OpenStack-API-Version"] == "compute 2.47"
    r = emu.call("GET", "/compute/v2.1/flavors", mv="latest")
    assert r.headers["OpenStack-API-Version"] == "compute 2.100"
    r = emu.call("GET", "/compute/v2.1/flavors", mv="2.101")
    assert r.status_code == 406
    assert r.json() == {
        "computeFault": {
            "code": 406,
            "message": (
                "Version 2.101 is not supported by the API. Minimum is 2.1 and maximum is 2.100."
            ),
        }
    }

    assert emu.call("GET", "/network/").json()["versions"][0]["id"] == "v2.0"
    assert emu.call("GET", "/image/").status_code == 300


def test_nova_error_bodies(emu: EmulatorProcess, keypair: tuple[str, str]):
    missing = str(uuid.uuid4())
    r = emu.call("GET", f"/compute/v2.1/servers/{missing}")
    assert r.status_code == 404
    assert r.json() == {
        "itemNotFound": {"code": 404, "message": f"Instance {missing} could not be found."}
    }
    r = emu.call("DELETE", f"/compute/v2.1/servers/{missing}")
    assert r.status_code == 404 and "itemNotFound" in r.json()

    body = {"keypair": {"name": "dup", "public_key": keypair[1]}}
    assert emu.call("POST", "/compute/v2.1/os-keypairs", mv="2.10", json=body).status_code == 201
    r = emu.call("POST", "/compute/v2.1/os-keypairs", mv="2.10", json=body)
    assert r.status_code == 409
    assert r.json() == {
        "conflictingRequest": {"code": 409, "message": "Key pair 'dup' already exists."}
    }
    assert emu.call("DELETE", "/compute/v2.1/os-keypairs/dup", mv="2.10").status_code == 204
    r = emu.call("GET", "/compute/v2.1/os-keypairs/dup", mv="2.10")
    assert r.status_code == 404 and r.json()["itemNotFound"]["code"] == 404

    flavors = emu.call("GET", "/compute/v2.1/flavors").json()["flavors"]
    small = next(f["id"] for f in flavors if f["name"] == "m1.small")
    images = emu.call("GET", f"/image/v2/images?name={IMAGE}").json()["images"]
    server = {"name": "x", "flavorRef": small, "imageRef": images[0]["id"]}
    r = emu.call("POST", "/compute/v2.1/servers", mv="2.37", json={"server": server})
    assert (
        r.status_code == 400
        and "'networks' is a required property" in (r.json()["badRequest"]["message"])
    )
    r = emu.call(
        "POST",
        "/compute/v2.1/servers",
        json={"server": {**server, "networks": "none", "key_name": "nope"}},
    )
    assert r.json() == {"badRequest": {"code": 400, "message": "Invalid key_name provided."}}
    r = emu.call(
        "POST",
        "/compute/v2.1/servers",
        json={"server": {**server, "networks": "auto", "availability_zone": "mars"}},
    )
    assert r.status_code == 400 and "availability zone" in r.json()["badRequest"]["message"]


def test_real_quota_is_a_403_with_novas_message(emu: EmulatorProcess, conn: Any):
    """Quota cores=40: two 16-core servers fit, the third is refused as Nova refuses it."""
    first = boot(conn, "q1", flavor="g1.a100x2", image="cirros")
    second = boot(conn, "q2", flavor="g1.a100x2", image="cirros")
    with pytest.raises(sdk_exc.ForbiddenException) as exc:
        boot(conn, "q3", flavor="g1.a100x2", image="cirros")
    assert exc.value.status_code == 403
    assert "Quota exceeded for cores: Requested 16, but already used 32 of 40 cores" in str(
        exc.value
    )
    raw = exc.value.response.json()
    assert list(raw) == ["forbidden"] and raw["forbidden"]["code"] == 403
    limits = conn.compute.get_limits().absolute
    assert (limits.total_cores, limits.total_cores_used, limits.instances_used) == (40, 32, 2)
    for s in (first, second):
        delete_and_wait(conn, s.id)


def test_auth_without_keystone_answer(tmp_path: Path):
    """With a Keystone URL: no token is a 401 (keystonemiddleware's body and header); a token
    that Keystone cannot validate (nothing listens there) is a 503, never a pass."""
    cfg = EmulatorConfig(state_dir=tmp_path / "state", keystone_url="http://127.0.0.1:9")
    client = Emulator(cfg).app.test_client()
    r = client.get("/compute/v2.1/servers")
    assert r.status_code == 401
    assert r.json == {
        "error": {
            "code": 401,
            "title": "Unauthorized",
            "message": "The request you have made requires authentication.",
        }
    }
    assert r.headers["WWW-Authenticate"].startswith("Keystone uri=")
    assert client.get("/compute/v2.1/servers", headers={"X-Auth-Token": "t"}).status_code == 503
    assert client.get("/compute/v2.1").status_code == 200  # version documents need no token
    r = client.get("/compute/_stackml/faults")
    assert r.status_code == 401


# --------------------------------------------------------------------------- openstacksdk


def test_flavors_images_networks_through_openstacksdk(conn: Any):
    flavors = {f.name: f for f in conn.compute.flavors(details=True)}
    assert {"m1.small", "g1.a100x1", "g1.a100x2", "g1.vgpu"} <= set(flavors)
    assert flavors["g1.a100x2"].extra_specs == {"pci_passthrough:alias": "a100:2"}
    assert flavors["g1.vgpu"].extra_specs == {"resources:VGPU": "1"}
    found = conn.compute.find_flavor("g1.a100x1")  # GET /flavors/{name} -> 404, then a list
    assert found.id == flavors["g1.a100x1"].id and found.vcpus == 8
    specs = conn.compute.fetch_flavor_extra_specs(found).extra_specs
    assert specs == {"pci_passthrough:alias": "a100:1"}
    assert conn.compute.find_flavor("nope") is None

    image = conn.image.find_image(IMAGE)
    assert image.status == "active" and conn.image.get_image(image.id).name == IMAGE
    with pytest.raises(sdk_exc.NotFoundException):
        conn.image.get_image(str(uuid.uuid4()))
    assert {n.name for n in conn.network.networks()} == {"private", "public"}
    assert conn.network.find_network("public").is_router_external is True
    assert [s.cidr for s in conn.network.subnets(name="private-subnet")] == ["127.77.0.0/16"]
    zones = {z.name for z in conn.compute.availability_zones()}
    assert zones == {"nova", "az2"}


def test_server_lifecycle_through_openstacksdk(
    emu: EmulatorProcess, conn: Any, keypair: tuple[str, str]
):
    pem, pub = keypair
    kp = conn.compute.create_keypair(name="life", public_key=pub)
    assert kp.fingerprint.count(":") == 15
    assert conn.compute.find_keypair("life").public_key == pub
    sg = conn.network.create_security_group(name="ssh-in")
    created = boot(
        conn,
        "life-1",
        key_name="life",
        metadata={"stackml-job": "j-life", "stackml-role": "chief"},
        tags=["stackml", "stackml-job=j-life"],
        availability_zone="az2",
        security_groups=[{"name": "ssh-in"}],
    )
    assert created.admin_password and created.status is None  # 202 carries no status
    first = conn.compute.get_server(created.id)
    assert first.status in ("BUILD", "ACTIVE")
    server = wait_status(conn, created.id, {"ACTIVE", "ERROR"})
    assert server.status == "ACTIVE", server.fault
    assert server.availability_zone == "az2" and server.key_name == "life"
    assert server.metadata == {"stackml-job": "j-life", "stackml-role": "chief"}
    assert sorted(server.tags) == ["stackml", "stackml-job=j-life"]
    assert server.flavor.original_name == "m1.small" and server.flavor.vcpus == 1  # 2.47+
    [addr] = server.addresses["private"]
    assert addr["OS-EXT-IPS:type"] == "fixed" and addr["version"] == 4
    assert addr["OS-EXT-IPS-MAC:mac_addr"].startswith("fa:16:3e:")
    assert {g["name"] for g in server.security_groups} == {"ssh-in"}

    # the listing filters openstacksdk sends: name is a regex, tags must all match
    assert [s.id for s in conn.compute.servers(name="^life-")] == [created.id]
    assert [s.id for s in conn.compute.servers(details=True, tags="stackml-job=j-life")] == [
        created.id
    ]
    assert list(conn.compute.servers(tags="stackml-job=other")) == []
    assert [s.id for s in conn.compute.servers(all_projects=True)] == [created.id]

    # metadata and tags sub-resources
    conn.compute.set_server_metadata(created.id, extra="1")
    assert conn.compute.get_server_metadata(created.id).metadata["extra"] == "1"
    server.add_tag(conn.compute, "more")
    assert "more" in conn.compute.get_server(created.id).tags

    # the console prints the host key as cloud-init does; it pins the SSH connection
    console = conn.compute.get_server_console_output(created.id)["output"]
    assert "-----BEGIN SSH HOST KEY KEYS-----" in console
    host_key = parse_host_key(console)
    assert host_key and host_key.startswith("ssh-ed25519 ")
    assert conn.compute.get_server_console_output(created.id, length=1)["output"].count("\n") <= 1
    target = ssh.SSHTarget(addr["addr"], 22, "stackml", pem, host_key)
    with ssh.wait_for_ssh(target, 15) as c:
        assert c.run("id -un", timeout=10).text.strip() == "stackml"
        assert c.run("hostname", timeout=10).text.strip() == "life-1"
        python = f"/opt/stackml/runtimes/{RUNTIME_KEY}/bin/python"
        assert c.exists(python)
        assert c.run([python, "-c", "import sys; print(sys.prefix)"], timeout=30).text.strip() == (
            f"/opt/stackml/runtimes/{RUNTIME_KEY}"
        )
        assert (
            c.run(
                f"touch /opt/stackml/runtimes/{RUNTIME_KEY}/x 2>&1; echo $?", timeout=10
            ).text.strip()
            != "0"
        )  # mounted read-only
    ssh.close_all()

    limits = conn.compute.get_limits().absolute
    assert (limits.instances_used, limits.total_cores_used, limits.total_ram_used) == (1, 1, 2048)

    conn.compute.delete_server(created.id)  # 204, then 404 once the sandbox is gone
    delete_and_wait(conn, created.id)
    with pytest.raises(sdk_exc.NotFoundException):
        conn.compute.get_server(created.id)
    conn.compute.delete_keypair("life")
    assert conn.compute.find_keypair("life") is None
    conn.network.delete_security_group(sg)


def test_neutron_security_groups_ports_floating_ips(emu: EmulatorProcess, conn: Any):
    sg = conn.network.create_security_group(name="stackml-ssh-test")
    rule = dict(
        security_group_id=sg.id,
        direction="ingress",
        protocol="tcp",
        port_range_min=22,
        port_range_max=22,
        remote_ip_prefix="0.0.0.0/0",
    )
    conn.network.create_security_group_rule(**rule)
    with pytest.raises(sdk_exc.ConflictException):
        conn.network.create_security_group_rule(**rule)
    [found] = conn.network.security_groups(name="stackml-ssh-test")
    assert any(r["port_range_min"] == 22 for r in found.security_group_rules)
    assert conn.network.find_security_group("default") is not None  # made per project

    server = boot(conn, "fip-1", image="cirros")
    wait_status(conn, server.id, {"ACTIVE"})
    [port] = conn.network.ports(device_id=server.id)
    public = conn.network.find_network("public")
    fip = conn.network.create_ip(
        floating_network_id=public.id, port_id=port.id, description=f"for {server.id}"
    )
    # no NAT on loopback: the floating address is the port's own address
    assert fip.floating_ip_address == port.fixed_ips[0]["ip_address"] == fip.fixed_ip_address
    assert [f.id for f in conn.network.ips(description=f"for {server.id}")] == [fip.id]
    addrs = conn.compute.get_server(server.id).addresses["private"]
    assert {a["OS-EXT-IPS:type"] for a in addrs} == {"fixed", "floating"}
    with pytest.raises(sdk_exc.NotFoundException) as exc:
        conn.network.get_ip(str(uuid.uuid4()))
    assert exc.value.response.json()["NeutronError"]["type"] == "FloatingIPNotFound"

    delete_and_wait(conn, server.id)
    # deleting the server deleted its port: the floating IP stays, disassociated
    kept = conn.network.get_ip(fip.id)
    assert kept.port_id is None and kept.status == "DOWN"
    conn.network.delete_ip(fip)
    assert list(conn.network.ports(device_id=server.id)) == []
    conn.network.delete_security_group(sg)


# --------------------------------------------------------------------------- faults


def test_fault_injection_is_admin_and_validated(emu: EmulatorProcess):
    r = emu.call("POST", "/compute/_stackml/faults", json={"kind": "meteor"})
    assert r.status_code == 400 and "badRequest" in r.json()
    f = emu.inject("no_valid_host", match={"flavor": "m1.small"}, count=2)
    assert [x["id"] for x in emu.faults()] == [f["id"]]
    assert emu.call("DELETE", f"/compute/_stackml/faults/{f['id']}").status_code == 204
    assert emu.faults() == []


def test_no_valid_host_fault(emu: EmulatorProcess, conn: Any):
    emu.inject("no_valid_host", match={"name_regex": "^nvh-"})
    created = boot(conn, "nvh-1")  # accepted (202), then scheduling fails
    server = wait_status(conn, created.id, {"ERROR", "ACTIVE"})
    assert server.status == "ERROR"
    assert server.fault["code"] == 500 and server.fault["message"] == NO_VALID_HOST
    assert server.fault["created"].endswith("Z")
    assert emu.faults() == []  # used up
    assert leak_report(emu.sandbox_root) == []  # no sandbox was ever made
    delete_and_wait(conn, created.id)


def test_quota_exceeded_fault(emu: EmulatorProcess, conn: Any):
    emu.inject("quota_exceeded", match={"flavor": "g1.a100x1"})
    with pytest.raises(sdk_exc.ForbiddenException) as exc:
        boot(conn, "quota-1", flavor="g1.a100x1", image="cirros")
    assert exc.value.response.json() == {
        "forbidden": {
            "code": 403,
            "message": ("Quota exceeded for cores: Requested 8, but already used 40 of 40 cores"),
        }
    }
    assert emu.faults() == []  # used up: the next create goes through
    assert list(conn.compute.servers()) == []


def test_slow_build_fault(emu: EmulatorProcess, conn: Any):
    emu.inject("slow_build", match={"az": "az2"}, seconds=5)
    started = time.monotonic()
    created = boot(conn, "slow-1", image="cirros", availability_zone="az2")
    assert conn.compute.get_server(created.id).status == "BUILD"
    time.sleep(0.8)
    assert conn.compute.get_server(created.id).status == "BUILD"
    wait_status(conn, created.id, {"ACTIVE"}, timeout=15)
    assert time.monotonic() - started >= 5
    delete_and_wait(conn, created.id)


def test_delete_during_slow_build_leaves_nothing(emu: EmulatorProcess, conn: Any):
    emu.inject("slow_build", match={"name_regex": "^stuck-"}, seconds=600)
    created = boot(conn, "stuck-1", image="cirros")
    time.sleep(0.2)
    assert conn.compute.get_server(created.id).status == "BUILD"
    delete_and_wait(conn, created.id)


def test_vanish_fault(emu: EmulatorProcess, conn: Any):
    created = boot(conn, "vanish-1", image="cirros")
    wait_status(conn, created.id, {"ACTIVE"})
    sandbox_id = emu.state()["servers"][created.id]["sandbox_id"]
    assert (emu.sandbox_root / sandbox_id).is_dir()
    emu.inject("vanish", match={"name_regex": "^vanish-"})
    with pytest.raises(sdk_exc.NotFoundException):
        conn.compute.get_server(created.id)
    assert not (emu.sandbox_root / sandbox_id).exists()  # the "VM" is gone with it
    assert list(conn.network.ports(device_id=created.id)) == []


def test_delete_fails_fault(emu: EmulatorProcess, conn: Any):
    created = boot(conn, "undead-1", image="cirros")
    wait_status(conn, created.id, {"ACTIVE"})
    emu.inject("delete_fails", match={"name_regex": "^undead-"}, count=2)
    for _ in range(2):
        r = emu.call("DELETE", f"/compute/v2.1/servers/{created.id}")
        assert r.status_code == 500
        assert r.json()["computeFault"]["code"] == 500
    assert conn.compute.get_server(created.id).status == "ACTIVE"
    delete_and_wait(conn, created.id)


# --------------------------------------------------------------------------- restart, cleanup


def test_restart_keeps_servers_and_cleanup_removes_them(keypair: tuple[str, str]):
    ensure_runtime()
    emu = EmulatorProcess(new_base())
    try:
        emu.start()
        conn = sdk_connection(emu)
        pem, pub = keypair
        conn.compute.create_keypair(name="restart", public_key=pub)
        created = boot(conn, "restart-1", image="cirros", key_name="restart")
        server = wait_status(conn, created.id, {"ACTIVE"})
        host_key = parse_host_key(conn.compute.get_server_console_output(created.id)["output"])
        addr = server.addresses["private"][0]["addr"]

        emu.stop()  # SIGTERM: the sandboxes (VMs) keep running
        emu.start()
        conn = sdk_connection(emu)
        again = conn.compute.get_server(created.id)
        assert again.status == "ACTIVE" and again.addresses["private"][0]["addr"] == addr
        with ssh.wait_for_ssh(ssh.SSHTarget(addr, 22, "stackml", pem, host_key), 15) as c:
            assert c.run("hostname", timeout=10).text.strip() == "restart-1"
        ssh.close_all()

        emu.stop()
        assert cleanup(emu.state_dir) == 1
        assert leak_report(emu.sandbox_root) == []
        assert emu.state()["servers"] == {}
    finally:
        emu.teardown()
