"""The job spec: the schema that validates POST /v1/jobs and generates the OpenAPI document."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from service.domain.cluster import Shape

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
        description="training only: the trainer's replicas, one server each, booted together "
        "(gang admission). With more than one, replica 0 is TF_CONFIG's chief and the others "
        "its workers, so that MultiWorkerMirroredStrategy works unchanged; the chief's model is "
        "exported.",
    )
    parameter_servers: int = Field(
        default=0,
        ge=0,
        le=16,
        description="training only: parameter servers, one server each, booted with the "
        "replicas (gang admission), for ParameterServerStrategy: TF_CONFIG names them `ps` "
        "0..P-1 beside the chief and its workers (so resources.workers must be at least 2: the "
        "chief coordinates, the workers compute). A lost worker is replaced alone; a lost "
        "parameter server or chief restarts the job from its checkpoint.",
    )
    evaluator: bool = Field(
        default=False,
        description="training only: one more server running the trainer as TF_CONFIG's "
        "`evaluator` (a side-car, outside the cluster): the checkpoints the chief writes to "
        "STACKML_CHECKPOINT_DIR are put in its own STACKML_CHECKPOINT_DIR as they are synced "
        "to the store, and its log and metrics are the replica `evaluator`'s. It never fails "
        "the job: its failure or loss is an event, and it is stopped when the job ends.",
    )

    @model_validator(mode="after")
    def _one_way(self) -> Resources:
        if self.flavor is not None and self.gpus is not None:
            raise ValueError("give either flavor or gpus/gpu_type, not both")
        if self.gpu_type is not None and not self.gpus:
            raise ValueError("gpu_type needs gpus >= 1")
        if self.parameter_servers and self.workers < 2:
            raise ValueError(
                "parameter_servers needs workers >= 2: under ParameterServerStrategy the chief "
                "(replica 0) coordinates and only the other workers compute"
            )
        return self


class Inputs(_Strict):
    data_uri: Uri | None = None

    @field_validator("data_uri")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        return None if v is None else check_object_path(v)


GateMetric = Literal["rmse", "mae", "mse", "accuracy"]
LabelName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_-]{0,62}$")]
# the direction each metric is better in; a gate naming the other one is refused
METRIC_DIRECTION = {
    "rmse": "minimize",
    "mae": "minimize",
    "mse": "minimize",
    "accuracy": "maximize",
}


class Gate(_Strict):
    """An evaluation gate: the job's registered version (the candidate) and the version the
    label points at (the champion) are scored on one holdout by the platform's evaluator; the
    label moves to the candidate only when it passes (service/domain/gate.py decides)."""

    metric: GateMetric = Field(
        description="rmse, mae or mse (regression: lower is better) or accuracy "
        "(classification: higher is better), computed from predictions and the holdout's labels."
    )
    direction: Literal["minimize", "maximize"] | None = Field(
        default=None,
        description="Which way is better; default (and the only one allowed): the "
        "metric's own (minimize for rmse, mae, mse; maximize for accuracy).",
    )
    threshold: float | None = Field(
        default=None,
        allow_inf_nan=False,
        description="Absolute: the candidate's score must be at least this good.",
    )
    min_improvement: float | None = Field(
        default=None,
        ge=0,
        lt=1,
        allow_inf_nan=False,
        description="Relative to the champion: 0.05 = the candidate must be 5% better. "
        "Without it a candidate must still be strictly better than a champion.",
    )
    holdout_uri: Uri | None = Field(
        default=None,
        description="An object prefix in the project's area (not its models area) holding CSV "
        "files: feature columns, then the target; the same files score both versions. "
        "Required, except in the job template of a schedule that rebuilds a dataset: each "
        "job it fires is scored on the new version's holdout/.",
    )
    label: LabelName = Field(default="default", description="The label the gate moves.")
    promote: bool = Field(
        default=True, description="false: evaluate and record the decision, move nothing."
    )

    @field_validator("holdout_uri")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        return None if v is None else check_object_path(v)

    @field_validator("direction")
    @classmethod
    def _direction(cls, v: str | None, info: ValidationInfo) -> str | None:
        metric = info.data.get("metric")
        own = METRIC_DIRECTION.get(metric or "")
        if v is not None and own is not None and v != own:
            better = "lower" if own == "minimize" else "higher"
            raise ValueError(f"{metric} is better {better}: direction must be {own}")
        return v

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v is not None and info.data.get("metric") == "accuracy" and not 0 <= v <= 1:
            raise ValueError("an accuracy is between 0 and 1")
        if v is not None and info.data.get("metric") in ("rmse", "mae", "mse") and v < 0:
            raise ValueError(f"{info.data.get('metric')} is never negative")
        return v

    @model_validator(mode="after")
    def _complete(self) -> Gate:
        if self.threshold is None and self.min_improvement is None:
            raise ValueError("give threshold, min_improvement or both")
        if self.direction is None:  # the metric's own, written into the stored spec
            object.__setattr__(self, "direction", METRIC_DIRECTION[self.metric])
        return self


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

    gate: Gate | None = Field(
        default=None,
        description="Evaluate the registered version against the label's version on a holdout "
        "and move the label only when it is better (needs register_as).",
    )

    @field_validator("model_uri")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        return None if v is None else check_object_path(v)

    @field_validator("gate")
    @classmethod
    def _gate_needs_model(cls, v: Gate | None, info: ValidationInfo) -> Gate | None:
        if v is not None and info.data.get("register_as") is None:
            raise ValueError(
                "a gate needs output.register_as: it decides about a registered version"
            )
        return v


class Prediction(_Strict):
    """A batch prediction job's work: which model version, which inputs, where the output goes."""

    model: ModelName = Field(description="A registered model of the project.")
    version: int | None = Field(
        default=None, ge=1, description="A READY version of the model; or give `label`."
    )
    label: ModelName | None = Field(
        default=None,
        description="A label of the model (default: `default`), resolved to its version once, "
        "at submission; the job's output records the version.",
    )
    input_uris: list[Uri] = Field(
        min_length=1,
        max_length=1000,
        description="Objects or prefixes (ending in '/') in the project's area; a prefix "
        "stands for the objects under it, in key order. Rows are numbered across all inputs "
        "in this order.",
    )
    format: Literal["jsonl", "csv", "tfrecord"] | None = Field(
        default=None,
        description="jsonl: one instance per line (a JSON list or object); csv: feature "
        "columns, header optional; tfrecord: tf.train.Example records. Default: from the "
        "inputs' extensions (.jsonl/.ndjson/.json, .csv, .tfrecord/.tfrecords/.tfr).",
    )
    output_prefix: Uri = Field(
        description="Where the shards and manifest.json go: a new prefix in the project's "
        "area (the rules of output.model_uri; 409 output_exists when something is there), or "
        "the prefix of a failed or cancelled run of the same request, which is resumed."
    )
    batch_size: int = Field(default=64, ge=1, le=10_000, description="Rows per model call.")
    shard_rows: int = Field(
        default=10_000, ge=1, le=1_000_000, description="At most this many rows per shard."
    )
    max_workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Servers the shards are spread over (shard n on server n mod "
        "max_workers), booted together: the quota counts all of them (gang admission).",
    )

    @field_validator("input_uris")
    @classmethod
    def _inputs(cls, v: list[str]) -> list[str]:
        return [check_object_path(u) for u in v]

    @field_validator("output_prefix")
    @classmethod
    def _output(cls, v: str) -> str:
        return check_object_path(v)

    @model_validator(mode="after")
    def _one_version(self) -> Prediction:
        if self.version is not None and self.label is not None:
            raise ValueError("give either version or label, not both")
        return self


MetricName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_.-]{0,62}$")]
MAX_GRID = 10_000  # grid points a grid search may enumerate


class TuningParameter(_Strict):
    """One hyperparameter a tuning job searches: given to each trial as `--name=value`."""

    name: Annotated[str, StringConstraints(pattern=ENV_NAME_RE)]
    type: Literal["double", "integer", "discrete", "categorical"] = Field(
        description="double: a real in [min, max]; integer: an integer in [min, max]; "
        "discrete: one of `values` (numbers); categorical: one of `values` (strings)."
    )
    min: float | None = Field(default=None, allow_inf_nan=False, description="double, integer")
    max: float | None = Field(default=None, allow_inf_nan=False, description="double, integer")
    scale: Literal["linear", "log"] = Field(
        default="linear",
        description="double, integer: log samples evenly in log space (min must be > 0).",
    )
    values: list[float | str] | None = Field(
        default=None, max_length=1000, description="discrete (numbers), categorical (strings)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> TuningParameter:
        ranged = self.type in ("double", "integer")
        if ranged:
            if self.min is None or self.max is None:
                raise ValueError(f"a {self.type} parameter needs min and max")
            if self.values is not None:
                raise ValueError(f"a {self.type} parameter takes min and max, not values")
            if not self.min < self.max:
                raise ValueError("min must be less than max")
            if self.type == "integer" and not (self.min.is_integer() and self.max.is_integer()):
                raise ValueError("an integer parameter's min and max are integers")
            if self.scale == "log" and self.min <= 0:
                raise ValueError("a log scale needs min > 0")
            return self
        if self.min is not None or self.max is not None:
            raise ValueError(f"a {self.type} parameter takes values, not min and max")
        if self.scale != "linear":
            raise ValueError(f"a {self.type} parameter has no scale")
        if not self.values:
            raise ValueError(f"a {self.type} parameter needs at least one value")
        want = str if self.type == "categorical" else (int, float)
        if any(isinstance(v, bool) or not isinstance(v, want) for v in self.values):
            kind = "strings" if self.type == "categorical" else "numbers"
            raise ValueError(f"a {self.type} parameter's values are {kind}")
        if len(set(self.values)) != len(self.values):
            raise ValueError("values must not repeat")
        for v in self.values:
            if isinstance(v, str):
                _check_text(v, "a value", 256)
        return self


class EarlyStopping(_Strict):
    """The median stopping rule: a running trial whose best value of the metric so far is worse
    than the median of the completed trials' values at the same step is stopped (cancelled)."""

    rule: Literal["median"] = "median"
    min_trials: int = Field(
        default=2, ge=1, le=100, description="Completed trials needed before any is stopped."
    )
    min_steps: int = Field(
        default=1,
        ge=0,
        le=2**31 - 1,
        description="A trial is not stopped before it reports a step past this one.",
    )


class Tuning(_Strict):
    """Hyperparameter tuning: the job runs `max_trials` trials, each a training job of its own
    with the spec's trainer and one choice of `parameters`, and keeps the best."""

    metric: MetricName = Field(
        description="The metric the trainer reports in its metric lines "
        '({"stackml_metric": 1, "step": N, "<metric>": value}); a trial\'s value is its last.'
    )
    goal: Literal["minimize", "maximize"]
    parameters: list[TuningParameter] = Field(min_length=1, max_length=32)
    max_trials: int = Field(default=10, ge=1, le=100)
    max_parallel_trials: int = Field(default=1, ge=1, le=32)
    max_failed_trials: int = Field(
        default=3,
        ge=1,
        le=100,
        description="The tuning job fails (and cancels the trials still running) once this "
        "many trials failed.",
    )
    algorithm: Literal["random", "grid", "tpe"] = Field(
        default="tpe",
        description="random; grid (integer, discrete and categorical parameters only: each "
        "combination once, in order, at most max_trials of them); tpe (Bayesian: Optuna's "
        "Tree-structured Parzen Estimator, random for its first trials).",
    )
    seed: int | None = Field(
        default=None, ge=0, le=2**31 - 1, description="Same seed, same parameters per trial."
    )
    early_stopping: EarlyStopping | None = Field(
        default=None, description="Stop bad trials early (the median rule); default: never."
    )

    @model_validator(mode="after")
    def _consistent(self) -> Tuning:
        names = [p.name for p in self.parameters]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"parameter names must not repeat: {', '.join(dup)}")
        if self.max_parallel_trials > self.max_trials:
            raise ValueError("max_parallel_trials must not exceed max_trials")
        if self.algorithm == "grid":
            doubles = [p.name for p in self.parameters if p.type == "double"]
            if doubles:
                raise ValueError(
                    f"a grid search takes integer, discrete and categorical parameters, not "
                    f"double ones ({', '.join(doubles)}): give them as discrete values"
                )
            if grid_size(self) > MAX_GRID:
                raise ValueError(f"the grid has more than {MAX_GRID} points")
        return self

    def trials(self) -> int:
        """How many trials run: max_trials, or fewer when a grid has fewer points."""
        if self.algorithm == "grid":
            return min(self.max_trials, grid_size(self))
        return self.max_trials


def grid_size(tuning: Tuning) -> int:
    size = 1
    for p in tuning.parameters:
        if p.type == "integer":
            size *= int(p.max or 0) - int(p.min or 0) + 1
        else:
            size *= len(p.values or ())
        if size > MAX_GRID:
            return size
    return size


# the fields only one type of job takes (a field of the other type is refused, named)
TRAINING_ONLY = (
    "trainer",
    "inputs",
    "output",
    "hyperparameters",
    "restart_policy",
    "max_restarts",
    "tuning",
)
BATCH_ONLY = ("prediction",)

Scalar = str | int | float | bool

RestartPolicy = Literal["Never", "OnFailure", "ExitCode"]
# ExitCode's retryable exit statuses: TensorFlow's preemption handler exits 42 after its
# checkpoint; 128+N is a trainer killed by signal N (OOM, a stray kill). 1-127 are the trainer's
# own errors, retried only by OnFailure.
PREEMPTION_EXIT_CODE = 42


def retryable_exit(policy: str, code: int) -> bool:
    """Whether a trainer that exited with `code` (non-zero) is restarted under `policy`."""
    if policy == "OnFailure":
        return True
    if policy == "ExitCode":
        return code == PREEMPTION_EXIT_CODE or code >= 128
    return False


class JobSpec(_Strict):
    """What a client submits to POST /v1/jobs."""

    name: Name
    type: Literal["training", "batch_prediction"] = Field(
        default="training",
        description="training takes trainer (required), inputs, output and hyperparameters; "
        "batch_prediction takes prediction (required). A field of the other type is refused "
        "(422 validation_failed naming it).",
    )
    trainer: Trainer | None = Field(default=None, description="training only (required).")
    prediction: Prediction | None = Field(
        default=None, description="batch_prediction only (required)."
    )
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
    max_runtime_seconds: int = Field(
        default=3600,
        ge=1,
        le=7 * 24 * 3600,
        description="The whole job's bound, from the trainer's first start (restarts included).",
    )
    restart_policy: RestartPolicy = Field(
        default="Never",
        description="training only. Never: a trainer that fails or loses its server fails the "
        "job. OnFailure: any non-zero exit or a lost server restarts the trainer on a new "
        "server, its STACKML_CHECKPOINT_DIR restored from the store. ExitCode: as OnFailure, "
        f"but only for exit status {PREEMPTION_EXIT_CODE} (TensorFlow's preemption handler) and "
        "128-255 (killed by a signal), and a lost server.",
    )
    max_restarts: int = Field(
        default=3,
        ge=0,
        le=20,
        description="training only: restarts allowed before the job fails (with restart_policy "
        "OnFailure or ExitCode).",
    )
    labels: dict[Name, Annotated[str, StringConstraints(max_length=256)]] = Field(
        default_factory=dict, max_length=64
    )
    tuning: Tuning | None = Field(
        default=None,
        description="training only: hyperparameter tuning. The job runs trials, each a "
        "training job of its own (its child) with one choice of `tuning.parameters` added to "
        "`hyperparameters`, and ends with the best trial's model.",
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

    @model_validator(mode="after")
    def _fields_of_type(self) -> JobSpec:
        problems = type_problems(self)
        if problems:
            # one error per field, located at the field (not at the body)
            raise ValidationError.from_exception_data(
                "JobSpec",
                [
                    InitErrorDetails(
                        type=PydanticCustomError("field_of_other_type", message),
                        loc=(field,),
                        input=None,
                    )
                    for field, message in problems
                ],
            )
        return self

    @property
    def batch(self) -> bool:
        return self.type == "batch_prediction"

    def training(self) -> Trainer:
        """The trainer of a training job (the schema makes sure it has one)."""
        if self.trainer is None:
            raise ValueError(f"a {self.type} job has no trainer")
        return self.trainer

    def predicting(self) -> Prediction:
        """The prediction section of a batch job (the schema makes sure it has one)."""
        if self.prediction is None:
            raise ValueError(f"a {self.type} job has no prediction section")
        return self.prediction

    def servers(self) -> int:
        """The servers the job runs on, the chief included: a batch job's
        `prediction.max_workers`, a training job's `resources.workers` and
        `resources.parameter_servers` (its replicas)."""
        return self.shape().servers

    def shape(self) -> Shape:
        """The job's servers by kind (service/domain/cluster.py): a training job's replicas; a
        batch job's workers, all of one kind (`worker-<k>` beside the chief)."""
        if self.batch:
            return Shape(self.predicting().max_workers)
        r = self.resources
        return Shape(r.workers, r.parameter_servers, r.evaluator)

    def trainer_argv(self) -> list[str]:
        """`args` then hyperparameters as `--name=value` (the trainer contract)."""
        hp = [f"--{k}={_hp_str(v)}" for k, v in sorted(self.hyperparameters.items())]
        return [*self.training().args, *hp]


def type_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """(field, message) for each field the job's type does not take, and the section it needs
    but lacks. Fields left at their defaults (as a stored spec repeats them) are not counted."""
    given = spec.model_fields_set
    out: list[tuple[str, str]] = []
    if spec.batch:
        if spec.prediction is None:
            out.append(("prediction", "a batch_prediction job needs a prediction section"))
        for f in TRAINING_ONLY:
            if f in given and _non_default(spec, f):
                out.append((f, f"{f} is a training field; a batch_prediction job does not take it"))
        if spec.resources.workers != 1:
            out.append(
                (
                    "resources.workers",
                    "a batch_prediction job spreads over prediction.max_workers, "
                    "not resources.workers",
                )
            )
        if spec.resources.evaluator:
            out.append(("resources.evaluator", "a batch_prediction job has no evaluator"))
    else:
        if spec.trainer is None:
            out.append(("trainer", "a training job needs a trainer"))
        if spec.prediction is not None:
            out.append(
                ("prediction", "prediction is a batch_prediction field; set type: batch_prediction")
            )
        out += tuning_problems(spec)
    return out


def tuning_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """(field, message) for what a tuning job cannot also ask."""
    if spec.tuning is None:
        return []
    out = []
    fixed = sorted(set(spec.hyperparameters) & {p.name for p in spec.tuning.parameters})
    if fixed:
        out.append(
            (
                "tuning.parameters",
                f"{', '.join(fixed)} is both a fixed hyperparameter and a tuned parameter",
            )
        )
    if spec.output.model_uri is not None:
        out.append(
            (
                "output.model_uri",
                "a tuning job's trials each write to their own models/<trial job id>/; the "
                "tuning job's output names the best one's",
            )
        )
    return out


def _non_default(spec: JobSpec, field: str) -> bool:
    """Whether `field` (one of TRAINING_ONLY) holds something other than its default."""
    if field == "trainer":
        return spec.trainer is not None
    if field == "inputs":
        return spec.inputs.data_uri is not None
    if field == "output":
        return spec.output.model_uri is not None or spec.output.register_as is not None
    if field == "restart_policy":
        return spec.restart_policy != "Never"
    if field == "max_restarts":
        return spec.max_restarts != JobSpec.model_fields["max_restarts"].default
    if field == "tuning":
        return spec.tuning is not None
    return bool(spec.hyperparameters)


def stored(spec: JobSpec) -> dict[str, Any]:
    """The spec as it is stored and shown: JSON, without the fields of the other type."""
    data = spec.model_dump(mode="json")
    for f in TRAINING_ONLY if spec.batch else BATCH_ONLY:
        data.pop(f, None)
    return data


def unbuilt_fields(spec: JobSpec) -> list[tuple[str, str]]:
    """(field, message) for each field of `spec` asking for something stackml does not do
    yet; such a spec is refused (422 not_implemented) before anything is stored or charged.
    The values the schema defaults to (and a stored spec repeats) are accepted."""
    out = []
    if spec.tuning is not None and spec.output.gate is not None:
        out.append(("output.gate", "an evaluation gate on a tuning job is not available yet"))
    return out


def trial_spec(data: dict[str, Any], number: int, params: dict[str, Scalar]) -> dict[str, Any]:
    """Trial `number`'s spec (JSON) from its tuning job's stored spec: the same trainer and
    resources, the tuned `params` added to its hyperparameters, no tuning, no registration (the
    tuning job registers its best trial's model), and the default output (its own prefix). The
    labels a schedule put on its slot's job stay the tuning job's: a schedule's jobs are its
    runs, and a trial is reached from its tuning job (`parent_id`)."""
    from service.domain.schedules import SCHEDULE_LABEL, SLOT_LABEL

    out = {k: v for k, v in data.items() if k != "tuning"}
    if data.get("labels"):
        labels = data["labels"]
        out["labels"] = {k: v for k, v in labels.items() if k not in (SCHEDULE_LABEL, SLOT_LABEL)}
    out["name"] = f"{str(data['name'])[:55]}-t{number}"
    out["hyperparameters"] = {**(data.get("hyperparameters") or {}), **params}
    out["output"] = {}
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
