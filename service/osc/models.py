"""`openstack ml model ...` (the registry: models, versions, labels, history, deploy) and
`openstack ml endpoint list|show|set|delete` (a model's online-prediction endpoint)."""

from __future__ import annotations

import argparse
from typing import Any

from osc_lib import exceptions

from service.client import Json
from service.osc.common import MLCommand, MLLister, MLShowOne, key_values, rows, show

MODEL_COLUMNS = ("Name", "ID", "Versions", "Latest Version", "Labels", "Created At")
VERSION_COLUMNS = ("Version", "State", "Labels", "Source Job", "Artifact URI", "Created At")
HISTORY_COLUMNS = ("At", "Label", "From Version", "To Version", "By", "Why")
ENDPOINT_COLUMNS = (
    "ID",
    "Model",
    "Name",
    "State",
    "Label",
    "Version",
    "Serving Version",
    "Replicas",
    "Flavor",
)


def _model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="<model>", help="Model name")


def _version_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("version", metavar="<version>", type=int, help="Version number")


def _traffic(pairs: list[tuple[str, str]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for version, percent in pairs:
        try:
            out[str(int(version))] = int(percent)
        except ValueError as e:
            raise exceptions.CommandError(
                f"--traffic {version}={percent}: write <version>=<percent>, e.g. 2=10"
            ) from e
    return out


# -- models ---------------------------------------------------------------------------------


class ListModel(MLLister):
    """List your project's models."""

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[Any, Any]:
        fields = ["name", "id", "versions", "latest_version", "labels", "created_at"]
        return MODEL_COLUMNS, rows(self.client.list_models(), fields)


class ShowModel(MLShowOne):
    """Show a model: its versions, labels and live endpoint."""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        _model_arg(parser)
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[Any, Any]:
        return show(model_fields(self.client.get_model(parsed_args.model)))


def model_fields(m: Json) -> dict[str, Any]:
    return {
        "id": m.get("id"),
        "name": m.get("name"),
        "project_id": m.get("project_id"),
        "description": m.get("description"),
        "versions": m.get("versions"),
        "latest_version": m.get("latest_version"),
        "labels": m.get("labels") or {},
        "endpoint": m.get("endpoint") or {},
        "created_by": m.get("created_by"),
        "created_at": m.get("created_at"),
    }


class CreateModel(MLShowOne):
    """Create a model (a name whose versions come from jobs or store URIs)."""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument("name", metavar="<name>", help="Model name ([a-z][a-z0-9_-]*)")
        parser.add_argument("--description", metavar="<text>", default="", help="Description")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[Any, Any]:
        model = self.client.create_model(parsed_args.name, parsed_args.description)
        return show(model_fields(model))


class DeleteModel(MLCommand):
    """Delete models (their versions, labels and history; the stored artifacts stay)."""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument("models", metavar="<model>", nargs="+", help="Model name(s)")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> None:
        for name in parsed_args.models:
            self.client.delete_model(name)


# -- versions -------------------------------------------------------------------------------


def version_fields(v: Json) -> dict[str, Any]:
    return {
        "model": v.get("model"),
        "version": v.get("version"),
        "state": v.get("state"),
        "failure_message": v.get("failure_message"),
        "labels": v.get("labels") or [],
        "source_job_id": v.get("source_job_id"),
        "artifact_uri": v.get("artifact_uri"),
        "metrics": v.get("metrics") or {},
        "signature": v.get("signature") or {},
        "created_by": v.get("created_by"),
        "created_at": v.get("created_at"),
        "updated_at": v.get("updated_at"),
    }


class ListModelVersion(MLLister):
    """List a model's versions."""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        _model_arg(parser)
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[Any, Any]:
        fields = ["version", "state", "labels", "source_job_id", "artifact_uri", "created_at"]
        return VERSION_COLUMNS, rows(self.client.list_versions(parsed_args.model), fields)


class ShowModelVersion(MLShowOne):
    """Show one version: state, artifact, signature, metrics."""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        _model_arg(parser)
        _version_arg(parser)
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[Any, Any]:
        v = self.client.get_version(parsed_args.model, parsed_args.version)
        return show(version_fields(v))


class CreateModelVersion(MLShowOne):
    """Record a new version from a SUCCEEDED job or from a store URI."""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        _model_arg(parser)
        source = parser.add_mutually_exclusive_group(required=True)
        source.add_argument("--job", metavar="<job>", help="A SUCCEEDED job of your project")
        source.add_argument("--artifact-uri", metavar="<uri>", help="A SavedModel directory")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[Any, Any]:
        v = self.client.create_version(
            parsed_args.model, job_id=parsed_args.job, artifact_uri=parsed_args.artifact_uri
        )
        return show(version_fields(v))


class DeleteModelVersion(MLCommand):
    """Delete a version (refused while a label or the endpoint uses it)."""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        _model_arg(parser)
        _version_arg(parser)
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> None:
        self.client.delete_version(parsed_args.model, parsed_args.version)


# -- labels and history ---------------------------------------------------------------------


class SetModelLabel(MLShowOne):
    """Point a label of a model at a READY version."""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        _model_arg(parser)
        parser.add_argument("label", metavar="<label>", help="Label name (e.g. default)")
        _version_arg(parser)
        parser.add_argument("--why", metavar="<text>", default="", help="Kept in the history")
        parser.add_argument(
            "--expected-version",
            metavar="<version>",
            type=int,
            help="Only if the label points at this version now (compare-and-set)",
        )
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[Any, Any]:
        kwargs: dict[str, Any] = {"why": parsed_args.why}
        if parsed_args.expected_version is not None:
            kwargs["expected_version"] = parsed_args.expected_version
        moved = self.client.set_label(
            parsed_args.model, parsed_args.label, parsed_args.version, **kwargs
        )
        return show(
            {k: moved.get(k) for k in ("model", "label", "version", "from_version", "moved")}
        )


class DeleteModelLabel(MLCommand):
    """Remove a label (refused while the live endpoint follows it)."""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        _model_arg(parser)
        parser.add_argument("label", metavar="<label>", help="Label name")
        parser.add_argument("--why", metavar="<text>", default="", help="Kept in the history")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> None:
        self.client.delete_label(parsed_args.model, parsed_args.label, why=parsed_args.why)


class ModelHistory(MLLister):
    """A model's label moves, oldest first (or, with --at, where each label pointed then)."""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        _model_arg(parser)
        parser.add_argument("--label", metavar="<label>", help="Only this label")
        parser.add_argument("--at", metavar="<time>", help="ISO 8601: the labels at that time")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[Any, Any]:
        body = self.client.model_history(
            parsed_args.model, label=parsed_args.label, at=parsed_args.at
        )
        if parsed_args.at:
            labels = body.get("labels") or {}
            return ("Label", "Version"), rows(
                [{"label": k, "version": v} for k, v in sorted(labels.items())],
                ["label", "version"],
            )
        fields = ["at", "label", "from_version", "to_version", "by", "why"]
        return HISTORY_COLUMNS, rows(body.get("history") or [], fields)


# -- deploy and endpoints -------------------------------------------------------------------


def endpoint_fields(e: Json) -> dict[str, Any]:
    return {
        "id": e.get("id"),
        "model": e.get("model"),
        "name": e.get("name"),
        "state": e.get("state"),
        "label": e.get("label"),
        "version": e.get("version"),
        "target_version": e.get("target_version"),
        "serving_version": e.get("serving_version"),
        "traffic": e.get("traffic") or {},
        "replicas": e.get("replicas"),
        "flavor": e.get("flavor"),
        "log_sample_rate": e.get("log_sample_rate"),
        "failure_message": e.get("failure_message"),
        "servers": [
            f"{s.get('name')} v{s.get('version')} {s.get('replica_state')} {s.get('address') or ''}"
            for s in e.get("servers") or []
        ],
        "created_at": e.get("created_at"),
        "updated_at": e.get("updated_at"),
    }


class DeployModel(MLShowOne):
    """Serve a model on an endpoint: follow a label (default: `default`) or pin a version."""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        _model_arg(parser)
        target = parser.add_mutually_exclusive_group()
        target.add_argument("--label", metavar="<label>", help="Follow this label")
        target.add_argument(
            "--version",
            metavar="<version>",
            type=int,
            help="Pin this version (moves the live endpoint if there is one)",
        )
        parser.add_argument("--replicas", metavar="<n>", type=int, help="Replica servers")
        parser.add_argument("--flavor", metavar="<flavor>", help="The replicas' flavor")
        parser.add_argument(
            "--traffic",
            metavar="<version=percent>",
            action="append",
            type=key_values("version"),
            default=[],
            help="A traffic split (repeatable, summing to 100)",
        )
        parser.add_argument(
            "--log-sample-rate", metavar="<0..1>", type=float, help="Requests logged"
        )
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[Any, Any]:
        a = parsed_args
        if a.version is not None and not a.traffic and a.log_sample_rate is None:
            ep = self.client.deploy_version(
                a.model, a.version, replicas=a.replicas, flavor=a.flavor
            )
        else:
            ep = self.client.deploy(
                a.model,
                label=a.label,
                version=a.version,
                replicas=a.replicas,
                flavor=a.flavor,
                traffic=_traffic(a.traffic) if a.traffic else None,
                log_sample_rate=a.log_sample_rate,
            )
        return show(endpoint_fields(ep))


class ListEndpoint(MLLister):
    """List live endpoints: of one model, or of every model of your project."""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument("--model", metavar="<model>", help="Only this model's")
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[Any, Any]:
        if parsed_args.model:
            names = [parsed_args.model]
        else:
            names = [str(m["name"]) for m in self.client.list_models()]
        found: list[Json] = []
        for name in names:
            found += self.client.list_endpoints(name)
        fields = [
            "id",
            "model",
            "name",
            "state",
            "label",
            "version",
            "serving_version",
            "replicas",
            "flavor",
        ]
        return ENDPOINT_COLUMNS, rows(found, fields)


def _endpoint_args(parser: argparse.ArgumentParser) -> None:
    _model_arg(parser)
    parser.add_argument("endpoint", metavar="<endpoint>", help="Endpoint ID (ep-...)")


class ShowEndpoint(MLShowOne):
    """Show an endpoint: its target, serving version, traffic and replicas."""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        _endpoint_args(parser)
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[Any, Any]:
        ep = self.client.get_endpoint(parsed_args.model, parsed_args.endpoint)
        return show(endpoint_fields(ep))


class SetEndpoint(MLShowOne):
    """Change an endpoint: replicas, label or version, traffic split, log sample rate."""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        _endpoint_args(parser)
        parser.add_argument("--replicas", metavar="<n>", type=int, help="Replica servers")
        target = parser.add_mutually_exclusive_group()
        target.add_argument("--label", metavar="<label>", help="Follow this label")
        target.add_argument("--version", metavar="<version>", type=int, help="Pin this version")
        split = parser.add_mutually_exclusive_group()
        split.add_argument(
            "--traffic",
            metavar="<version=percent>",
            action="append",
            type=key_values("version"),
            default=[],
            help="A traffic split (repeatable, summing to 100)",
        )
        split.add_argument("--no-traffic", action="store_true", help="Drop the traffic split")
        parser.add_argument(
            "--log-sample-rate", metavar="<0..1>", type=float, help="Requests logged"
        )
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> tuple[Any, Any]:
        a = parsed_args
        fields: dict[str, Any] = {}
        if a.replicas is not None:
            fields["replicas"] = a.replicas
        if a.label is not None:
            fields["label"] = a.label
        if a.version is not None:
            fields["version"] = a.version
        if a.traffic:
            fields["traffic"] = _traffic(a.traffic)
        if a.no_traffic:
            fields["traffic"] = None
        if a.log_sample_rate is not None:
            fields["log_sample_rate"] = a.log_sample_rate
        if not fields:
            raise exceptions.CommandError(
                "nothing to change: give --replicas, --label, --version, --traffic, "
                "--no-traffic or --log-sample-rate"
            )
        ep = self.client.update_endpoint(a.model, a.endpoint, **fields)
        return show(endpoint_fields(ep))


class DeleteEndpoint(MLCommand):
    """Delete an endpoint: its replicas are drained and deleted."""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        _endpoint_args(parser)
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> None:
        self.client.undeploy(parsed_args.model, parsed_args.endpoint)
