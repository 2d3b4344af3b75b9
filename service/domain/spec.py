"""The job spec: the schema that validates POST /v1/jobs and generates the OpenAPI document."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
MODULE_RE = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"
ENV_NAME_RE = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
URI_RE = r"^(local|swift)://[^\x00-\x1f\x7f]+$"
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
RESERVED_ENV_PREFIXES = ("STACKML_", "TF_CONFIG")
MASKED = "***"  # what responses show for each env value

Name = Annotated[str, StringConstraints(pattern=NAME_RE)]
Uri = Annotated[str, StringConstraints(pattern=URI_RE, max_length=1024)]
# a registered model's name (service/db/registry.py NAME_RE): no ":" (name:predict), no "/"
ModelName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_-]{0,62}$")]


def _check_text(value: str, what: str, max_len: int = 4096) -> str:
    if len(value) > max_len:
        raise ValueError(f"{what} is longer than {max_len} characters")
    if _CONTROL.search(value):
        raise ValueError(f"{what} contains a control character")
    return value


def check_object_path(uri: str) -> str:
    """Reject `..` segments and empty segments in an object URI's path."""
    path = uri.split("://", 1)[1]
    parts = path.split("/")
    if any(p in ("..", ".") for p in parts):
        raise ValueError("must not contain '.' or '..' path segments")
    if path.startswith("/"):
        raise ValueError("path must not start with '/'")
    return uri


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Trainer(_Strict):
    package_uri: Uri = Field(description="A .tar.gz Python package in the object store.")
    module: Annotated[str, StringConstraints(pattern=MODULE_RE, max_length=200)] = Field(
        description="Run as `python -m module args...`."
    )
    args: list[str] = Field(default_factory=list, max_length=256)

    @field_validator("package_uri")
    @classmethod
    def _package_path(cls, v: str) -> str:
        return check_object_path(v)

    @field_validator("args")
    @classmethod
    def _args(cls, v: list[str]) -> list[str]:
        return [_check_text(a, "an argument") for a in v]


class Runtime(_Strict):
    framework: Literal["tensorflow"] = "tensorflow"
    version: Annotated[str, StringConstraints(pattern=r"^[0-9]+(\.[0-9]+){0,2}$")] = "2.21"

    @property
    def key(self) -> str:
        return f"{self.framework}-{self.version}"


class Resources(_Strict):
    flavor: Name | None = Field(default=None, description="A flavor name from GET /v1/flavors.")
    gpus: int | None = Field(default=None, ge=0, le=64)
    gpu_type: Name | None = None
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Not available yet: any value but 1 is refused (422 not_implemented).",
    )
    parameter_servers: int = Field(
        default=0,
        ge=0,
        le=16,
        description="Not available yet: any value but 0 is refused (422 not_implemented).",
    )

    @model_validator(mode="after")
    def _one_way(self) -> Resources:
        if self.flavor is not None and self.gpus is not None:
            raise ValueError("give either flavor or gpus/gpu_type, not both")
        if self.gpu_type is not None and not self.gpus:
            raise ValueError("gpu_type needs gpus >= 1")
        return self


class Inputs(_Strict):
    data_uri: Uri | None = None

    @field_validator("data_uri")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        return None if v is None else check_object_path(v)


class Output(_Strict):
    model_uri: Uri | None = Field(
        default=None,
        description="Where the model goes: a new prefix inside the project's area that nothing "
        "is stored under and no other job writes to (409 output_exists otherwise); not the "
        "staging area, the models area itself or a job's own models/job-* prefix. Default: "
        "models/<job id>/ in the project's area.",
    )
    register_as: ModelName | None = Field(
        default=None,
        description="When the job SUCCEEDS, register its model as a new version of this model "
        "of the project (created if missing); the version is CREATING until a worker has "
        "checked it (READY or FAILED). A model name: ^[a-z][a-z0-9_-]{0,62}$.",
    )

    @field_validator("model_uri")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        return None if v is None else check_object_path(v)


Scalar = str | int | float | bool


class JobSpec(_Strict):
    """What a client submits to POST /v1/jobs."""

    name: Name
    type: Literal["training", "batch_prediction"] = Field(
        default="training",
        description="Only training is available yet: batch_prediction is refused "
        "(422 not_implemented).",
    )
    trainer: Trainer
    runtime: Runtime = Field(default_factory=Runtime)
    resources: Resources = Field(default_factory=Resources)
    inputs: Inputs = Field(default_factory=Inputs)
    output: Output = Field(default_factory=Output)
    hyperparameters: dict[Annotated[str, StringConstraints(pattern=ENV_NAME_RE)], Scalar] = Field(
        default_factory=dict, max_length=128
    )
    env: dict[Annotated[str, StringConstraints(pattern=ENV_NAME_RE)], str] = Field(
        default_factory=dict,
        max_length=128,
        description=f"Environment of the trainer. Values are never shown again: responses "
        f"carry the names with {MASKED!r} for each value.",
    )
    max_runtime_seconds: int = Field(default=3600, ge=1, le=7 * 24 * 3600)
    labels: dict[Name, Annotated[str, StringConstraints(max_length=256)]] = Field(
        default_factory=dict, max_length=64
    )

    @field_validator("hyperparameters")
    @classmethod
    def _hp(cls, v: dict[str, Scalar]) -> dict[str, Scalar]:
        for k, val in v.items():
            if isinstance(val, str):
                _check_text(val, f"hyperparameter {k}")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for k, val in v.items():
            if k.startswith(RESERVED_ENV_PREFIXES):
                raise ValueError(f"{k} is reserved for stackml")
            _check_text(val, f"env {k}")
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for k, val in v.items():
            _check_text(val, f"label {k}", 256)
        return v

    def trainer_argv(self) -> list[str]:
        """`args` then hyperparameters as `--name=value` (the trainer contract)."""
        hp = [f"--{k}={_hp_str(v)}" for k, v in sorted(self.hyperparameters.items())]
        return [*self.trainer.args, *hp]


def unbuilt_fields(spec: JobSpec) -> list[tuple[str, str]]:
    """(field, message) for each field of `spec` asking for something stackml does not do
    yet; such a spec is refused (422 not_implemented) before anything is stored or charged.
    The values the schema defaults to (and a stored spec repeats) are accepted."""
    out = []
    if spec.type != "training":
        out.append(("type", f"type {spec.type!r} is not available yet; only 'training' is"))
    if spec.resources.workers != 1:
        out.append(
            ("resources.workers", "distributed training is not available yet: one worker only")
        )
    if spec.resources.parameter_servers != 0:
        out.append(("resources.parameter_servers", "parameter servers are not available yet"))
    return out


def masked_spec(data: dict[str, Any]) -> dict[str, Any]:
    """A stored spec (JSON) as it may be shown: `env` names with every value masked. The
    real values stay in the database row, where the workers read them."""
    env = data.get("env")
    if not isinstance(env, dict) or not env:
        return data
    return {**data, "env": dict.fromkeys(env, MASKED)}


def _hp_str(v: Scalar) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)
