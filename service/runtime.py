"""Local runtimes: a TensorFlow environment built once per requirements file, shared read-only.

`ensure_runtime` builds `<data_dir>/runtimes/<key>-<hash>/` from Debian's /usr/bin/python3 with
uv (its cache under the data dir makes rebuilds fast); each sandbox then attaches it in a few
milliseconds as a `--without-pip` style venv whose `.pth` points at the runtime's site-packages
(see workers/vm/runner.py `attach`). The recipe (requirements) lives in images/local-runtime/.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from service.config import REPO_ROOT, Settings
from service.domain.errors import BackendError, ValidationFailed

BASE_PYTHON = Path("/usr/bin/python3")
BUILD_TIMEOUT = 1800


class RuntimeBuildError(BackendError):
    reason = "runtime_build_failed"


def _requirements(settings: Settings, key: str) -> Path:
    runtimes = settings.runtimes()
    if key not in runtimes:
        raise ValidationFailed(
            f"unknown runtime {key!r}; known: {', '.join(sorted(runtimes))}",
            details={"field": "runtime"},
        )
    return REPO_ROOT / runtimes[key].requirements


def runtime_path(settings: Settings, key: str) -> Path:
    """Where the runtime for `key` lives (built or not)."""
    req = _requirements(settings, key)
    digest = hashlib.sha256(req.read_bytes() + str(BASE_PYTHON.resolve()).encode()).hexdigest()
    return settings.runtime_dir / f"{key}-{digest[:12]}"


def is_built(settings: Settings, key: str) -> bool:
    return (runtime_path(settings, key) / ".complete").exists()


def ensure_runtime(
    settings: Settings, key: str, *, echo: Callable[[str], None] | None = None
) -> Path:
    """The runtime's python executable, building the runtime first if needed (once, locked)."""
    target = runtime_path(settings, key)
    python = target / "bin" / "python"
    if (target / ".complete").exists():
        return python
    if not BASE_PYTHON.exists():
        raise RuntimeBuildError(
            f"{BASE_PYTHON} is missing: sandbox runtimes are built from the system Python "
            "(apt-get install python3)"
        )
    settings.runtime_dir.mkdir(parents=True, exist_ok=True)
    for d in (settings.runtime_dir, settings.runtime_dir.parent):
        os.chmod(d, d.stat().st_mode | 0o755)  # sandboxes run as another user and read it
    lock_path = settings.runtime_dir / f".{key}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / ".complete").exists():
            return python
        started = time.monotonic()
        if echo:
            echo(f"building runtime {key} in {target} (once; later runs reuse it)")
        tmp = target.with_name(target.name + ".building")
        shutil.rmtree(tmp, ignore_errors=True)
        env = {
            **os.environ,
            "UV_CACHE_DIR": str(settings.runtime_dir / ".uv-cache"),
            "UV_NO_PROGRESS": "1",
        }
        env.pop("VIRTUAL_ENV", None)
        req = _requirements(settings, key)
        _run(
            [uv_bin(), "venv", "--quiet", "--relocatable", "--python", str(BASE_PYTHON), str(tmp)],
            env,
        )
        _run(
            [
                uv_bin(),
                "pip",
                "install",
                "--quiet",
                "--python",
                str(tmp / "bin" / "python"),
                "-r",
                str(req),
            ],
            env,
        )
        subprocess.run(["chmod", "-R", "a+rX", str(tmp)], check=True, timeout=120)
        (tmp / ".complete").write_text(f"{time.time()}\n")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        if echo:
            echo(f"runtime {key} built in {time.monotonic() - started:.1f}s")
    return python


def uv_bin() -> str:
    """The uv executable that ships in the project's virtualenv (the `uv` wheel)."""
    from uv import find_uv_bin

    return find_uv_bin()


def run_build_step(
    argv: list[str],
    env: dict[str, str],
    *,
    error: type[Exception],
    what: str,
    hint: str = "",
    timeout: float = BUILD_TIMEOUT,
) -> None:
    """Run one step of a virtualenv build; `error` says which build failed, and how."""
    step = " ".join(argv[:3])
    try:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise error(f"{what} timed out after {timeout:.0f}s ({step}){hint}") from e
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise error(f"{what} failed ({step}): {tail}{hint}")


def _run(argv: list[str], env: dict[str, str]) -> None:
    run_build_step(argv, env, error=RuntimeBuildError, what="building the runtime")
