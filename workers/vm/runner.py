"""stackml runner: runs on the VM, stdlib only, shipped over SSH by the provision step.

Layout under the job directory (``~/.stackml/job`` by default)::

    job.json     the job description written by the worker (no secrets but grant URLs)
    env/         the attached runtime (a venv whose .pth points at the shared runtime)
    package/     the trainer package, extracted
    input/       the job's input objects
    model/       STACKML_MODEL_DIR
    checkpoints/ STACKML_CHECKPOINT_DIR
    log          the trainer's stdout+stderr
    heartbeat    touched every HEARTBEAT seconds while the trainer runs
    started      created once (O_EXCL): makes `start` idempotent
    pid          the trainer's process group id
    exit_code    written atomically when the trainer exits

Commands (each prints one JSON object on stdout):
    prepare JOBDIR      attach the runtime, fetch the package and inputs
    start JOBDIR        start the trainer detached (idempotent)
    export JOBDIR       upload model/ with the write grant read from stdin
    kill JOBDIR         stop the trainer's process group
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

HEARTBEAT = 2.0
HTTP_TIMEOUT = 60
RETRIES = 3


class RunnerError(Exception):
    pass


def _load(job_dir: str) -> dict:
    with open(os.path.join(job_dir, "job.json")) as fh:
        return json.load(fh)


def _emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _signed_url(grant: dict, rel: str) -> str:
    quoted = urllib.parse.quote(rel)
    return f"{grant['url_prefix']}{quoted}?{grant['query']}"


def _http(method: str, url: str, data=None, headers=None):
    last: Exception | None = None
    for attempt in range(RETRIES):
        if hasattr(data, "seek"):
            data.seek(0)
        req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
        try:
            return urllib.request.urlopen(req, timeout=HTTP_TIMEOUT)
        except urllib.error.HTTPError as e:
            if e.code < 500:
                raise RunnerError(f"{method} {_redact(url)} answered {e.code} {e.reason}") from e
            last = e
        except (urllib.error.URLError, OSError) as e:
            last = e
        time.sleep(0.5 * (attempt + 1))
    raise RunnerError(f"{method} {_redact(url)} failed after {RETRIES} tries: {last}") from last


def _redact(url: str) -> str:
    return url.split("?", 1)[0]


# -- prepare ---------------------------------------------------------------------------------


def attach_runtime(runtime: str, dest: str) -> None:
    """A venv that sees the shared runtime's site-packages: milliseconds, no copy."""
    if os.path.exists(os.path.join(dest, "pyvenv.cfg")):
        return
    base = os.path.realpath(os.path.join(runtime, "bin", "python"))
    ver = "python{}.{}".format(*sys.version_info[:2])
    site = os.path.join(runtime, "lib", ver, "site-packages")
    if not os.path.isdir(site):
        raise RunnerError(f"runtime {runtime} has no {ver} site-packages")
    os.makedirs(os.path.join(dest, "bin"), exist_ok=True)
    own_site = os.path.join(dest, "lib", ver, "site-packages")
    os.makedirs(own_site, exist_ok=True)
    with open(os.path.join(own_site, "_stackml_runtime.pth"), "w") as fh:
        fh.write(site + "\n")
    for name in ("python", "python3"):
        link = os.path.join(dest, "bin", name)
        if not os.path.lexists(link):
            os.symlink(base, link)
    with open(os.path.join(dest, "pyvenv.cfg"), "w") as fh:
        fh.write(
            f"home = {os.path.dirname(base)}\ninclude-system-site-packages = false\n"
            f"version = {'.'.join(map(str, sys.version_info[:3]))}\n"
        )


def _safe_extract(tar_path: str, dest: str) -> None:
    """Regular files and directories only, inside `dest` (no links, devices, `..`)."""
    root = os.path.realpath(dest)
    with tarfile.open(tar_path, "r:gz") as tar:
        for m in tar:
            target = os.path.realpath(os.path.join(root, m.name))
            if os.path.isabs(m.name) or not (target == root or target.startswith(root + os.sep)):
                raise RunnerError(f"package member {m.name!r} points outside the package")
            if m.isdir():
                os.makedirs(target, exist_ok=True)
            elif m.isfile():
                os.makedirs(os.path.dirname(target), exist_ok=True)
                src = tar.extractfile(m)
                assert src is not None
                with src, open(target, "wb") as out:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
                os.chmod(target, 0o755 if m.mode & 0o111 else 0o644)


def prepare(job_dir: str) -> dict:
    job = _load(job_dir)
    for sub in ("package", "input", "model", "checkpoints"):
        os.makedirs(os.path.join(job_dir, sub), exist_ok=True)
    t0 = time.monotonic()
    attach_runtime(job["runtime"], os.path.join(job_dir, "env"))
    t_attach = time.monotonic() - t0
    pkg = os.path.join(job_dir, "package.tar.gz")
    if not os.path.exists(os.path.join(job_dir, "package", ".complete")):
        with _http("GET", job["package_url"]) as resp, open(pkg, "wb") as out:
            while chunk := resp.read(1 << 20):
                out.write(chunk)
        try:
            _safe_extract(pkg, os.path.join(job_dir, "package"))
        except (tarfile.TarError, OSError) as e:
            raise RunnerError(f"the trainer package is not a valid .tar.gz: {e}") from e
        open(os.path.join(job_dir, "package", ".complete"), "w").close()
    fetched = 0
    for item in job.get("inputs", []):
        target = os.path.join(job_dir, "input", item["name"])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with _http("GET", item["url"]) as resp, open(target + ".part", "wb") as out:
            while chunk := resp.read(1 << 20):
                out.write(chunk)
        os.replace(target + ".part", target)
        fetched += 1
    return {"ok": True, "attach_seconds": round(t_attach, 4), "inputs": fetched}


# -- start -----------------------------------------------------------------------------------


def start(job_dir: str) -> dict:
    try:
        fd = os.open(os.path.join(job_dir, "started"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return {"ok": True, "already_started": True}
    os.close(fd)
    if os.fork() > 0:
        return {"ok": True, "already_started": False}
    # the detached supervisor: own session, no terminal, survives the SSH channel
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    code = 1
    try:
        code = _supervise(job_dir)
    finally:
        _write_atomic(os.path.join(job_dir, "exit_code"), f"{code}\n")
        os._exit(0)


def _supervise(job_dir: str) -> int:
    job = _load(job_dir)
    env_dir = os.path.join(job_dir, "env")
    env = {
        "HOME": os.environ.get("HOME", job_dir),
        "PATH": f"{env_dir}/bin:/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "VIRTUAL_ENV": env_dir,
        "STACKML_JOB_ID": job["job_id"],
        "STACKML_PROJECT_ID": job["project_id"],
        "STACKML_INPUT_DIR": os.path.join(job_dir, "input"),
        "STACKML_MODEL_DIR": os.path.join(job_dir, "model"),
        "STACKML_CHECKPOINT_DIR": os.path.join(job_dir, "checkpoints"),
    }
    env.update(job.get("env", {}))
    argv = [os.path.join(env_dir, "bin", "python"), "-m", job["module"], *job.get("argv", [])]
    log = open(os.path.join(job_dir, "log"), "ab")
    stop = threading.Event()
    hb = os.path.join(job_dir, "heartbeat")

    def beat() -> None:
        while not stop.is_set():
            with open(hb, "w") as fh:
                fh.write(f"{time.time()}\n")
            stop.wait(HEARTBEAT)

    threading.Thread(target=beat, daemon=True).start()
    try:
        proc = subprocess.Popen(
            argv,
            cwd=os.path.join(job_dir, "package"),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as e:
        log.write(f"stackml-runner: cannot start the trainer: {e}\n".encode())
        log.close()
        stop.set()
        return 127
    _write_atomic(os.path.join(job_dir, "pid"), f"{proc.pid}\n")
    code = proc.wait()
    stop.set()
    if code < 0:
        log.write(f"stackml-runner: the trainer was killed by signal {-code}\n".encode())
        code = 128 - code
    log.close()
    return code


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# -- export ----------------------------------------------------------------------------------


def export(job_dir: str) -> dict:
    grant = json.loads(sys.stdin.read())
    model_dir = os.path.join(job_dir, "model")
    objects = []
    for root, dirs, files in os.walk(model_dir):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            rel = os.path.relpath(path, model_dir)
            md5 = hashlib.md5(usedforsecurity=False)
            with open(path, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    md5.update(chunk)
            size = os.path.getsize(path)
            with (
                open(path, "rb") as fh,
                _http(
                    "PUT",
                    _signed_url(grant, rel),
                    data=fh,
                    headers={
                        "Content-Length": str(size),
                        "Content-Type": "application/octet-stream",
                    },
                ) as resp,
            ):
                etag = (resp.headers.get("Etag") or "").strip('"')
            if etag and etag != md5.hexdigest():
                raise RunnerError(
                    f"upload of {rel} was corrupted: etag {etag} != md5 {md5.hexdigest()}"
                )
            objects.append({"key": rel, "size": size, "etag": md5.hexdigest()})
    return {"ok": True, "objects": objects}


def kill(job_dir: str) -> dict:
    try:
        with open(os.path.join(job_dir, "pid")) as fh:
            pgid = int(fh.read().strip())
        os.killpg(pgid, signal.SIGKILL)
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return {"ok": True, "killed": False}
    return {"ok": True, "killed": True}


COMMANDS = {"prepare": prepare, "start": start, "export": export, "kill": kill}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in COMMANDS:
        sys.stderr.write(f"usage: runner.py {{{','.join(COMMANDS)}}} JOBDIR\n")
        return 2
    try:
        _emit(COMMANDS[argv[0]](os.path.abspath(argv[1])))
    except RunnerError as e:
        sys.stderr.write(f"stackml-runner: {e}\n")
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
