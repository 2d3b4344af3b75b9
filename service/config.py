"""Settings: config/defaults.yaml, then the file named by STACKML_CONFIG, then STACKML_* vars."""

from __future__ import annotations

import copy
import functools
import os
import secrets
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from service.backends.interfaces import Flavor

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "config"


_YAML: dict[Path, tuple[tuple[int, int], dict[str, Any]]] = {}


def _load_yaml(path: Path) -> dict[str, Any]:
    """The file's mapping (a copy: callers may change it), parsed again only when the file
    changed (its mtime or size): the catalogues are read on every submission."""
    st = path.stat()
    key = (st.st_mtime_ns, st.st_size)
    hit = _YAML.get(path)
    if hit is None or hit[0] != key:
        with path.open() as fh:
            data = yaml.safe_load(fh) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        hit = _YAML[path] = (key, data)
    return copy.deepcopy(hit[1])


class _YamlSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        data = _load_yaml(CONFIG_DIR / "defaults.yaml")
        extra = os.environ.get("STACKML_CONFIG")
        if extra:
            data.update(_load_yaml(Path(extra)))
        return {k: v for k, v in data.items() if v != ""}


class RuntimeDef(BaseModel):
    requirements: str  # the local (sandbox) runtime's pip requirements
    image: str  # the Glance image that carries it at /opt/stackml/runtimes/<key>
    # what a VM installs when its image lacks the runtime (slow path); default: requirements
    vm_requirements: str | None = None


class QuotaDefaults(BaseModel):
    """Per-project limits where the quotas table has no override."""

    model_config = ConfigDict(extra="forbid")

    jobs: int = Field(default=10, ge=0)
    servers: int = Field(default=10, ge=0)
    gpus: int = Field(default=4, ge=0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STACKML_", extra="ignore")

    data_dir: Path = Field(
        default_factory=lambda: (
            Path("/var/lib/stackml") if os.geteuid() == 0 else Path.home() / ".local/share/stackml"
        )
    )
    database_url: str = ""
    redis_url: str = "redis://127.0.0.1:6379/0"
    # the broker queue: platforms sharing one Redis keep apart by using different names
    queue: str = "stackml"
    auth: Literal["noauth", "keystone"] = "noauth"
    compute: Literal["sandbox", "openstack"] = "sandbox"
    store: Literal["local", "swift"] = "local"
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str = ""
    local_project: str = "local"
    default_flavor: str = "local.small"
    default_runtime: str = "tensorflow-2.21"
    max_package_bytes: int = 256 * 1024 * 1024
    max_body_bytes: int = 1024 * 1024
    # The API's edge (see docs/security.md): extra Host names it answers to ("name" at any
    # port, "name:port"; noauth always checks Host, keystone only when this is set), and web
    # origins ("scheme://host[:port]") whose pages may send it state-changing requests.
    allowed_hosts: list[str] = Field(default_factory=list)
    allowed_origins: list[str] = Field(default_factory=list)
    # Per-project limits on job submissions and package uploads per minute (0: none), counted
    # in Redis and shared by every API process; a whole minute's worth may come at once.
    rate_limit_jobs_per_minute: int = Field(default=600, ge=0)
    rate_limit_packages_per_minute: int = Field(default=120, ge=0)
    # Online prediction (service/api/predict.py): predict requests a minute per project (0:
    # none); the proxy's timeouts to a replica (seconds); the largest predict body; how long
    # the routing table (ready replicas) is cached; how long a failed replica is avoided;
    # keep-alive connections kept per replica.
    rate_limit_predict_per_minute: int = Field(default=60_000, ge=0)
    predict_connect_timeout: float = Field(default=2.0, gt=0)
    predict_read_timeout: float = Field(default=30.0, gt=0)
    predict_max_body_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    predict_route_cache_seconds: float = Field(default=1.0, ge=0)
    predict_suspect_seconds: float = Field(default=5.0, ge=0)
    predict_pool_size: int = Field(default=32, ge=1)
    predict_lane: bool = True  # predictions answered outside Flask (service/api/predict.py Lane)
    # Sampled request/response logging (service/serving_log.py): the in-memory buffer's bound
    # (bytes; past it records are dropped and counted), a batch is written every N records or
    # T seconds, bodies longer than this are cut, and shutdown flushes within this deadline.
    serving_log_buffer_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    serving_log_batch_records: int = Field(default=500, ge=1)
    serving_log_batch_seconds: float = Field(default=5.0, gt=0)
    serving_log_max_body_bytes: int = Field(default=64 * 1024, ge=0)
    serving_log_flush_seconds: float = Field(default=10.0, ge=0)
    # Endpoint replicas (workers/steps/serve.py): the model server's REST port; a replica not
    # AVAILABLE this long after its server started loading fails; a ready replica failing this
    # many health checks in a row is replaced; a drained replica is deleted after this long; a
    # version whose replicas failed this many times (none ever ready) is given up; the most
    # replicas an endpoint may ask for.
    serving_port: int = Field(default=8501, ge=1, le=65535)
    serving_load_deadline: float = Field(default=300.0, gt=0)
    serving_health_failures: int = Field(default=3, ge=1)
    serving_drain_seconds: float = Field(default=2.0, ge=0)
    serving_max_failures: int = Field(default=3, ge=1)
    serving_max_replicas: int = Field(default=16, ge=1)
    # Evaluation gates (workers/steps/evaluate.py): an evaluation not decided this long after
    # its job SUCCEEDED is refused `evaluation_failed` (and its server deleted); the evaluator
    # command's own limit; the holdout's limits (objects, bytes, rows); the evaluator's flavor
    # (None: default_flavor).
    evaluation_deadline: float = Field(default=1800.0, gt=0)
    evaluation_run_timeout: float = Field(default=480.0, gt=0, le=500)
    evaluation_max_holdout_objects: int = Field(default=1000, ge=1)
    evaluation_max_holdout_bytes: int = Field(default=256 * 1024 * 1024, ge=1)
    evaluation_max_rows: int = Field(default=1_000_000, ge=1)
    evaluation_flavor: str | None = None
    # metric points stored per job; later metric lines are logged and skipped
    max_metric_points: int = Field(default=10_000, ge=0)
    boot_deadline: float = 60
    ssh_deadline: float = 30
    provision_deadline: float = 300
    command_timeout: float = 60
    heartbeat_timeout: float = 30
    grant_ttl: int = 86400
    # the first look at a started trainer: one extra poll per job, and a trainer that fails at
    # once (an import error) or a quick job is seen without waiting poll_min
    first_poll: float = Field(default=0.05, ge=0)
    poll_min: float = 0.1
    poll_max: float = 2.0
    # how often the runner uploads new checkpoint files of a restartable job (restart_policy)
    checkpoint_sync_seconds: float = Field(default=10.0, gt=0, le=3600)
    stuck_after: float = 30
    # after the chief exited 0, how long its job waits (RUNNING) for a side-car evaluator that
    # was fed the final checkpoint to evaluate it and exit; 0: the job does not wait
    evaluator_grace_seconds: float = Field(default=120, ge=0, le=3600)
    # a Celery worker lowers its CPU priority by this much when it starts (os.nice; its pool and
    # what it runs, the sandboxes and their trainers, inherit it): where the API shares a host
    # with workers, requests are answered first and steps take what is left. 0: unchanged
    worker_nice: int = Field(default=10, ge=0, le=19)
    reconcile_interval: float = 5
    sandbox_isolation: Literal["auto", "root", "rootless", "none"] = "auto"
    # sandbox network: "isolated" = a network namespace per sandbox that reaches only the store
    # gateway and sandbox_allow (needs root isolation); "host" = the host's network (loopback
    # included); "auto" = isolated with root isolation. See sandbox_net.py.
    sandbox_network: Literal["auto", "isolated", "host"] = "auto"
    sandbox_network_cidr: str = "10.253.0.0/16"  # sandbox addresses; <cidr>+1 is the gateway
    # a distributed job's sandboxes reach each other on these addresses, on the job's own bridge
    sandbox_peer_cidr: str = "10.252.0.0/16"
    sandbox_gateway_port: int = Field(default=0, ge=0, le=65535)  # store gateway; 0 = port
    sandbox_allow: list[str] = Field(default_factory=list)  # "host:port" sandboxes may reach
    secret_key: str = ""
    # GET /metrics: "" = open with auth=noauth, a Keystone admin token with auth=keystone;
    # set, `Authorization: Bearer <metrics_token>` also (Prometheus scrapers have no token)
    metrics_token: str = ""
    # auth=keystone: keystonemiddleware auth_token options, [keystone_authtoken] names;
    # see docs/security.md
    keystone_authtoken: dict[str, str | int | float | bool | list[str]] = Field(
        default_factory=dict
    )
    # Allocation: other flavors to try, in order, when a flavor finds no valid host, and the
    # availability zones to try for each ([] = the cloud's default zone).
    flavor_fallbacks: dict[str, list[str]] = Field(default_factory=dict)
    availability_zones: list[str] = Field(default_factory=list)
    # A quota refusal puts the job back in QUEUED; it retries after a backoff in this range.
    quota_backoff_min: float = 5.0
    quota_backoff_max: float = 300.0
    # At most this many servers at once on this platform (0: no cap); the rest wait in QUEUED.
    max_servers: int = 0
    # compute: openstack (credentials: clouds.yaml + OS_CLOUD, or name the cloud here)
    openstack_cloud: str = ""
    openstack_network: str = "private"
    openstack_floating_network: str = ""  # "" = reach servers on their fixed address
    openstack_security_group: str = "stackml-ssh"
    openstack_ssh_cidr: str = "0.0.0.0/0"  # where the workers connect from
    openstack_ssh_user: str = "stackml"
    # cloud GPU names (PCI alias / resource class / trait) -> stackml gpu_type
    openstack_gpu_aliases: dict[str, str] = Field(default_factory=dict)
    openstack_prices: dict[str, float] = Field(default_factory=dict)  # flavor -> price per hour
    openstack_call_timeout: float = 30
    # auth=keystone + compute=openstack: "project" runs each job in the submitting project
    # through a Keystone trust (its quotas, its Horizon); "service" keeps every job's servers
    # in the project of openstack_cloud (one service project, no trusts)
    tenancy: Literal["project", "service"] = "project"
    trust_roles: list[str] = Field(default_factory=list)
    # store: swift (the account of openstack_cloud's project; containers per stackml project)
    swift_segment_bytes: int = 1 << 30  # files above this go up as Static Large Objects
    swift_container_prefix: str = "stackml-"
    swift_timeout: float = 60.0
    # A server whose job the database does not know is reaped after this many seconds.
    orphan_grace: float = 120.0
    # The package index a VM installs its runtime from when its image lacks it ("" = pip's).
    runtime_index_url: str = ""
    # Built runtimes (large; shared between data dirs if you like). Empty: see runtime_dir.
    runtime_root: Path | None = None
    # Per-project quotas (concurrent jobs, servers, GPUs) where no override is stored.
    quota_defaults: QuotaDefaults = Field(default_factory=QuotaDefaults)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls))

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'stackml.db'}"

    @property
    def base_url(self) -> str:
        """Where servers reach the local store's signed URLs: with isolated sandboxes, the
        store gateway (the only host address they reach; sandbox_net.py)."""
        if self.compute == "sandbox" and self.store == "local":
            from service.backends.compute import sandbox_net

            net = sandbox_net.from_settings(self)
            if net is not None:
                return net.store_url
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    @property
    def sandbox_dir(self) -> Path:
        return self.data_dir / "sandboxes"

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "store"

    @property
    def runtime_dir(self) -> Path:
        if self.runtime_root:
            return self.runtime_root
        # as root, outside the data dir: that is private (0700) and the sandbox users run these
        if os.geteuid() == 0:
            return Path("/var/cache/stackml/runtimes")
        return self.data_dir / "runtimes"

    def signing_key(self) -> bytes:
        """The key that signs grants and encrypts SSH keys at rest; made once per data dir."""
        if self.secret_key:
            return self.secret_key.encode()
        path = self.data_dir / "secret.key"
        if not path.exists():
            self.data_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32))
            try:
                os.link(tmp, path)  # first writer wins; others read its key
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        return path.read_text().strip().encode()

    def flavors(self) -> list[Flavor]:
        data = _load_yaml(CONFIG_DIR / "flavors.yaml")
        return [Flavor(**f) for f in data.get("flavors", [])]

    def runtimes(self) -> dict[str, RuntimeDef]:
        data = _load_yaml(CONFIG_DIR / "runtimes.yaml")
        return {k: RuntimeDef(**v) for k, v in (data.get("runtimes") or {}).items()}


@functools.cache
def get_settings() -> Settings:
    return Settings()


def reset_settings() -> None:
    """Forget the cached settings (tests and `stackml up` change the environment)."""
    get_settings.cache_clear()
