from __future__ import annotations

import json
import shlex
from typing import Any

from django import forms as django_forms
from django.urls import reverse
from django.utils.translation import gettext_lazy as _
from horizon import forms, messages

from stackml_dashboard import api

NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"


def _pairs(text: str, what: str) -> dict[str, str]:
    """`key=value` lines (blank lines ignored)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise django_forms.ValidationError(
                _("%(what)s: %(line)r is not key=value") % {"what": what, "line": line}
            )
        out[key.strip()] = value.strip()
    return out


class SubmitJobForm(forms.SelfHandlingForm):
    name = forms.RegexField(
        label=_("Name"),
        regex=NAME_RE,
        max_length=63,
        error_messages={
            "invalid": _("Letters, digits, '.', '_' and '-'; a letter or digit first.")
        },
    )
    package = forms.FileField(
        label=_("Trainer package (.tar.gz)"),
        help_text=_("A gzip'd tar of the trainer: it is staged in your project, then run."),
    )
    module = forms.CharField(label=_("Module"), initial="trainer.task", max_length=255)
    args = forms.CharField(
        label=_("Arguments"),
        required=False,
        max_length=4096,
        help_text=_("Passed to the module, split as a shell would."),
    )
    flavor = forms.CharField(
        label=_("Flavor"), required=False, max_length=255, help_text=_("Default: the platform's.")
    )
    hyperparameters = forms.CharField(
        label=_("Hyperparameters"),
        required=False,
        widget=forms.Textarea(attrs={"rows": 3}),
        help_text=_('A JSON object, e.g. {"epochs": 3}: passed as --epochs=3.'),
    )
    labels = forms.CharField(
        label=_("Labels"),
        required=False,
        widget=forms.Textarea(attrs={"rows": 2}),
        help_text=_("key=value, one a line."),
    )
    register_as = forms.RegexField(
        label=_("Register as model"),
        regex=r"^[a-z][a-z0-9_-]{0,62}$",
        required=False,
        max_length=63,
        help_text=_("When the job succeeds, its model becomes a new version of this model."),
    )
    max_runtime_seconds = forms.IntegerField(
        label=_("Maximum run time (s)"), required=False, min_value=1
    )

    def clean_package(self) -> Any:
        f = self.cleaned_data["package"]
        if not (f.name.endswith(".tar.gz") or f.name.endswith(".tgz")):
            raise django_forms.ValidationError(_("The package must be a .tar.gz file."))
        return f

    def clean_args(self) -> list[str]:
        try:
            return shlex.split(self.cleaned_data.get("args") or "")
        except ValueError as e:
            raise django_forms.ValidationError(_("Arguments: %s") % e) from e

    def clean_hyperparameters(self) -> dict[str, Any]:
        text = (self.cleaned_data.get("hyperparameters") or "").strip()
        if not text:
            return {}
        try:
            value = json.loads(text)
        except ValueError as e:
            raise django_forms.ValidationError(_("Not JSON: %s") % e) from e
        if not isinstance(value, dict):
            raise django_forms.ValidationError(_("Hyperparameters must be a JSON object."))
        return value

    def clean_labels(self) -> dict[str, str]:
        return _pairs(self.cleaned_data.get("labels") or "", str(_("Labels")))

    def spec(self, package_uri: str) -> dict[str, Any]:
        d = self.cleaned_data
        trainer: dict[str, Any] = {"package_uri": package_uri, "module": d["module"]}
        if d["args"]:
            trainer["args"] = d["args"]
        spec: dict[str, Any] = {"name": d["name"], "trainer": trainer}
        if d.get("flavor"):
            spec["resources"] = {"flavor": d["flavor"]}
        if d["hyperparameters"]:
            spec["hyperparameters"] = d["hyperparameters"]
        if d["labels"]:
            spec["labels"] = d["labels"]
        if d.get("register_as"):
            spec["output"] = {"register_as": d["register_as"]}
        if d.get("max_runtime_seconds"):
            spec["max_runtime_seconds"] = d["max_runtime_seconds"]
        return spec

    def handle(self, request: Any, data: dict[str, Any]) -> Any:
        upload = data["package"]
        try:
            staged = api.package_upload(request, upload, upload.name)
        except api.ClientError:
            api.handle(request, _("Unable to stage the package"))
            return False
        try:
            job = api.job_create(request, self.spec(staged["package_uri"]))
        except api.ClientError:
            api.handle(request, _("Unable to submit the job"))
            return False
        messages.success(request, _("Submitted job %(name)s (%(id)s).") % job)
        self.job = job
        return job

    def success_url(self) -> str:
        return reverse("horizon:machine_learning:jobs:detail", args=[self.job["id"]])
