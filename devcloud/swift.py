"""Real Swift on loopback: one replica on one device, Keystone auth, TempURL, SLO.

Four servers (proxy, account, container, object), each one process (`workers = 0`: with
workers the servers switch to user `swift`) started with `-v` so that they log to their console
files. Rings are built in Python with RingBuilder on every start (the ports may change).
"""

from __future__ import annotations

import os
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path

from devcloud import DevCloudError
from devcloud.process import Service, http_answers, http_ok

READY_DEADLINE = 60.0
RING_TIMEOUT = 120
SERVERS = ("account", "container", "object")
PART_POWER = 8

RING_SCRIPT = '''\
"""Build the account/container/object rings: one replica, one device (stackml devcloud)."""
import sys

from swift.common.ring import RingBuilder

swift_dir, ip = sys.argv[1], sys.argv[2]
ports = dict(zip(("account", "container", "object"), map(int, sys.argv[3:6])))
part_power = int(sys.argv[6])
for kind, port in ports.items():
    rb = RingBuilder(part_power, 1, 0)
    rb.add_dev({"id": 0, "region": 1, "zone": 1, "ip": ip, "port": port,
                "device": "d1", "weight": 100.0, "meta": ""})
    rb.rebalance()
    rb.save(f"{swift_dir}/{kind}.builder")
    rb.get_ring().save(f"{swift_dir}/{kind}.ring.gz")
'''


@dataclass(frozen=True)
class SwiftPorts:
    proxy: int
    account: int
    container: int
    object: int


def _common(state: Path, name: str, host: str, port: int) -> str:
    return textwrap.dedent(
        f"""\
        [DEFAULT]
        bind_ip = {host}
        bind_port = {port}
        workers = 0
        mount_check = false
        devices = {state}/srv
        swift_dir = {state}/etc
        log_name = {name}
        log_level = INFO
        """
    )


def proxy_conf(state: Path, host: str, port: int, auth_url: str, swift_password: str) -> str:
    return _common(state, "proxy-server", host, port) + textwrap.dedent(
        f"""\
        [pipeline:main]
        pipeline = catch_errors gatekeeper healthcheck proxy-logging listing_formats bulk \
tempurl authtoken keystoneauth copy slo dlo versioned_writes symlink proxy-logging proxy-server

        [app:proxy-server]
        use = egg:swift#proxy
        account_autocreate = true
        error_suppression_interval = 0
        node_timeout = 30
        conn_timeout = 2
        recoverable_node_timeout = 30

        [filter:catch_errors]
        use = egg:swift#catch_errors

        [filter:gatekeeper]
        use = egg:swift#gatekeeper

        [filter:healthcheck]
        use = egg:swift#healthcheck

        [filter:proxy-logging]
        use = egg:swift#proxy_logging

        [filter:listing_formats]
        use = egg:swift#listing_formats

        [filter:bulk]
        use = egg:swift#bulk

        [filter:tempurl]
        use = egg:swift#tempurl
        methods = GET HEAD PUT POST DELETE
        allowed_digests = sha256 sha512

        [filter:authtoken]
        paste.filter_factory = keystonemiddleware.auth_token:filter_factory
        www_authenticate_uri = {auth_url}/v3
        auth_url = {auth_url}
        auth_type = password
        username = swift
        password = {swift_password}
        project_name = service
        user_domain_id = default
        project_domain_id = default
        interface = public
        delay_auth_decision = true
        cache = swift.cache
        include_service_catalog = false
        http_connect_timeout = 5
        http_request_max_retries = 2

        [filter:keystoneauth]
        use = egg:swift#keystoneauth
        operator_roles = admin, member
        reseller_admin_role = ResellerAdmin

        [filter:copy]
        use = egg:swift#copy

        [filter:slo]
        use = egg:swift#slo

        [filter:dlo]
        use = egg:swift#dlo

        [filter:versioned_writes]
        use = egg:swift#versioned_writes

        [filter:symlink]
        use = egg:swift#symlink
        """
    )


def server_conf(state: Path, kind: str, host: str, port: int) -> str:
    # an object write updates its container's listing within this many seconds, or leaves it
    # to the object-updater (Swift's default, 1 s, is short for a loaded laptop)
    app_extra = "container_update_timeout = 10" if kind == "object" else ""
    return _common(state, f"{kind}-server", host, port) + textwrap.dedent(
        f"""\
        [pipeline:main]
        pipeline = healthcheck {kind}-server

        [filter:healthcheck]
        use = egg:swift#healthcheck

        [app:{kind}-server]
        use = egg:swift#{kind}
        {app_extra}

        [{kind}-replicator]
        [{kind}-auditor]
        [{kind}-updater]
        """
    )


SWIFT_CONF = textwrap.dedent(
    """\
    [swift-hash]
    swift_hash_path_suffix = stackml-devcloud
    swift_hash_path_prefix = stackml-devcloud

    [storage-policy:0]
    name = Policy-0
    default = yes

    [swift-constraints]
    """
)


def prepare(
    venv: Path,
    state: Path,
    host: str,
    ports: SwiftPorts,
    auth_url: str,
    swift_password: str,
) -> None:
    """Configuration files, the device directory and the rings for these ports."""
    etc = state / "etc"
    etc.mkdir(parents=True, exist_ok=True)
    (state / "srv" / "d1").mkdir(parents=True, exist_ok=True)
    (etc / "swift.conf").write_text(SWIFT_CONF)
    conf = proxy_conf(state, host, ports.proxy, auth_url, swift_password)
    _write_private(etc / "proxy-server.conf", conf)
    for kind in SERVERS:
        (etc / f"{kind}-server.conf").write_text(
            server_conf(state, kind, host, getattr(ports, kind))
        )
    script = state / "rings.py"
    script.write_text(RING_SCRIPT)
    argv = [str(venv / "bin" / "python"), str(script), str(etc), host]
    argv += [str(ports.account), str(ports.container), str(ports.object), str(PART_POWER)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=RING_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        raise DevCloudError(f"building the Swift rings took over {RING_TIMEOUT}s") from e
    if proc.returncode != 0:
        raise DevCloudError(
            f"building the Swift rings failed: {(proc.stderr or proc.stdout)[-2000:]}"
        )


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def start(venv: Path, state: Path, run_dir: Path) -> list[Service]:
    """Start the four servers (backends first); returns them in start order."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    services = []
    for kind in (*SERVERS, "proxy"):
        svc = Service(f"swift-{kind}", run_dir)
        exe = venv / "bin" / f"swift-{kind}-server"
        svc.start(
            [
                str(venv / "bin" / "python"),
                str(exe),
                str(state / "etc" / f"{kind}-server.conf"),
                "-v",
            ],
            env=env,
            cwd=state,
        )
        services.append(svc)
    return services


def wait_ready(services: list[Service], host: str, ports: SwiftPorts) -> None:
    for svc in services:
        kind = svc.name.removeprefix("swift-")
        port = getattr(ports, kind)
        url = f"http://{host}:{port}/healthcheck"
        check = (lambda u=url: http_ok(u)) if kind == "proxy" else (lambda u=url: http_answers(u))
        svc.wait_ready(check, READY_DEADLINE)
