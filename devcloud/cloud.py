"""The devcloud as a whole: up / down / status / env over one state directory.

Layout of the state directory::

    state.json      ports, host and project ids of the last `up`
    secrets.json    the generated passwords (mode 0600; `env` prints the admin's)
    clouds.yaml     for openstacksdk and the openstack CLI (mode 0600)
    run/            pidfiles and console logs, one pair per process
    keystone/       keystone.conf, SQLite database, fernet key repositories
    swift/          etc/ (confs, rings) and srv/ (the one device)
    emulator/       the Nova/Neutron/Glance emulator's state; sandboxes/ its servers

Every wait has a deadline; each process is its own session, so `down` leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import secrets
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devcloud import DevCloudError, keystone, swift, venvs
from devcloud.process import Service, free_port, http_answers, port_taken

if TYPE_CHECKING:
    from openstack.connection import Connection

HOST = "127.0.0.1"
DEFAULT_PORTS = {"keystone": 5000, "swift": 8090, "emulator": 8774}
# the catalog's machine-learning endpoint: where `stackml up --devcloud` listens by default
# (`register_stackml` points it elsewhere); Horizon's plugin and `openstack ml` find it there
ML_SERVICE_TYPE = "machine-learning"
DEFAULT_STACKML_PORT = 8080
EMULATOR_READY_DEADLINE = 60.0
USER_CLOUDS = {
    # cloud name -> (user, project)
    "devcloud": ("admin", "admin"),
    "devcloud-demo": ("demo", "demo"),
    "devcloud-reader": ("demo-reader", "demo"),
    "devcloud-alt": ("alt", "alt-demo"),
    "devcloud-stackml": ("stackml", "service"),
}
PASSWORD_USERS = ("admin", "stackml", "swift", "demo", "demo-reader", "alt")
Echo = Callable[[str], None]


@dataclass
class Ports:
    keystone: int = 0
    swift: int = 0  # the proxy, the public object-store endpoint
    swift_account: int = 0
    swift_container: int = 0
    swift_object: int = 0
    emulator: int = 0


def default_state_dir() -> Path:
    from service.config import Settings

    return Settings().data_dir / "devcloud"


def default_venv_root() -> Path:
    override = os.environ.get("STACKML_DEVCLOUD_VENVS")
    if override:
        return Path(override)
    from service.config import Settings

    return Settings().runtime_dir.parent / "devcloud-venvs"


def emulator_available() -> bool:
    try:
        return importlib.util.find_spec("devcloud.emulator") is not None
    except (ImportError, ValueError):
        return False


def _silent(_: str) -> None:
    return None


class DevCloud:
    """One devcloud, addressed by its state directory (see the module docstring)."""

    def __init__(
        self,
        state_dir: Path | str | None = None,
        *,
        venv_root: Path | str | None = None,
        runtime_root: Path | str | None = None,
        host: str = HOST,
    ) -> None:
        self.state_dir = Path(state_dir) if state_dir else default_state_dir()
        self.venv_root = Path(venv_root) if venv_root else default_venv_root()
        self._runtime_root = Path(runtime_root) if runtime_root else None
        self.host = host
        self.run_dir = self.state_dir / "run"
        state = self._load_state()
        self.ports = Ports(**{k: v for k, v in state.get("ports", {}).items() if k in _PORT_KEYS})
        self.projects: dict[str, str] = dict(state.get("projects", {}))
        self._configured: str = str(state.get("configured", ""))
        self.stackml_url: str = str(
            state.get("stackml_url") or f"http://{host}:{DEFAULT_STACKML_PORT}"
        )

    # -- where things are ----------------------------------------------------------------

    @property
    def keystone_url(self) -> str:
        return f"http://{self.host}:{self.ports.keystone}"

    @property
    def auth_url(self) -> str:
        return f"{self.keystone_url}/v3"

    @property
    def swift_url(self) -> str:
        """The proxy's root; accounts are at /v1/AUTH_<project id>."""
        return f"http://{self.host}:{self.ports.swift}"

    @property
    def emulator_url(self) -> str:
        return f"http://{self.host}:{self.ports.emulator}"

    @property
    def clouds_yaml(self) -> Path:
        return self.state_dir / "clouds.yaml"

    @property
    def sandbox_root(self) -> Path:
        return self.state_dir / "emulator" / "sandboxes"

    @property
    def runtime_root(self) -> Path:
        if self._runtime_root is None:
            from service.config import Settings

            self._runtime_root = Settings().runtime_dir
        return self._runtime_root

    def password(self, user: str) -> str:
        return self._secrets()[user]

    @property
    def admin_password(self) -> str:
        return self.password("admin")

    def credentials(self, cloud: str = "devcloud") -> dict[str, str]:
        """The auth section of `cloud` in clouds.yaml."""
        user, project = USER_CLOUDS[cloud]
        return {
            "auth_url": self.auth_url,
            "username": user,
            "password": self.password(user),
            "project_name": project,
            "user_domain_name": "Default",
            "project_domain_name": "Default",
        }

    def services(self) -> dict[str, Service]:
        names = ["keystone", "swift-account", "swift-container", "swift-object", "swift-proxy"]
        names.append("emulator")
        return {n: Service(n, self.run_dir) for n in names}

    def connection(self, cloud: str = "devcloud") -> Connection:
        """An openstacksdk connection for a cloud of this devcloud's clouds.yaml."""
        import openstack.config
        import openstack.connection

        config = openstack.config.OpenStackConfig(
            config_files=[str(self.clouds_yaml)], load_envvars=False
        )
        return openstack.connection.Connection(config=config.get_one(cloud=cloud))

    # -- up ---------------------------------------------------------------------------------

    def up(
        self,
        *,
        keystone_port: int | None = None,
        swift_port: int | None = None,
        emulator_port: int | None = None,
        emulator: bool | None = None,
        echo: Echo = _silent,
    ) -> None:
        """Start what is not running (idempotent). `emulator=None`: start it when importable.

        A port of None reuses the last one (or the default); 0 picks a free one."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with self._locked():
            t0 = time.monotonic()
            svcs = self.services()
            want_emulator = emulator_available() if emulator is None else emulator
            if emulator and not emulator_available():
                raise DevCloudError(
                    "the Nova emulator (python module devcloud.emulator) is not installed here"
                )
            if (
                self.is_up()
                and self.clouds_yaml.exists()
                and (svcs["emulator"].running() or not want_emulator)
            ):
                echo(f"devcloud already up (state in {self.state_dir})")
                return
            self._choose_ports(keystone_port, swift_port, emulator_port, svcs)
            pw = self._secrets()
            self._save_state()

            keystone_dir = self.state_dir / "keystone"
            swift_dir = self.state_dir / "swift"
            with ThreadPoolExecutor(max_workers=2) as pool:
                ks_venv_f = pool.submit(
                    venvs.ensure_venv,
                    self.venv_root,
                    "keystone",
                    venvs.KEYSTONE_REQUIREMENTS,
                    echo=echo,
                )
                sw_venv_f = pool.submit(
                    venvs.ensure_venv,
                    self.venv_root,
                    "swift",
                    venvs.SWIFT_REQUIREMENTS,
                    echo=echo,
                )
                ks_venv, sw_venv = ks_venv_f.result(), sw_venv_f.result()

            try:
                swift_ports = swift.SwiftPorts(
                    proxy=self.ports.swift,
                    account=self.ports.swift_account,
                    container=self.ports.swift_container,
                    object=self.ports.swift_object,
                )
                swift_svcs = [svcs[f"swift-{k}"] for k in (*swift.SERVERS, "proxy")]
                swift_running = all(s.running() for s in swift_svcs)
                ks_running = svcs["keystone"].running()
                if not swift_running:
                    for s in swift_svcs:  # a partial Swift: restart all four with fresh rings
                        s.stop()
                    swift.prepare(
                        sw_venv, swift_dir, self.host, swift_ports, self.keystone_url, pw["swift"]
                    )
                    echo(f"starting swift on {self.swift_url}")
                    swift_svcs = swift.start(sw_venv, swift_dir, self.run_dir)
                if not ks_running:
                    echo(f"starting keystone on {self.keystone_url}")
                    keystone.bootstrap(ks_venv, keystone_dir, self.auth_url, pw["admin"])
                    keystone.start(
                        ks_venv, keystone_dir, self.host, self.ports.keystone, self.run_dir
                    )
                keystone.wait_ready(svcs["keystone"], self.keystone_url)
                swift.wait_ready(swift_svcs, self.host, swift_ports)
                endpoints = {
                    "object-store": ("swift", f"{self.swift_url}/v1/AUTH_%(project_id)s"),
                    "compute": ("nova", f"{self.emulator_url}/compute/v2.1"),
                    "network": ("neutron", f"{self.emulator_url}/network"),
                    "image": ("glance", f"{self.emulator_url}/image"),
                    ML_SERVICE_TYPE: ("stackml", self.stackml_url),
                }
                fingerprint = _fingerprint(self.keystone_url, endpoints, pw)
                if fingerprint != self._configured or not self.projects:
                    self.projects = keystone.configure(
                        self.keystone_url, pw["admin"], pw, endpoints
                    )
                    self._configured = fingerprint
                self._save_state()
                self._write_clouds_yaml()
                self._check_swift_auth()
                if want_emulator:
                    self._start_emulator(svcs["emulator"], echo)
                elif emulator is None:
                    echo(
                        "note: the Nova emulator (devcloud.emulator) is not importable here; "
                        "compute/network/image endpoints are in the catalog but nothing serves them"
                    )
            except BaseException:
                echo("start-up failed: stopping what was started")
                self._stop_all(echo)
                raise
            echo(f"devcloud up in {time.monotonic() - t0:.1f}s (state in {self.state_dir})")

    def register_stackml(self, url: str) -> None:
        """Point the catalog's machine-learning endpoint at the stackml API at `url` (after
        `up`; kept by later `up`s)."""
        with self._locked():
            if not self.projects:
                raise DevCloudError(f"no devcloud in {self.state_dir}: `stackml devcloud up` first")
            keystone.register_endpoint(
                self.keystone_url, self.admin_password, ML_SERVICE_TYPE, "stackml", url
            )
            self.stackml_url = url
            self._configured = ""  # the next `up` re-applies the catalog with this URL
            self._save_state()

    def start_emulator(self, echo: Echo = _silent) -> None:
        """Start the Nova/Neutron/Glance emulator on its reserved port (after `up`)."""
        if not emulator_available():
            raise DevCloudError(
                "the Nova emulator (python module devcloud.emulator) is not installed here"
            )
        with self._locked():
            self._start_emulator(self.services()["emulator"], echo)

    def _start_emulator(self, svc: Service, echo: Echo) -> None:
        if svc.running():
            return
        if port_taken(self.ports.emulator, self.host):
            raise DevCloudError(
                f"port {self.ports.emulator} (the emulator's) is in use by another process; "
                "free it or run `stackml devcloud up --emulator-port 0` for a free one"
            )
        echo(f"starting the Nova/Neutron/Glance emulator on {self.emulator_url}")
        state = self.state_dir / "emulator"
        state.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable,
            "-m",
            "devcloud.emulator",
            "--host",
            self.host,
            "--port",
            str(self.ports.emulator),
            "--state-dir",
            str(state),
            "--keystone-url",
            self.keystone_url,
            "--sandbox-root",
            str(self.sandbox_root),
            "--runtime-root",
            str(self.runtime_root),
        ]
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            # the emulator validates tokens with its own login, as Nova's authtoken does
            "STACKML_EMULATOR_SERVICE_AUTH": json.dumps(
                {
                    "username": "admin",
                    "password": self.admin_password,
                    "project_name": "admin",
                    "user_domain_name": "Default",
                    "project_domain_name": "Default",
                }
            ),
        }
        svc.start(argv, env=env, cwd=Path(__file__).resolve().parents[1])
        svc.wait_ready(
            lambda: http_answers(f"{self.emulator_url}/compute/v2.1"), EMULATOR_READY_DEADLINE
        )

    def _check_swift_auth(self) -> None:
        """A demo token must reach its Swift account through authtoken + keystoneauth."""
        from keystoneauth1 import exceptions as ks_exc
        from keystoneauth1 import session
        from keystoneauth1.identity import v3

        creds = self.credentials("devcloud-demo")
        auth = v3.Password(
            auth_url=creds["auth_url"],
            username=creds["username"],
            password=creds["password"],
            project_name=creds["project_name"],
            user_domain_name="Default",
            project_domain_name="Default",
        )
        sess = session.Session(auth=auth, timeout=30)
        url = f"{self.swift_url}/v1/AUTH_{self.projects['demo']}"
        deadline = time.monotonic() + 30
        while True:
            try:
                resp = sess.head(url, raise_exc=False)
            except ks_exc.ClientException as e:
                raise DevCloudError(f"cannot reach swift at {url}: {e}") from e
            if resp.status_code in (200, 204):
                return
            if time.monotonic() > deadline:
                log = self.services()["swift-proxy"].log
                raise DevCloudError(
                    f"swift answered {resp.status_code} to a demo token at {url}; the "
                    f"proxy's authtoken cannot validate tokens: see {log}"
                )
            time.sleep(0.2)

    def _choose_ports(
        self,
        keystone_port: int | None,
        swift_port: int | None,
        emulator_port: int | None,
        svcs: dict[str, Service],
    ) -> None:
        asked = {"keystone": keystone_port, "swift": swift_port, "emulator": emulator_port}
        running = {
            "keystone": svcs["keystone"].running(),
            "swift": svcs["swift-proxy"].running(),
            "emulator": svcs["emulator"].running(),
        }
        for name, port in asked.items():
            current = getattr(self.ports, name)
            if running[name]:
                if port not in (None, 0, current):
                    raise DevCloudError(
                        f"{name} already runs on port {current}; "
                        "`stackml devcloud down` first to move it"
                    )
                continue
            if port is None:
                port = current or DEFAULT_PORTS[name]
            if port == 0:
                port = free_port(self.host)
            elif port_taken(port, self.host):
                raise DevCloudError(
                    f"port {port} for {name} is in use by another process; free it or pass "
                    f"`--{name}-port 0` (a free port) or another port to `stackml devcloud up`"
                )
            setattr(self.ports, name, port)
        for kind in swift.SERVERS:  # internal: any free port does
            attr = f"swift_{kind}"
            if svcs[f"swift-{kind}"].running():
                continue
            port = getattr(self.ports, attr)
            if not port or port_taken(port, self.host):
                setattr(self.ports, attr, free_port(self.host))

    # -- down --------------------------------------------------------------------------------

    def down(self, echo: Echo = _silent) -> bool:
        """Stop everything this devcloud started and delete the emulator's sandboxes.

        Returns True if something was running."""
        if not self.state_dir.exists():
            return False
        with self._locked():
            return self._stop_all(echo)

    def _stop_all(self, echo: Echo) -> bool:
        svcs = self.services()
        stopped = False
        # the emulator first: its servers are sandboxes that must not outlive it
        for name in (
            "emulator",
            "swift-proxy",
            "swift-object",
            "swift-container",
            "swift-account",
            "keystone",
        ):
            if svcs[name].stop():
                echo(f"stopped {name}")
                stopped = True
        n = self._delete_sandboxes()
        if n:
            echo(f"deleted {n} sandbox server(s) the emulator left")
        return stopped

    def _delete_sandboxes(self) -> int:
        """The emulator's servers are sandboxes (sshd processes): none may outlive `down`."""
        emulator_state = self.state_dir / "emulator"
        if not self.sandbox_root.is_dir() or not any(self.sandbox_root.iterdir()):
            return 0
        try:
            from devcloud.emulator.machines import cleanup
        except ImportError:
            pass  # an older emulator (or none): delete the sandboxes ourselves
        else:
            return int(cleanup(emulator_state))
        from service.backends.compute.sandbox import SandboxBackend

        backend = SandboxBackend(self.sandbox_root, [])
        refs = backend.list_servers()
        for ref in refs:
            backend.delete_server(ref.id)
        return len(refs)

    # -- status and env ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        svcs = self.services()
        port_of = {
            "keystone": self.ports.keystone,
            "swift-proxy": self.ports.swift,
            "swift-account": self.ports.swift_account,
            "swift-container": self.ports.swift_container,
            "swift-object": self.ports.swift_object,
            "emulator": self.ports.emulator,
        }
        return {
            "state_dir": str(self.state_dir),
            "clouds_yaml": str(self.clouds_yaml),
            "keystone_url": self.auth_url,
            "swift_url": self.swift_url,
            "emulator_url": self.emulator_url,
            "services": {
                name: {
                    "running": svc.pid() is not None,
                    "pid": svc.pid(),
                    "port": port_of[name],
                    "log": str(svc.log),
                }
                for name, svc in svcs.items()
            },
        }

    def is_up(self) -> bool:
        svcs = self.services()
        return all(svcs[n].running() for n in svcs if n != "emulator")

    def env_exports(self) -> str:
        lines = [f"export {k}={shlex.quote(v)}" for k, v in self.env().items()]
        return "\n".join(lines) + "\n"

    def platform_env(self) -> dict[str, str]:
        """What `stackml up --devcloud` runs with: the admin environment of env(), the service
        cloud the platform acts as (`devcloud-stackml` of clouds.yaml) and `m1.small`, the
        emulator's smallest flavor, as the default one (a value already set for either is kept).
        With STACKML_AUTH=keystone, the API checks tokens with the devcloud's Keystone."""
        out = self.env()
        out["STACKML_OPENSTACK_CLOUD"] = os.environ.get(
            "STACKML_OPENSTACK_CLOUD", "devcloud-stackml"
        )
        out["STACKML_DEFAULT_FLAVOR"] = os.environ.get("STACKML_DEFAULT_FLAVOR", "m1.small")
        if os.environ.get("STACKML_AUTH") == "keystone" and not os.environ.get(
            "STACKML_KEYSTONE_AUTHTOKEN"
        ):
            # tokens checked by the devcloud's Keystone, as the stackml service user
            out["STACKML_KEYSTONE_AUTHTOKEN"] = json.dumps(
                {
                    "auth_url": self.auth_url,
                    "username": "stackml",
                    "password": self.password("stackml"),
                    "project_name": "service",
                    "user_domain_name": "Default",
                    "project_domain_name": "Default",
                    "region_name": keystone.REGION,
                }
            )
        return out

    def env(self) -> dict[str, str]:
        """The shell environment of the devcloud's admin (what `stackml devcloud env` exports)."""
        if not self.clouds_yaml.exists():
            raise DevCloudError(f"no devcloud in {self.state_dir}: run `stackml devcloud up` first")
        creds = self.credentials("devcloud")
        pairs = {
            "OS_CLIENT_CONFIG_FILE": str(self.clouds_yaml),
            "OS_CLOUD": "devcloud",
            "STACKML_COMPUTE": "openstack",
            "STACKML_STORE": "swift",
            "OS_AUTH_URL": creds["auth_url"],
            "OS_USERNAME": creds["username"],
            "OS_PASSWORD": creds["password"],
            "OS_PROJECT_NAME": creds["project_name"],
            "OS_USER_DOMAIN_NAME": "Default",
            "OS_PROJECT_DOMAIN_NAME": "Default",
            "OS_REGION_NAME": keystone.REGION,
            "OS_INTERFACE": "public",
            "OS_IDENTITY_API_VERSION": "3",
        }
        return pairs

    # -- files -------------------------------------------------------------------------------

    def _write_clouds_yaml(self) -> None:
        import yaml

        clouds = {}
        for name in USER_CLOUDS:
            clouds[name] = {
                "auth": self.credentials(name),
                "region_name": keystone.REGION,
                "interface": "public",
                "identity_api_version": 3,
            }
        text = "# written by `stackml devcloud up`; for openstacksdk and the openstack CLI\n"
        text += yaml.safe_dump({"clouds": clouds}, sort_keys=False)
        _write_private(self.clouds_yaml, text)

    def _secrets(self) -> dict[str, str]:
        path = self.state_dir / "secrets.json"
        try:
            data: dict[str, str] = json.loads(path.read_text())
        except FileNotFoundError:
            data = {}
        missing = [u for u in PASSWORD_USERS if u not in data]
        if missing:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            for u in missing:
                data[u] = secrets.token_urlsafe(18)
            _write_private(path, json.dumps(data, indent=2) + "\n")
        return data

    def _load_state(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads((self.state_dir / "state.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return data

    def _save_state(self) -> None:
        data = {
            "host": self.host,
            "ports": asdict(self.ports),
            "projects": self.projects,
            "configured": self._configured,
            "stackml_url": self.stackml_url,
        }
        tmp = self.state_dir / "state.json.tmp"
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, self.state_dir / "state.json")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.state_dir / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield


_PORT_KEYS = {f.name for f in fields(Ports)}


def _fingerprint(*parts: object) -> str:
    """What Keystone was last configured with: `up` skips the API calls when it is unchanged."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
