"""The devcloud: clouds.yaml per user, the catalog, roles on Swift, env, up/down via the CLI."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml

from devcloud.cloud import USER_CLOUDS, DevCloud
from tests.cloud.conftest import REPO_ROOT, VENV_ROOT, leftover_processes, scratch_dir

TIMEOUT = 30


@pytest.mark.parametrize("cloud", sorted(USER_CLOUDS))
def test_each_cloud_in_clouds_yaml_authenticates(devcloud: DevCloud, cloud: str) -> None:
    user, project = USER_CLOUDS[cloud]
    conn = devcloud.connection(cloud)
    assert conn.session.get_token()
    assert conn.current_project_id == devcloud.projects[project]
    assert conn.identity.get_user(conn.current_user_id).name == user  # users may read themselves


def test_clouds_yaml_is_private_and_complete(devcloud: DevCloud) -> None:
    path = devcloud.clouds_yaml
    assert path.stat().st_mode & 0o077 == 0
    clouds = yaml.safe_load(path.read_text())["clouds"]
    assert set(clouds) == set(USER_CLOUDS)
    for c in clouds.values():
        assert c["auth"]["auth_url"] == devcloud.auth_url
        assert c["auth"]["user_domain_name"] == c["auth"]["project_domain_name"] == "Default"
        assert c["region_name"] == "RegionOne"
        assert c["interface"] == "public"
        assert c["identity_api_version"] == 3


def test_catalog_lists_the_services(devcloud: DevCloud) -> None:
    conn = devcloud.connection("devcloud")
    types = {s.type: s.id for s in conn.identity.services()}
    assert {"identity", "object-store", "compute", "network", "image"} <= set(types)
    assert "machine-learning" in types  # stackml: `openstack ml`, Horizon
    urls = {}
    for ep in conn.identity.endpoints(interface="public"):
        assert ep.region_id == "RegionOne"
        urls[ep.service_id] = ep.url
    emu = devcloud.emulator_url
    assert urls[types["identity"]] == devcloud.auth_url
    assert urls[types["object-store"]] == f"{devcloud.swift_url}/v1/AUTH_%(project_id)s"
    assert urls[types["compute"]] == f"{emu}/compute/v2.1"
    assert urls[types["network"]] == f"{emu}/network"
    assert urls[types["image"]] == f"{emu}/image"
    # where `stackml up --devcloud` listens, or where a test registered its API last
    assert urls[types["machine-learning"]] == DevCloud(devcloud.state_dir).stackml_url
    demo = devcloud.connection("devcloud-demo")
    assert demo.object_store.get_endpoint() == (
        f"{devcloud.swift_url}/v1/AUTH_{devcloud.projects['demo']}"
    )
    roles = {r.name for r in conn.identity.roles()}
    assert {"reader", "member", "admin", "service"} <= roles


def test_swift_honours_keystone_roles(devcloud: DevCloud) -> None:
    def put(cloud: str, account_project: str, name: str) -> int:
        conn = devcloud.connection(cloud)
        url = f"{devcloud.swift_url}/v1/AUTH_{devcloud.projects[account_project]}/{name}"
        headers = {"X-Auth-Token": conn.session.get_token()}
        return requests.put(url, headers=headers, timeout=TIMEOUT).status_code

    assert put("devcloud-demo", "demo", "roles-check") in (201, 202)  # members own the account
    assert put("devcloud-reader", "demo", "roles-check-2") == 403  # readers do not
    assert put("devcloud-alt", "demo", "roles-check-3") == 403  # another project does not
    r = requests.put(
        f"{devcloud.swift_url}/v1/AUTH_{devcloud.projects['demo']}/x",
        headers={"X-Auth-Token": "not-a-token"},
        timeout=TIMEOUT,
    )
    assert r.status_code == 401


def test_env_exports_drive_openstacksdk(devcloud: DevCloud) -> None:
    exports = devcloud.env_exports()
    env = {}
    for line in exports.splitlines():
        assert line.startswith("export ")
        k, _, v = line.removeprefix("export ").partition("=")
        env[k] = shlex.split(v)[0]
    assert env["OS_CLOUD"] == "devcloud"
    assert env["OS_CLIENT_CONFIG_FILE"] == str(devcloud.clouds_yaml)
    assert env["STACKML_COMPUTE"] == "openstack" and env["STACKML_STORE"] == "swift"
    assert env["OS_PASSWORD"] == devcloud.admin_password
    assert env["OS_AUTH_URL"] == devcloud.auth_url
    code = "import openstack; c = openstack.connect(); print(c.current_project_id)"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OS_")}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == devcloud.projects["admin"]


def test_cli_up_is_idempotent_and_down_leaves_nothing(devcloud: DevCloud) -> None:
    state = scratch_dir("cloud-cli")
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "STACKML_DEVCLOUD_VENVS": str(VENV_ROOT),
    }

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "devcloud.cli", *args, "--state-dir", str(state)],
            env=env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )

    try:
        ports = ["--keystone-port", "0", "--swift-port", "0", "--emulator-port", "0"]
        up = cli("up", *ports, "--no-emulator")
        assert up.returncode == 0, up.stderr
        assert cli("status").returncode == 0
        again = cli("up", "--no-emulator")
        assert again.returncode == 0, again.stderr
        assert "already up" in again.stderr
        envs = cli("env")
        assert f"export OS_CLIENT_CONFIG_FILE={state / 'clouds.yaml'}" in envs.stdout
        second = DevCloud(state)
        assert second.ports.keystone != devcloud.ports.keystone
        assert second.connection("devcloud-demo").object_store.get_endpoint()
        assert leftover_processes(state)  # the check below would notice them
    finally:
        down = cli("down")
    assert down.returncode == 0, down.stderr
    assert leftover_processes(state) == []
    status = cli("status")
    assert status.returncode == 1  # nothing runs
    assert cli("down").returncode == 0  # down again: nothing to do, not an error
    import shutil

    shutil.rmtree(state, ignore_errors=True)


def test_a_taken_port_is_refused_with_advice(tmp_path: Path, devcloud: DevCloud) -> None:
    cloud = DevCloud(tmp_path / "dc", venv_root=VENV_ROOT)
    from devcloud import DevCloudError

    with pytest.raises(DevCloudError, match="in use"):
        cloud.up(keystone_port=devcloud.ports.keystone, swift_port=0, emulator=False)
    assert leftover_processes(tmp_path) == []


def test_keystone_bootstrap_takes_a_password_that_begins_with_a_dash(
    devcloud: DevCloud, tmp_path: Path
) -> None:
    """Generated passwords (token_urlsafe) begin with "-" one time in 64; keystone-manage's
    argparse must not read one as an option (CI once failed `devcloud up` on that)."""
    from devcloud import keystone, venvs

    venv = venvs.ensure_venv(VENV_ROOT, "keystone", venvs.KEYSTONE_REQUIREMENTS)
    state = tmp_path / "keystone"
    keystone.bootstrap(venv, state, "http://127.0.0.1:1/v3", "-Kx3_dash-first")
    assert (state / ".bootstrapped").exists()
