"""`python -m devcloud.emulator`: serve the emulator; `... cleanup --state-dir D`: delete its VMs.

SIGTERM/SIGINT stop serving and leave the sandboxes running (they are the VMs; a restart on the
same state dir finds them again); `cleanup` deletes them all.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from devcloud.emulator.catalog import (
    DEFAULT_ZONES,
    EmulatorConfig,
    parse_flavors,
    parse_images,
    parse_quota,
)

DEFAULT_IMAGES = "stackml-tensorflow-2.21=tensorflow-2.21,cirros="


def _default_state_dir() -> Path:
    base = Path("/var/lib/stackml") if os.geteuid() == 0 else Path.home() / ".local/share/stackml"
    return base / "devcloud" / "emulator"


def _default_runtime_root() -> Path:
    from service.config import get_settings

    return get_settings().runtime_dir


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m devcloud.emulator",
        description="Nova/Neutron/Glance emulator backed by sandboxes "
        "(compute at /compute/v2.1, network at /network, image at /image).",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8774)
    p.add_argument(
        "--state-dir", type=Path, default=None, help="default: " + str(_default_state_dir())
    )
    p.add_argument(
        "--keystone-url",
        default="none",
        help="Keystone to validate tokens with, or 'none': no auth, everyone is "
        "project admin with role admin (loopback only)",
    )
    p.add_argument("--sandbox-root", type=Path, default=None, help="default: <state-dir>/sandboxes")
    p.add_argument(
        "--runtime-root",
        type=Path,
        default=None,
        help="built stackml runtimes (<key>-<hash>/ with .complete); default: "
        "stackml's runtime_root setting",
    )
    p.add_argument(
        "--images",
        default=DEFAULT_IMAGES,
        help="Glance images as name=runtime-key,...; an empty key: no runtime",
    )
    p.add_argument("--zones", default=",".join(DEFAULT_ZONES), help="availability zones")
    p.add_argument("--quota", default="", help="per project: instances=N,cores=N,ram=MiB")
    p.add_argument(
        "--flavors",
        type=Path,
        default=None,
        help="YAML list of {name, vcpus, ram, disk, extra_specs} (default: built-in)",
    )
    p.add_argument("--isolation", default="auto", choices=["auto", "root", "rootless", "none"])
    p.add_argument("--login-user", default="stackml")
    p.add_argument(
        "--boot-delay",
        type=float,
        default=0.0,
        help="seconds a server stays in BUILD after its sandbox is up",
    )
    p.add_argument("--quiet", action="store_true", help="no access log")
    return p.parse_args(argv)


def _service_auth() -> dict[str, str] | None:
    """STACKML_EMULATOR_SERVICE_AUTH: JSON {username, password, project_name, ...}, the login
    the emulator validates tokens with (in the environment: a password never goes in argv)."""
    raw = os.environ.get("STACKML_EMULATOR_SERVICE_AUTH")
    if not raw:
        return None
    try:
        auth = json.loads(raw)
    except ValueError as e:
        raise SystemExit(f"STACKML_EMULATOR_SERVICE_AUTH is not JSON: {e}") from e
    if not isinstance(auth, dict):
        raise SystemExit("STACKML_EMULATOR_SERVICE_AUTH must be a JSON object")
    missing = [k for k in ("username", "password", "project_name") if not auth.get(k)]
    if missing:
        raise SystemExit(f"STACKML_EMULATOR_SERVICE_AUTH lacks {', '.join(missing)}")
    return {str(k): str(v) for k, v in auth.items()}


def config_from(args: argparse.Namespace) -> EmulatorConfig:
    keystone = None if args.keystone_url.lower() == "none" else args.keystone_url
    if keystone is None and not _is_loopback(args.host):
        raise SystemExit("--keystone-url none (no auth) is only allowed on a loopback address")
    flavors = None
    if args.flavors is not None:
        import yaml

        flavors = parse_flavors(yaml.safe_load(args.flavors.read_text()))
    zones = tuple(z.strip() for z in args.zones.split(",") if z.strip())
    if not zones:
        raise SystemExit("--zones needs at least one zone")
    cfg = EmulatorConfig(
        state_dir=args.state_dir or _default_state_dir(),
        sandbox_root=args.sandbox_root,
        runtime_root=args.runtime_root or _default_runtime_root(),
        keystone_url=keystone,
        images=parse_images(args.images),
        zones=zones,
        quota=parse_quota(args.quota),
        isolation=args.isolation,
        login_user=args.login_user,
        boot_delay=args.boot_delay,
        service_auth=_service_auth(),
    )
    if flavors is not None:
        cfg.flavors = flavors
    return cfg


def serve(args: argparse.Namespace) -> int:
    from werkzeug.serving import WSGIRequestHandler, make_server

    from devcloud.emulator.app import Emulator

    cfg = config_from(args)
    emu = Emulator(cfg)
    emu.start()

    class Handler(WSGIRequestHandler):
        disable_nagle_algorithm = True

        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            if not args.quiet:
                super().log_request(code, size)

    server = make_server(args.host, args.port, emu.app, threaded=True, request_handler=Handler)

    def stop(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    url = f"http://{args.host}:{server.server_port}"
    print(
        f"stackml emulator ready at {url} (compute {url}/compute/v2.1, network "
        f"{url}/network, image {url}/image; state {cfg.state_dir})",
        flush=True,
    )
    try:
        server.serve_forever()
    finally:
        server.server_close()
        emu.machines.wait_idle(15.0)  # let a boot or delete in flight finish its sandbox work
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if argv[:1] == ["cleanup"]:
        p = argparse.ArgumentParser(prog="python -m devcloud.emulator cleanup")
        p.add_argument("--state-dir", type=Path, default=None)
        a = p.parse_args(argv[1:])
        from devcloud.emulator import cleanup

        n = cleanup(a.state_dir or _default_state_dir())
        print(f"deleted {n} sandbox(es)")
        return 0
    return serve(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
