"""Keystone's, Swift's and Horizon's own virtualenvs: built once with uv under a lock, reused.

Each service pins many libraries of its own, so each gets a venv apart from the project's.
A venv is complete when its `.complete` marker names the same requirements it was built for.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from devcloud import DevCloudError
from service.runtime import run_build_step, uv_bin

# pysaml2 (keystone's) caps pyOpenSSL below 24.3; left to itself the resolver takes the newest
# cryptography and an old pyOpenSSL that breaks on it at import (`lib` has no `GEN_EMAIL`),
# so pyOpenSSL's last release under the cap is named, which brings a cryptography it works with
KEYSTONE_REQUIREMENTS = ("keystone==30.0.0", "gunicorn", "pyopenssl>=24.2.1,<24.3")
SWIFT_REQUIREMENTS = ("swift==2.38.3", "keystonemiddleware==13.0.1")
# Horizon (Django 5.2) for the dashboard plugin's unit and browser tests (dashboard/)
HORIZON_REQUIREMENTS = ("horizon==27.0.0",)
BUILD_TIMEOUT = 900


def base_python() -> Path:
    """The interpreter the service venvs are made from: the project's own base Python."""
    base = Path(getattr(sys, "_base_executable", "") or sys.executable)
    return base if base.exists() else Path(sys.executable)


def venv_path(root: Path, name: str, requirements: tuple[str, ...]) -> Path:
    digest = hashlib.sha256(
        "\n".join((*requirements, str(base_python().resolve()))).encode()
    ).hexdigest()
    return root / f"{name}-{digest[:12]}"


def ensure_venv(
    root: Path,
    name: str,
    requirements: tuple[str, ...],
    *,
    echo: Callable[[str], None] | None = None,
) -> Path:
    """The venv's directory, building it first if needed (once per machine, under a lock)."""
    target = venv_path(root, name, requirements)
    if (target / ".complete").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / ".complete").exists():
            return target
        started = time.monotonic()
        if echo:
            echo(f"building the {name} virtualenv in {target} (once; later runs reuse it)")
        shutil.rmtree(target, ignore_errors=True)  # a build that died half-way
        env = {**os.environ, "UV_NO_PROGRESS": "1"}
        env.pop("VIRTUAL_ENV", None)
        _run([uv_bin(), "venv", "--quiet", "--python", str(base_python()), str(target)], env)
        _run(
            [uv_bin(), "pip", "install", "--quiet", "--python", str(target / "bin" / "python")]
            + list(requirements),
            env,
        )
        (target / ".complete").write_text("\n".join(requirements) + "\n")
        if echo:
            echo(f"{name} virtualenv built in {time.monotonic() - started:.1f}s")
    return target


def _run(argv: list[str], env: dict[str, str]) -> None:
    run_build_step(
        argv,
        env,
        error=DevCloudError,
        what="building a devcloud virtualenv",
        hint="; check the network to the package index, then run `stackml devcloud up` again",
        timeout=BUILD_TIMEOUT,
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m devcloud.venvs horizon|keystone|swift [ROOT]`: build the venv if needed and
    print its directory (Makefile and CI use it for Horizon's)."""
    args = list(sys.argv[1:] if argv is None else argv)
    wanted = {
        "horizon": HORIZON_REQUIREMENTS,
        "keystone": KEYSTONE_REQUIREMENTS,
        "swift": SWIFT_REQUIREMENTS,
    }
    if not args or args[0] not in wanted or len(args) > 2:
        print("usage: python -m devcloud.venvs horizon|keystone|swift [ROOT]", file=sys.stderr)
        return 2
    root = (
        Path(args[1])
        if len(args) > 1
        else Path(os.environ.get("STACKML_DEVCLOUD_VENVS", "/var/cache/stackml/devcloud-venvs"))
    )
    echo = lambda line: print(line, file=sys.stderr)  # noqa: E731
    print(ensure_venv(root, args[0], wanted[args[0]], echo=echo))
    return 0


if __name__ == "__main__":
    sys.exit(main())
