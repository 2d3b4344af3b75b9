"""Local runtimes: a TensorFlow environment built once per requirements file, shared read-only.

`ensure_runtime` builds `<data_dir>/runtimes/<key>-<hash>/` from Debian's /usr/bin/python3 with
uv (its cache under the data dir makes rebuilds fast); each sandbox then attaches it in a few
milliseconds as a `--without-pip` style venv whose `.pth` points at the runtime's site-packages
(see workers/vm/runner.py `attach`). The recipe (requirements) lives in images/local-runtime/.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from service.config import REPO_ROOT, Settings
from service.domain.errors import BackendError, ValidationFailed

BASE_PYTHON = Path("/usr/bin/python3")
log = logging.getLogger("stackml.runtime")
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


# Written once the runtime's every module is compiled and readable by all (`_readable_bytecode`)
COMPILED = ".bytecode"


def ensure_runtime(
    settings: Settings, key: str, *, echo: Callable[[str], None] | None = None
) -> Path:
    """The runtime's python executable, building the runtime first if needed (once, locked).

    The runtime is built with its bytecode compiled and readable by every user: a sandbox's
    user cannot write `__pycache__` in it, and a runtime whose caches only the processes that
    imported a module first had written (as root, under the platform's umask 077: directories
    of mode 0700) made every trainer, model server and predictor on a sandbox compile
    TensorFlow from source, ~7 s of CPU at each start. A runtime built before that is repaired
    once (`_readable_bytecode`)."""
    target = runtime_path(settings, key)
    python = target / "bin" / "python"
    if (target / ".complete").exists():
        if not (target / COMPILED).exists():
            try:
                with _locked(settings, key):
                    if not (target / COMPILED).exists():
                        _readable_bytecode(target, echo)
            except (OSError, subprocess.SubprocessError, RuntimeBuildError) as e:
                # it still runs, slower (a user who may not write the runtime dir: its owner
                # repairs it at the next job); never a reason to fail the caller
                log.warning("runtime %s: bytecode not compiled: %s", target.name, e)
        return python
    if not BASE_PYTHON.exists():
        raise RuntimeBuildError(
            f"{BASE_PYTHON} is missing: sandbox runtimes are built from the system Python "
            "(apt-get install python3)"
        )
    settings.runtime_dir.mkdir(parents=True, exist_ok=True)
    for d in (settings.runtime_dir, settings.runtime_dir.parent):
        os.chmod(d, d.stat().st_mode | 0o755)  # sandboxes run as another user and read it
    with _locked(settings, key):
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
                "--compile-bytecode",
                "--python",
                str(tmp / "bin" / "python"),
                "-r",
                str(req),
            ],
            env,
        )
        subprocess.run(["chmod", "-R", "a+rX", str(tmp)], check=True, timeout=120)
        (tmp / ".complete").write_text(f"{time.time()}\n")
        (tmp / COMPILED).write_text(f"{time.time()}\n")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        if echo:
            echo(f"runtime {key} built in {time.monotonic() - started:.1f}s")
    return python


@contextlib.contextmanager
def _locked(settings: Settings, key: str) -> Iterator[None]:
    """The runtime's build lock (one build or repair at a time, across processes)."""
    with open(settings.runtime_dir / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _readable_bytecode(target: Path, echo: Callable[[str], None] | None) -> None:
    """Compile what the runtime's python has not (a runtime built without its bytecode) and
    make every file and directory readable by all (caches written under umask 077 were not),
    then mark the runtime done. Call under `_locked`."""
    started = time.monotonic()
    lib = target / "lib"
    python = str(target / "bin" / "python")
    # a file that does not compile (a template, another Python's syntax) cannot be imported
    # either: said, not fatal
    done = subprocess.run(
        [python, "-m", "compileall", "-q", "-j", "0", str(lib)],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    if done.returncode != 0:
        log.warning("runtime %s: some files did not compile: %s", target.name, done.stdout[-500:])
    subprocess.run(["chmod", "-R", "a+rX", str(target)], check=True, timeout=300)
    (target / COMPILED).write_text(f"{time.time()}\n")
    if echo:
        echo(f"runtime {target.name}: bytecode compiled in {time.monotonic() - started:.1f}s")


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
