"""stackml runner: runs on the VM, stdlib only, shipped over SSH by the provision step.

Layout under the job directory (``~/.stackml/job`` by default)::

    job.json     the job description written by the worker (no secrets but grant URLs)
    env/         the attached runtime (a venv whose .pth points at the shared runtime)
    package/     the trainer package, extracted
    input/       the job's input objects
    model/       STACKML_MODEL_DIR
    checkpoints/ STACKML_CHECKPOINT_DIR
    checkpoints.synced  what of checkpoints/ is in the store already (restartable jobs)
    log          the trainer's stdout+stderr
    heartbeat    touched every HEARTBEAT seconds while the trainer runs
    started      created once (O_EXCL): makes `start` idempotent
    pid          the trainer's process group id
    exit_code    written atomically when the trainer exits

Commands (each prints one JSON object on stdout):
    prepare JOBDIR      link ../python to the runtime's python, attach the runtime, fetch the
                        package and inputs
    start JOBDIR        start the trainer detached (idempotent)
    launch JOBDIR       prepare, then start: a job of one server is staged and started by one
                        SSH command (run by the runtime's python itself)
    export JOBDIR       upload model/ with the write grant read from stdin
    kill JOBDIR         stop the trainer's process group
    serve JOBDIR        fetch serve.json's model versions (size + md5 checked) into models/<V>/
                        and start the model server detached (idempotent; log, heartbeat, pid,
                        exit_code as for a trainer)
    stop-serving JOBDIR SIGTERM the model server, SIGKILL after STOP_GRACE seconds
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time

# Every command starts a Python, two per job on the critical path (launch, export): modules
# only some commands need are imported where they are used (hashlib, tarfile, shutil,
# ipaddress, ssl), HTTP is spoken on a socket (below: http.client would bring the email
# package, ~14 ms), the trainer is started without subprocess (~8 ms), and typing is left
# out at run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import socket
    from collections.abc import Callable
    from typing import IO, NoReturn

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


# -- HTTP ------------------------------------------------------------------------------------
# A small HTTP/1.1 client on a socket (TLS with the system's CAs for https): http.client, and
# urllib.request on top of it, import the email package to parse headers, about 14 ms of CPU
# of every runner command that talks to the store (launch, export). It sends Content-Length
# bodies, reads Content-Length, chunked and to-the-close answers, and keeps connections alive.

MAX_LINE = 65536
MAX_HEADERS = 200


class BadAnswer(OSError):
    """What came back is not an HTTP answer (a connection closed or garbled mid-answer)."""


class _Headers(dict):
    """Header names in lower case; get() takes any case."""

    def get(self, name: str, default=None):
        return super().get(name.lower(), default)


class _Conn:
    """One kept-alive connection to a store endpoint (scheme, host, port of a URL)."""

    def __init__(self, url: str) -> None:
        from urllib.parse import urlsplit

        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise RunnerError(f"not an http(s) URL: {_redact(url)}")
        self.https = u.scheme == "https"
        self.host = u.hostname
        self.port = u.port or (443 if self.https else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = (443 if self.https else 80) == self.port
        self.host_header = host if default else f"{host}:{self.port}"
        self.sock: socket.socket | None = None
        self.fp: IO[bytes] | None = None

    def close(self) -> None:
        if self.fp is not None:
            self.fp.close()
        if self.sock is not None:
            self.sock.close()
        self.sock = self.fp = None

    def _open(self) -> None:
        import socket

        sock = socket.create_connection((self.host, self.port), timeout=HTTP_TIMEOUT)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.https:
                import ssl

                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
        except BaseException:
            sock.close()
            raise
        self.sock, self.fp = sock, sock.makefile("rb")

    def send_head(self, method: str, target: str, headers: dict, length: int | None) -> None:
        """The request line and headers (the body, `length` bytes, follows with send())."""
        if self.sock is None:
            self._open()
        lines = [f"{method} {target} HTTP/1.1", f"Host: {self.host_header}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if length is not None:
            lines.append(f"Content-Length: {length}")
        for line in lines:
            if "\r" in line or "\n" in line:
                raise RunnerError("a header holds a line break")
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def send(self, data: bytes) -> None:
        assert self.sock is not None
        self.sock.sendall(data)

    def answer(self, method: str) -> _Answer:
        return _Answer(self, method)


class _Answer:
    """The answer to one request: status, reason, headers, and its body through read()."""

    def __init__(self, conn: _Conn, method: str) -> None:
        self._conn = conn
        fp = conn.fp
        assert fp is not None
        while True:  # interim answers (100 Continue) are skipped
            line = fp.readline(MAX_LINE + 1)
            if not line:
                raise BadAnswer("the connection closed before an answer")
            version, _, rest = line.decode("latin-1").rstrip("\r\n").partition(" ")
            code, _, reason = rest.partition(" ")
            if not version.startswith("HTTP/") or not code.isdigit() or len(code) != 3:
                raise BadAnswer(f"not an HTTP answer: {line[:60]!r}")
            headers = _read_headers(fp)
            if not 100 <= int(code) < 200:
                break
        self.status: int = int(code)
        self.reason: str = reason.strip()
        self.headers: _Headers = headers
        self.will_close = version == "HTTP/1.0" or "close" in headers.get("connection", "").lower()
        self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        self._left: int | None = None  # body bytes left (None: up to the close)
        if method == "HEAD" or self.status in (204, 304):
            self._left = 0
        elif not self._chunked:
            length = headers.get("content-length")
            if length is None:
                self.will_close = True
            elif not length.strip().isdigit():
                raise BadAnswer(f"Content-Length {length[:20]!r}")
            else:
                self._left = int(length)
        self._done: bool = self._left == 0

    def read(self, n: int = -1) -> bytes:
        """Up to `n` bytes of the body (all of it when n < 0); b"" at its end."""
        if n < 0:
            return b"".join(iter(lambda: self.read(1 << 20), b""))
        if self._done or n == 0:
            return b""
        fp = self._conn.fp
        assert fp is not None
        if self._chunked:
            if self._left is None or self._left == 0:
                size = fp.readline(MAX_LINE + 1).split(b";", 1)[0].strip()
                try:
                    self._left = int(size, 16)
                except ValueError as e:
                    raise BadAnswer(f"chunk size {size[:20]!r}") from e
                if self._left == 0:
                    _read_headers(fp)  # the trailer
                    self._done = True
                    return b""
            data = fp.read(min(n, self._left))
            if not data:
                raise BadAnswer("the connection closed inside a chunk")
            self._left -= len(data)
            if self._left == 0 and fp.readline(MAX_LINE + 1) not in (b"\r\n", b"\n"):
                raise BadAnswer("a chunk does not end with CRLF")
            return data
        data = fp.read(n if self._left is None else min(n, self._left))
        if self._left is None:
            self._done = not data
            return data
        if not data:
            raise BadAnswer(f"the connection closed {self._left} bytes before the body's end")
        self._left -= len(data)
        self._done = self._left == 0
        return data

    def drain(self) -> None:
        """Read the rest of the body, so that the connection can carry the next request."""
        while self.read(1 << 20):
            pass

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> _Answer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_headers(fp) -> _Headers:
    headers = _Headers()
    for _ in range(MAX_HEADERS):
        line = fp.readline(MAX_LINE + 1)
        if line in (b"\r\n", b"\n", b""):
            return headers
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise BadAnswer(f"a header line without a colon: {line[:60]!r}")
        key = name.strip().lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    raise BadAnswer(f"more than {MAX_HEADERS} header lines")


def _target(url: str) -> str:
    from urllib.parse import urlsplit

    u = urlsplit(url)
    return (u.path or "/") + (f"?{u.query}" if u.query else "")


def _http(method: str, url: str, data: bytes | None = None, headers: dict | None = None):
    """One request on a new connection, retried on 5xx and broken connections; the answer
    (a context manager: read() its body). A 4xx is a RunnerError that names it."""
    target = _target(url)
    last: Exception | str | None = None
    for attempt in range(RETRIES):
        conn = _Conn(url)
        try:
            conn.send_head(method, target, headers or {}, None if data is None else len(data))
            if data:
                conn.send(data)
            resp = conn.answer(method)
        except OSError as e:
            conn.close()
            last = e
        else:
            if 200 <= resp.status < 300:
                return resp
            conn.close()
            if resp.status < 500:
                raise RunnerError(f"{method} {_redact(url)} answered {resp.status} {resp.reason}")
            last = f"{resp.status} {resp.reason}"
        time.sleep(0.5 * (attempt + 1))
    cause = last if isinstance(last, Exception) else None
    raise RunnerError(f"{method} {_redact(url)} failed after {RETRIES} tries: {last}") from cause


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
    import tarfile

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


def _link_python(job_dir: str, runtime: str) -> None:
    """JOBDIR/../python -> the runtime's python: the later commands (start, export, kill) are
    run by it. Replaced atomically when it points elsewhere (a runtime installed later)."""
    link = os.path.join(os.path.dirname(job_dir), "python")
    target = os.path.join(runtime, "bin", "python")
    if os.path.islink(link) and os.readlink(link) == target:
        return
    tmp = f"{link}.tmp-{os.getpid()}"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def prepare(job_dir: str) -> dict:
    job = _load(job_dir)
    _link_python(job_dir, job["runtime"])
    for sub in ("package", "input", "model", "checkpoints"):
        os.makedirs(os.path.join(job_dir, sub), exist_ok=True)
    t0 = time.monotonic()
    attach_runtime(job["runtime"], os.path.join(job_dir, "env"))
    t_attach = time.monotonic() - t0
    if job.get("kind") == BATCH:
        # the predictor fetches the model and the inputs itself, while the job runs (no
        # provision deadline on how much there is to read)
        return {"ok": True, "attach_seconds": round(t_attach, 4), "inputs": 0}
    pkg = os.path.join(job_dir, "package.tar.gz")
    if not os.path.exists(os.path.join(job_dir, "package", ".complete")):
        with _http("GET", job["package_url"]) as resp, open(pkg, "wb") as out:
            while chunk := resp.read(1 << 20):
                out.write(chunk)
        import tarfile

        try:
            _safe_extract(pkg, os.path.join(job_dir, "package"))
        except (tarfile.TarError, OSError) as e:
            raise RunnerError(f"the trainer package is not a valid .tar.gz: {e}") from e
        open(os.path.join(job_dir, "package", ".complete"), "w").close()
    restored = _restore_checkpoints(job_dir, job.get("checkpoints") or [])
    fetched = 0
    for item in job.get("inputs", []):
        target = os.path.join(job_dir, "input", item["name"])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with _http("GET", item["url"]) as resp, open(target + ".part", "wb") as out:
            while chunk := resp.read(1 << 20):
                out.write(chunk)
        os.replace(target + ".part", target)
        fetched += 1
    return {
        "ok": True,
        "attach_seconds": round(t_attach, 4),
        "inputs": fetched,
        "checkpoints": restored,
    }


def _restore_checkpoints(job_dir: str, items: list) -> int:
    """Fetch a restarted job's synced checkpoints into checkpoints/ (size and MD5 checked) and
    record them as synced, so that the sync does not upload them again."""
    root = os.path.join(job_dir, "checkpoints")
    synced = {}
    for item in items:
        name = item["name"]
        _check_rel_path(name, "a checkpoint")
        target = os.path.join(root, name)
        _fetch_verified(item["url"], target, int(item["size"]), str(item["md5"]))
        st = os.stat(target)
        synced[name] = [st.st_size, st.st_mtime_ns]
    if items:
        _write_atomic(os.path.join(job_dir, SYNCED), json.dumps(synced))
    return len(items)


# -- start -----------------------------------------------------------------------------------


def launch(job_dir: str) -> dict:
    out = prepare(job_dir)
    out["start"] = start(job_dir)
    return out


def start(job_dir: str) -> dict:
    try:
        fd = os.open(os.path.join(job_dir, "started"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return {"ok": True, "already_started": True}
    os.close(fd)
    if os.fork() > 0:
        return {"ok": True, "already_started": False}
    _detach_and_supervise(job_dir, lambda: _supervise(job_dir))


def _detach_and_supervise(job_dir: str, supervise: Callable[[], int]) -> NoReturn:
    """In a forked child: become the detached supervisor and never return.

    Own session, no terminal, survives the SSH channel; runs `supervise` and writes its code to
    exit_code atomically (1 when it raised).
    """
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    code = 1
    try:
        code = supervise()
    finally:
        _write_atomic(os.path.join(job_dir, "exit_code"), f"{code}\n")
        os._exit(0)


BATCH = "batch_prediction"
BATCH_PREDICTOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "batch_predictor.py")
BATCH_RESTARTS = 3  # a predictor killed by a signal is started again this many times
KILLED = "killed"  # written by `kill` first: a stopped job is not restarted


def _supervise(job_dir: str) -> int:
    job = _load(job_dir)
    if job.get("kind") == BATCH:
        return _supervise_batch(job_dir, job)
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
    if job.get("restart"):
        with open(os.path.join(job_dir, "log"), "ab") as log:
            log.write(
                f"stackml-runner: restart {int(job['restart'])}: "
                f"{len(job.get('checkpoints') or [])} checkpoint files restored\n".encode()
            )
    sync = _CheckpointSync(job_dir, job["checkpoint_sync"]) if job.get("checkpoint_sync") else None
    stop = threading.Event()
    if sync is not None:
        threading.Thread(target=sync.loop, args=(stop,), daemon=True).start()
    if job.get("checkpoint_feed"):
        threading.Thread(target=_CheckpointFeed(job_dir).loop, args=(stop,), daemon=True).start()
    code = _run_supervised(
        job_dir,
        argv,
        env,
        cwd=os.path.join(job_dir, "package"),
        start_label="the trainer",
        kill_label="the trainer",
    )
    stop.set()
    if sync is not None:
        # what the trainer wrote last, before exit_code is written; the heartbeat goes on
        # meanwhile (a long upload is not a lost server)
        done = threading.Event()
        threading.Thread(target=_beat, args=(job_dir, done), daemon=True).start()
        try:
            # (a file that changes after the trainer's exit - a child it left behind - stops a
            # pass; the next one sends the rest)
            for _ in range(FINAL_SYNC_PASSES):
                if sync.run_pass(final=True) is not None:
                    break
        finally:
            done.set()
    return code


def _beat(job_dir: str, stop: threading.Event) -> None:
    """Touch heartbeat every HEARTBEAT seconds until `stop` is set."""
    hb = os.path.join(job_dir, "heartbeat")
    while not stop.is_set():
        with open(hb, "w") as fh:
            fh.write(f"{time.time()}\n")
        stop.wait(HEARTBEAT)


FEED = "checkpoints.feed"
FEED_INTERVAL = 1.0


class _CheckpointFeed:
    """A side-car evaluator's STACKML_CHECKPOINT_DIR, filled with the chief's checkpoints: the
    poll step writes `checkpoints.feed` (the files of the job's checkpoint prefix in the store,
    each with a signed URL, size and MD5) whenever the chief synced more. Every FEED_INTERVAL
    the runner reads it when it changed, fetches the new or changed files aside (verified),
    then moves them into checkpoints/ larger first, so that the trainer never finds an index
    (TensorFlow's `checkpoint`, small) naming data that is not there yet. A feed that does not
    parse (being written) is read again the next time; a failed fetch is one log line and is
    retried."""

    def __init__(self, job_dir: str) -> None:
        self.job_dir = job_dir
        self.root = os.path.join(job_dir, "checkpoints")
        self.aside = os.path.join(job_dir, "checkpoints.fetching")
        self.path = os.path.join(job_dir, FEED)
        self.seen: dict[str, str] = {}  # name -> md5 of what is in checkpoints/
        self.read_at = -1
        self.last_error = ""

    def loop(self, stop: threading.Event) -> None:
        while not stop.wait(FEED_INTERVAL):
            try:
                self.run_pass()
                self.last_error = ""
            except Exception as e:  # noqa: BLE001 - a failed fetch is retried, never fatal
                text = f"{type(e).__name__}: {e}"[:300]
                if text != self.last_error:  # one line per distinct failure
                    self.last_error = text
                    with open(os.path.join(self.job_dir, "log"), "ab") as log:
                        log.write(f"stackml-runner: checkpoint feed failed: {text}\n".encode())

    def run_pass(self) -> int:
        """Fetch what the feed has that checkpoints/ has not; the files moved in."""
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except FileNotFoundError:
            return 0
        if mtime == self.read_at:
            return 0
        try:
            with open(self.path, "rb") as fh:
                items = json.loads(fh.read())
        except ValueError:
            return 0  # being written: read again next time
        fetched = []
        for item in items:
            name, md5 = item["name"], str(item["md5"])
            _check_rel_path(name, "a checkpoint")
            if self.seen.get(name) == md5:
                continue
            part = os.path.join(self.aside, name)
            _fetch_verified(item["url"], part, int(item["size"]), md5)
            fetched.append((int(item["size"]), name, md5, part))
        for _size, name, md5, part in sorted(fetched, key=lambda f: (-f[0], f[1])):
            target = os.path.join(self.root, name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.replace(part, target)
            self.seen[name] = md5
        self.read_at = mtime
        return len(fetched)


SYNCED = "checkpoints.synced"
CHECKPOINT_QUIET = 1.0  # a pass uploads only a directory where nothing changed for this long


FINAL_SYNC_PASSES = 3


class _CheckpointSync:
    """Uploads new and changed files of checkpoints/ to the job's checkpoint prefix (its write
    grant in job.json), every `seconds` while the trainer runs and once after it exits.

    A pass uploads only when nothing in the directory changed for CHECKPOINT_QUIET seconds (else
    it tries again after that long), so that what is in the store is one checkpoint, not the
    index of the next one beside half of its data; and it uploads the files oldest first, so
    that a pass cut short leaves no index naming data that is not in the store. A pass that
    outlasts the quiet (large files) stops at the first file the trainer changed since the walk
    (its next save began: the index it renames into place names data this pass does not send)
    and sends the rest after the next quiet. A failure is one line in the log, never the
    trainer's end: the next pass tries again."""

    def __init__(self, job_dir: str, cfg: dict) -> None:
        self.root = os.path.join(job_dir, "checkpoints")
        self.state = os.path.join(job_dir, SYNCED)
        self.log = os.path.join(job_dir, "log")
        self.every = max(CHECKPOINT_QUIET, float(cfg.get("seconds") or 10))
        self.uploader = _Uploader(cfg["url_prefix"], cfg["query"])
        self.lock = threading.Lock()
        self.last_error = ""
        try:
            with open(self.state) as fh:
                self.seen = json.load(fh)
        except (OSError, ValueError):
            self.seen = {}

    def loop(self, stop: threading.Event) -> None:
        wait = self.every
        while not stop.wait(wait):
            wait = self.every if self.run_pass(final=False) is not None else CHECKPOINT_QUIET

    def run_pass(self, final: bool) -> int | None:
        """Files uploaded; None when the directory was not quiet (nothing was sent)."""
        with self.lock:
            try:
                return self._pass(final)
            except Exception as e:  # noqa: BLE001 - the trainer must never die of the sync
                text = f"{type(e).__name__}: {e}"
                if text != self.last_error:  # one line per distinct error, not one per pass
                    self.last_error = text
                    with open(self.log, "ab") as log:
                        log.write(f"stackml-runner: checkpoint sync failed: {text}\n".encode())
                return 0

    def _pass(self, final: bool) -> int | None:
        import stat

        files = []
        newest = 0.0
        for dirpath, dirs, names in os.walk(self.root):
            dirs.sort()
            for name in sorted(names):
                path = os.path.join(dirpath, name)
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue  # removed meanwhile (an old checkpoint the trainer dropped)
                if not stat.S_ISREG(st.st_mode):
                    continue  # links and special files are not checkpoints
                newest = max(newest, st.st_mtime)
                files.append((os.path.relpath(path, self.root), path, st))
        if not final and time.time() - newest < CHECKPOINT_QUIET:
            return None
        sent = 0
        # in the order they were written: the file a trainer writes last to say a checkpoint
        # is whole (TensorFlow's `checkpoint` index, a step counter) goes up after the data it
        # names, so a pass cut short (the server lost mid-upload) never leaves an index in the
        # store whose data is not there. Files written within one kernel clock tick (a few
        # ms) have the same mtime: of those the larger go first, since the file that names
        # the others is the small one (`checkpoint` after ckpt-N.index after its data)
        files.sort(key=lambda f: (f[2].st_mtime_ns, -f[2].st_size, f[0]))
        whole = True
        try:
            for rel, path, st in files:
                sig = [st.st_size, st.st_mtime_ns]
                if self.seen.get(rel) == sig:
                    continue
                # the file as the walk saw it, or none: a long pass can outlast the quiet, and
                # the trainer's next save replaces the index (a rename) with one that names
                # data this pass does not send. Sent from the descriptor checked against the
                # walk, and the pass stops at the first file that changed since
                if not self._put_unchanged(rel, path, st):
                    whole = False
                    break
                self.seen[rel] = sig
                sent += 1
        finally:
            if sent:
                _write_atomic(self.state, json.dumps(self.seen))
        if not whole:
            return None  # the next checkpoint began: the rest after the next quiet
        self.last_error = ""
        return sent

    def _put_unchanged(self, rel: str, path: str, st: os.stat_result) -> bool:
        """Upload `path` if it is still the file the walk stat'ed (same inode, size and
        mtime), from the descriptor that was checked; False when it changed or went."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:  # removed (an old checkpoint dropped) or replaced by a link
            return False
        try:
            now = os.fstat(fd)
            if (now.st_ino, now.st_size, now.st_mtime_ns) != (
                st.st_ino,
                st.st_size,
                st.st_mtime_ns,
            ):
                return False
            self.uploader.put(rel, fd, 0, st.st_size)
        finally:
            os.close(fd)
        return True


def _supervise_batch(job_dir: str, job: dict) -> int:
    """Run the batch predictor; one killed by a signal (OOM, a stray kill) is started again, up
    to BATCH_RESTARTS times, and resumes: it computes only the shards missing from the store."""
    env_dir = os.path.join(job_dir, "env")
    env = {
        "HOME": os.environ.get("HOME", job_dir),
        "PATH": f"{env_dir}/bin:/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "VIRTUAL_ENV": env_dir,
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "STACKML_JOB_ID": job["job_id"],
        "STACKML_PROJECT_ID": job["project_id"],
        **job.get("env", {}),
    }
    argv = [os.path.join(env_dir, "bin", "python"), BATCH_PREDICTOR, job_dir]
    code = 0
    for attempt in range(BATCH_RESTARTS + 1):
        code = _run_supervised(
            job_dir,
            argv,
            env,
            cwd=job_dir,
            start_label="the batch predictor",
            kill_label="the batch predictor",
        )
        if code <= 128 or os.path.exists(os.path.join(job_dir, KILLED)):
            return code
        if attempt < BATCH_RESTARTS:
            with open(os.path.join(job_dir, "log"), "ab") as log:
                log.write(b"stackml-runner: restarting the batch predictor (missing shards only)\n")
    return code


def _run_supervised(
    job_dir: str,
    argv: list[str],
    env: dict[str, str],
    *,
    cwd: str,
    start_label: str,
    kill_label: str,
) -> int:
    """Run argv in its own session, appending to log, touching heartbeat, writing pid.

    Returns the exit code (127 when it cannot start, 128+N when killed by signal N); the labels
    name the program in the lines written to log ("cannot start <start_label>",
    "<kill_label> was killed by signal N").
    """
    log = open(os.path.join(job_dir, "log"), "ab")
    stop = threading.Event()
    threading.Thread(target=_beat, args=(job_dir, stop), daemon=True).start()
    try:
        pid = _spawn(argv, env, cwd, log.fileno())
    except OSError as e:
        log.write(f"stackml-runner: cannot start {start_label}: {e}\n".encode())
        log.close()
        stop.set()
        return 127
    _write_atomic(os.path.join(job_dir, "pid"), f"{pid}\n")
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    # what it left running in its session (a child it did not wait for) would go on writing
    # the log and the model after the exit status says they are whole: stopped first
    left = _terminate_group(pid, LEFTOVER_GRACE) is not None
    stop.set()
    if code < 0:
        log.write(f"stackml-runner: {kill_label} was killed by signal {-code}\n".encode())
        code = 128 - code
    if left:
        log.write(
            f"stackml-runner: {kill_label} exited leaving processes running; they were "
            "stopped\n".encode()
        )
    log.close()
    return code


LEFTOVER_GRACE = 2.0  # seconds a program's leftover processes get between SIGTERM and SIGKILL


def _terminate_group(
    pgid: int, grace: float, alive: Callable[[int], bool] | None = None
) -> bool | None:
    """SIGTERM process group `pgid`, SIGKILL what is still `alive` (default: running, zombies
    aside) after `grace` seconds: None when nothing of it was, False when SIGTERM ended it,
    True when it took SIGKILL."""
    alive = alive or _group_alive
    if not alive(pgid):
        return None
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return None
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not alive(pgid):
            return False
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return True


def _group_exists(pgid: int) -> bool:
    """Whether process group `pgid` has members, zombies not yet reaped included (kill(2))."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs. Zombies do not count: orphans are
    reparented to a PID 1 that may never reap them, and kill(2) still finds those."""
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:  # no /proc: kill(2) says whether the group has members
        return _group_exists(pgid)
    for p in pids:
        try:
            with open(f"/proc/{p}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue  # ended meanwhile
        fields = stat[stat.rfind(b")") + 2 :].split()  # state ppid pgrp ... (comm may hold ")")
        if len(fields) > 2 and fields[2] == str(pgid).encode() and fields[0] != b"Z":
            return True
    return False


def _spawn(argv: list[str], env: dict[str, str], cwd: str, out: int) -> int:
    """Start argv (looked up on env's PATH) in a session of its own, in cwd, with stdin from
    /dev/null and stdout and stderr on fd `out`: its pid. An OSError when it cannot be
    executed. (What subprocess.Popen does here, without the ~8 ms of CPU its import costs.)"""
    r, w = os.pipe()  # close-on-exec: empty when the exec succeeded, else the child's errno
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setsid()
            os.chdir(cwd)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(out, 1)
            os.dup2(out, 2)
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # Python ignores it; the child not
            os.execvpe(argv[0], argv, env)
        except OSError as e:
            os.write(w, f"{e.errno or 0}:{e.strerror or e}".encode())
        finally:
            os._exit(127)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        failed = fh.read()
    if failed:
        os.waitpid(pid, 0)
        number, _, text = failed.decode(errors="replace").partition(":")
        raise OSError(int(number) if number.isdigit() else 0, f"{text}: {argv[0]!r}")
    return pid


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# -- export ----------------------------------------------------------------------------------


EXPORT_THREADS = 4
SEGMENTS_DIR = ".stackml-segments"  # SLO segments go here, inside the granted prefix
MAX_SEGMENTS = 1000  # Swift's default max_manifest_segments
SEND_BLOCK = 1 << 20


def export(job_dir: str) -> dict:
    """Upload model/ with the write grant on stdin; every object is verified by its ETag.

    Files larger than the grant's `segment_bytes` (when > 0) go up as segments under
    `<prefix>.stackml-segments/<file>/<n>`; such an object is reported with its `segments`
    and the SLO ETag (MD5 of the segment MD5s, concatenated), which is what Swift lists once
    the worker has PUT the manifest -- a TempURL cannot create an SLO manifest itself.
    """
    import hashlib

    grant = json.loads(sys.stdin.read())
    model_dir = os.path.join(job_dir, "model")
    seg_bytes = int(grant.get("segment_bytes") or 0)
    files = []
    for root, dirs, names in os.walk(model_dir):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(root, name)
            if os.path.islink(path):
                continue
            files.append((os.path.relpath(path, model_dir), path, os.path.getsize(path)))
    # (object key, local path, offset, length); a segmented file is several of these
    parts: list[tuple[str, str, int, int]] = []
    layout: list[tuple[str, int, list[tuple[str, int]] | None]] = []
    for rel, path, size in files:
        if seg_bytes > 0 and size > seg_bytes:
            step = max(seg_bytes, -(-size // MAX_SEGMENTS))
            seg_list: list[tuple[str, int]] = []
            for n, offset in enumerate(range(0, size, step)):
                key = f"{SEGMENTS_DIR}/{rel}/{n:08d}"
                length = min(step, size - offset)
                parts.append((key, path, offset, length))
                seg_list.append((key, length))
            layout.append((rel, size, seg_list))
        else:
            parts.append((rel, path, 0, size))
            layout.append((rel, size, None))
    uploader = _Uploader(grant["url_prefix"], grant["query"])
    md5_of: dict[str, str] = {}
    if len(parts) > 1:
        from concurrent.futures import ThreadPoolExecutor

        # biggest first, so that one large file does not finish alone at the end
        order = sorted(parts, key=lambda p: -p[3])
        with ThreadPoolExecutor(max_workers=min(EXPORT_THREADS, len(order))) as pool:
            md5_of = dict(pool.map(lambda p: (p[0], uploader.put(*p)), order))
    else:  # no pool for one file (concurrent.futures imports logging: ~3.5 ms of CPU)
        md5_of = {p[0]: uploader.put(*p) for p in parts}
    uploader.close()
    objects = []
    for rel, size, segs in layout:
        if segs is None:
            objects.append({"key": rel, "size": size, "etag": md5_of[rel]})
            continue
        seg_md5s = [md5_of[k] for k, _ in segs]
        etag = hashlib.md5("".join(seg_md5s).encode(), usedforsecurity=False).hexdigest()
        objects.append(
            {
                "key": rel,
                "size": size,
                "etag": etag,
                "segments": [
                    {"key": k, "size": n, "etag": m}
                    for (k, n), m in zip(segs, seg_md5s, strict=True)
                ],
            }
        )
    return {"ok": True, "objects": objects}


class _Uploader:
    """PUTs byte ranges of local files to signed URLs over kept-alive connections (one per
    thread), hashing what it sends and checking it against the ETag the store answers."""

    def __init__(self, url_prefix: str, query: str) -> None:
        from urllib.parse import urlsplit

        self._prefix = url_prefix
        self._base = urlsplit(url_prefix).path
        self._query = query
        self._local = threading.local()
        self._all: list[_Conn] = []
        self._lock = threading.Lock()

    def _conn(self) -> _Conn:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = _Conn(self._prefix)
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()

    def put(self, key: str, path: str | int, offset: int, length: int) -> str:
        """PUT `length` bytes from `offset` of `path` (a file name, or an open descriptor,
        which stays open) to `key`; returns the ETag."""
        import hashlib
        from urllib.parse import quote

        target = f"{self._base}{quote(key)}?{self._query}"
        headers = {"Content-Type": "application/octet-stream"}
        last: Exception | str | None = None
        for attempt in range(RETRIES):
            md5 = hashlib.md5(usedforsecurity=False)
            conn = self._conn()
            try:
                conn.send_head("PUT", target, headers, length)
                try:
                    with open(path, "rb", closefd=not isinstance(path, int)) as fh:
                        fh.seek(offset)
                        left = length
                        while left > 0:
                            chunk = fh.read(min(SEND_BLOCK, left))
                            if not chunk:
                                raise RunnerError(f"{path} shrank while it was uploaded")
                            md5.update(chunk)
                            conn.send(chunk)
                            left -= len(chunk)
                except OSError as send_err:
                    # the store may have refused early (expired or out-of-prefix grant): read why
                    try:
                        resp = conn.answer("PUT")
                    except OSError:
                        raise send_err from None
                    finally:
                        conn.close()  # what was not sent is still owed on it
                    if resp.status < 500:
                        raise RunnerError(
                            f"PUT {key} answered {resp.status} {resp.reason}"
                        ) from send_err
                    raise
                resp = conn.answer("PUT")
                resp.drain()
            except OSError as e:
                conn.close()
                last = e
                time.sleep(0.5 * (attempt + 1))
                continue
            if resp.will_close:
                conn.close()
            if resp.status >= 500:
                last = f"{resp.status} {resp.reason}"
                time.sleep(0.5 * (attempt + 1))
                continue
            if resp.status not in (200, 201):
                raise RunnerError(f"PUT {key} answered {resp.status} {resp.reason}")
            etag = (resp.headers.get("Etag") or "").strip('"')
            if etag and etag != md5.hexdigest():
                raise RunnerError(
                    f"upload of {key} was corrupted: etag {etag} != md5 {md5.hexdigest()}"
                )
            return md5.hexdigest()
        cause = last if isinstance(last, Exception) else None
        raise RunnerError(f"PUT {key} failed after {RETRIES} tries: {last}") from cause


def kill(job_dir: str) -> dict:
    try:
        open(os.path.join(job_dir, KILLED), "w").close()
    except OSError:
        pass  # no job directory: nothing was started
    try:
        with open(os.path.join(job_dir, "pid")) as fh:
            pgid = int(fh.read().strip())
        os.killpg(pgid, signal.SIGKILL)
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return {"ok": True, "killed": False}
    return {"ok": True, "killed": True}


# -- serve -----------------------------------------------------------------------------------

SERVE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
MD5_HEX = re.compile(r"^[0-9a-f]{32}$")
MODEL_SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_server.py")
TF_SERVING_BIN = "tensorflow_model_server"
STOP_GRACE = 10.0


def _load_serving(job_dir: str) -> dict:
    """serve.json, checked: a model name, a port, versions of files with safe relative paths."""
    import urllib.parse

    try:
        with open(os.path.join(job_dir, "serve.json")) as fh:
            cfg = json.load(fh)
    except (OSError, ValueError) as e:
        raise RunnerError(f"cannot read serve.json: {e}") from e
    if not isinstance(cfg, dict):
        raise RunnerError("serve.json is not a JSON object")
    name, port = cfg.get("model_name"), cfg.get("port")
    if not isinstance(name, str) or not SERVE_NAME.match(name):
        raise RunnerError(f"serve.json: model_name {name!r} is not a model name")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise RunnerError(f"serve.json: port {port!r} is not a TCP port")
    if not isinstance(cfg.get("runtime"), str) or not os.path.isabs(cfg["runtime"]):
        raise RunnerError("serve.json: runtime must be an absolute path")
    versions = cfg.get("versions")
    if not isinstance(versions, list) or not versions:
        raise RunnerError("serve.json: versions must be a non-empty list")
    seen: set[int] = set()
    for v in versions:
        number = v.get("version") if isinstance(v, dict) else None
        if not isinstance(number, int) or isinstance(number, bool) or number < 1:
            raise RunnerError(f"serve.json: version {number!r} is not an integer >= 1")
        if number in seen:
            raise RunnerError(f"serve.json: version {number} is listed twice")
        seen.add(number)
        files = v.get("files")
        if not isinstance(files, list) or not files:
            raise RunnerError(f"serve.json: version {number} has no files")
        paths = set()
        for f in files:
            if not isinstance(f, dict):
                raise RunnerError(f"serve.json: version {number}: a file is not an object")
            _check_rel_path(f.get("path"))
            url, size, md5 = f.get("url"), f.get("size"), f.get("md5")
            if not isinstance(url, str) or urllib.parse.urlsplit(url).scheme not in (
                "http",
                "https",
            ):
                raise RunnerError(f"serve.json: {f['path']}: url must be http(s)")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise RunnerError(f"serve.json: {f['path']}: size must be an integer >= 0")
            if not isinstance(md5, str) or not MD5_HEX.match(md5):
                raise RunnerError(f"serve.json: {f['path']}: md5 must be 32 hex digits")
            paths.add(f["path"])
        if "saved_model.pb" not in paths:
            raise RunnerError(f"serve.json: version {number} has no saved_model.pb at its root")
    return cfg


def _check_rel_path(path: object, what: str = "serve.json: file path") -> None:
    if not isinstance(path, str) or not path or len(path) > 1024:
        raise RunnerError(f"{what} {path!r} is not a path")
    if any(ord(c) < 32 or ord(c) == 127 for c in path) or "\\" in path:
        raise RunnerError(f"{what} {path!r} has control characters")
    parts = path.split("/")
    if path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise RunnerError(f"{what} {path!r} must be relative, without . or ..")


def _file_md5(path: str) -> str:
    import hashlib

    md5 = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            md5.update(chunk)
    return md5.hexdigest()


def _fetch_verified(url: str, target: str, size: int, md5_hex: str) -> bool:
    """GET url into target, checking size and md5; False when target already holds it."""
    import hashlib

    if os.path.isfile(target) and os.path.getsize(target) == size:
        if _file_md5(target) == md5_hex:
            return False
    os.makedirs(os.path.dirname(target), exist_ok=True)
    md5 = hashlib.md5(usedforsecurity=False)
    got = 0
    part = target + ".part"
    try:
        with _http("GET", url) as resp, open(part, "wb") as out:
            while chunk := resp.read(1 << 20):
                got += len(chunk)
                if got > size:
                    break
                md5.update(chunk)
                out.write(chunk)
        if got != size:
            raise RunnerError(
                f"{os.path.basename(target)}: fetched {'more than ' if got > size else ''}"
                f"{got} bytes, expected {size}"
            )
        if md5.hexdigest() != md5_hex:
            raise RunnerError(
                f"{os.path.basename(target)}: md5 {md5.hexdigest()} != expected {md5_hex}"
            )
    except BaseException:
        if os.path.exists(part):
            os.unlink(part)
        raise
    os.replace(part, target)
    return True


def model_server_argv(job_dir: str, cfg: dict) -> list[str]:
    """tensorflow_model_server when the image has it, else stackml's model server (same flags;
    ours also binds to serve.json's `bind`, TF Serving listens on every address)."""
    flags = [
        f"--rest_api_port={cfg['port']}",
        f"--model_name={cfg['model_name']}",
        f"--model_base_path={os.path.join(job_dir, 'models')}",
    ]
    choice = cfg.get("server", "auto")
    if choice not in ("auto", "tfserving", "stackml"):
        raise RunnerError(f"serve.json: server {choice!r} is not auto, tfserving or stackml")
    import ipaddress
    import shutil

    tfs = shutil.which(TF_SERVING_BIN, path="/usr/bin:/usr/local/bin:/bin")
    if choice == "tfserving" or (choice == "auto" and tfs):
        if tfs is None:
            raise RunnerError(f"serve.json asks for {TF_SERVING_BIN}, which is not installed")
        # gRPC on the REST port + 1: two replicas on one host network do not collide on 8500
        argv = [tfs, f"--port={int(cfg['port']) + 1}", *flags]
        if len(cfg.get("versions") or []) > 1:
            # TF Serving serves only the latest version of a base path unless told otherwise
            argv = [*argv[:2], f"--rest_api_port={cfg['port']}"]
            argv.append(f"--model_config_file={_tfserving_config(job_dir, cfg)}")
        return argv
    bind = cfg.get("bind") or "0.0.0.0"
    try:
        ipaddress.ip_address(bind)
    except ValueError as e:
        raise RunnerError(f"serve.json: bind {bind!r} is not an IP address") from e
    return [
        os.path.join(job_dir, "env", "bin", "python"),
        MODEL_SERVER,
        *flags,
        f"--rest_api_bind={bind}",
    ]


def _tfserving_config(job_dir: str, cfg: dict) -> str:
    """A model config file that makes tensorflow_model_server serve every listed version."""
    path = os.path.join(job_dir, "models.config")
    base = os.path.join(job_dir, "models")
    versions = " ".join(f"versions: {int(v['version'])}" for v in cfg["versions"])
    _write_atomic(
        path,
        "model_config_list { config { "
        f'name: "{cfg["model_name"]}" base_path: "{base}" model_platform: "tensorflow" '
        f"model_version_policy {{ specific {{ {versions} }} }} }} }}\n",
    )
    return path


def serve(job_dir: str) -> dict:
    """Fetch the versions' files (size + md5 checked), then start the server detached."""
    cfg = _load_serving(job_dir)
    if os.path.exists(os.path.join(job_dir, "started")):  # started before: fetch nothing again
        return {"ok": True, "already_started": True, "pid": _read_pid(job_dir), **_exited(job_dir)}
    t0 = time.monotonic()
    attach_runtime(cfg["runtime"], os.path.join(job_dir, "env"))
    fetched = 0
    models = os.path.join(job_dir, "models")
    for v in cfg["versions"]:
        for f in v["files"]:
            target = os.path.join(models, str(v["version"]), *f["path"].split("/"))
            fetched += _fetch_verified(f["url"], target, f["size"], f["md5"])
    argv = model_server_argv(job_dir, cfg)
    t_fetch = time.monotonic() - t0
    try:
        fd = os.open(os.path.join(job_dir, "started"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return {"ok": True, "already_started": True, "pid": _read_pid(job_dir), **_exited(job_dir)}
    os.close(fd)
    child = os.fork()
    if child > 0:
        os.waitpid(child, 0)
        pid = _wait_pid(job_dir, 10.0)
        return {
            "ok": True,
            "already_started": False,
            "pid": pid,
            "server": os.path.basename(argv[0] if argv[0].endswith(TF_SERVING_BIN) else argv[1]),
            "fetched": fetched,
            "fetch_seconds": round(t_fetch, 3),
        }
    _detach_and_supervise(
        job_dir,
        lambda: _supervise_argv(job_dir, argv, {"VIRTUAL_ENV": os.path.join(job_dir, "env")}),
    )


def _supervise_argv(job_dir: str, argv: list[str], extra_env: dict[str, str]) -> int:
    """Run argv in its own session with log, heartbeat and pid files, as _supervise does."""
    env = {
        "HOME": os.environ.get("HOME", job_dir),
        "PATH": f"{job_dir}/env/bin:/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "TF_CPP_MIN_LOG_LEVEL": "1",
        **extra_env,
    }
    return _run_supervised(
        job_dir, argv, env, cwd=job_dir, start_label=argv[0], kill_label="the server"
    )


def _read_pid(job_dir: str) -> int | None:
    try:
        with open(os.path.join(job_dir, "pid")) as fh:
            return int(fh.read().strip())
    except (FileNotFoundError, ValueError):
        return None


def _wait_pid(job_dir: str, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = _read_pid(job_dir)
        if pid is not None or os.path.exists(os.path.join(job_dir, "exit_code")):
            return pid
        time.sleep(0.02)
    return None


def _exited(job_dir: str) -> dict:
    try:
        with open(os.path.join(job_dir, "exit_code")) as fh:
            return {"exit_code": int(fh.read().strip())}
    except (FileNotFoundError, ValueError):
        return {}


def stop_serving(job_dir: str) -> dict:
    """SIGTERM the server's process group, SIGKILL it after STOP_GRACE seconds."""
    pgid = _read_pid(job_dir)
    # (until its supervisor reaped it: then its exit status is written)
    forced = None if pgid is None else _terminate_group(pgid, STOP_GRACE, _group_exists)
    if forced is None:
        return {"ok": True, "stopped": False}
    return {"ok": True, "stopped": True, "forced": forced}


COMMANDS = {
    "prepare": prepare,
    "start": start,
    "launch": launch,
    "export": export,
    "kill": kill,
    "serve": serve,
    "stop-serving": stop_serving,
}


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
