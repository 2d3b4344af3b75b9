from __future__ import annotations

import json
from typing import Any

from django import forms as django_forms
from django.utils.translation import gettext_lazy as _
from horizon import forms, messages

from stackml_dashboard import api

MODEL_RE = r"^[a-z][a-z0-9_-]{0,62}$"


class CreateModelForm(forms.SelfHandlingForm):
    name = forms.RegexField(
        label=_("Name"),
        regex=MODEL_RE,
        max_length=63,
        error_messages={"invalid": _("Lower-case letters, digits, '_' and '-'; a letter first.")},
    )
    description = forms.CharField(
        label=_("Description"), required=False, max_length=4096, widget=forms.Textarea()
    )

    def handle(self, request: Any, data: dict[str, Any]) -> Any:
        try:
            model = api.model_create(request, data["name"], data["description"])
        except api.ClientError:
            api.handle(request, _("Unable to create the model"))
            return False
        messages.success(request, _("Created model %s.") % model["name"])
        return model


class RegisterForm(forms.SelfHandlingForm):
    job_id = forms.CharField(
        label=_("Job"), max_length=64, help_text=_("A SUCCEEDED job of this project.")
    )

    def handle(self, request: Any, data: dict[str, Any]) -> Any:
        model = self.initial["name"]
        try:
            v = api.version_create(request, model, data["job_id"])
        except api.ClientError:
            api.handle(request, _("Unable to register a version of %s") % model)
            return False
        messages.success(request, _("Version %(version)s of %(model)s is being checked.") % v)
        return v


class LabelForm(forms.SelfHandlingForm):
    label = forms.RegexField(label=_("Label"), regex=r"^[a-z][a-z0-9_-]{0,62}$", initial="default")
    version = forms.IntegerField(label=_("Version"), min_value=1)
    why = forms.CharField(label=_("Why"), required=False, max_length=1000)

    def handle(self, request: Any, data: dict[str, Any]) -> Any:
        model = self.initial["name"]
        try:
            out = api.label_set(request, model, data["label"], data["version"], data["why"])
        except api.ClientError:
            api.handle(request, _("Unable to move label %s") % data["label"])
            return False
        messages.success(request, _("%(label)s now points at version %(version)s.") % out)
        return out


class DeployForm(forms.SelfHandlingForm):
    label = forms.CharField(
        label=_("Follow label"), required=False, max_length=63, help_text=_("Default: default.")
    )
    version = forms.IntegerField(label=_("Or pin version"), required=False, min_value=1)
    replicas = forms.IntegerField(label=_("Replicas"), initial=1, min_value=1)
    flavor = forms.CharField(label=_("Flavor"), required=False, max_length=255)

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        if data.get("label") and data.get("version"):
            raise django_forms.ValidationError(_("Follow a label or pin a version, not both."))
        return data

    def handle(self, request: Any, data: dict[str, Any]) -> Any:
        model = self.initial["name"]
        fields = {k: data[k] for k in ("label", "version", "replicas", "flavor") if data.get(k)}
        try:
            ep = api.deploy(request, model, **fields)
        except api.ClientError:
            api.handle(request, _("Unable to deploy %s") % model)
            return False
        messages.success(request, _("Endpoint %(id)s is %(state)s.") % ep)
        return ep


class PredictForm(forms.SelfHandlingForm):
    instances = forms.CharField(
        label=_("Instances"),
        widget=forms.Textarea(attrs={"rows": 6}),
        help_text=_(
            "JSON: a list of rows, e.g. [[0.1, 0.2], [0.3, 0.4]], or a whole TF Serving "
            'body {"instances": ...}.'
        ),
    )
    version = forms.IntegerField(label=_("Version"), required=False, min_value=1)
    label = forms.CharField(label=_("Or label"), required=False, max_length=63)

    def clean_instances(self) -> dict[str, Any]:
        try:
            value = json.loads(self.cleaned_data["instances"])
        except ValueError as e:
            raise django_forms.ValidationError(_("Not JSON: %s") % e) from e
        if isinstance(value, list):
            return {"instances": value}
        if isinstance(value, dict):
            return value
        raise django_forms.ValidationError(_("A list of rows or a JSON object."))

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        if data.get("label") and data.get("version"):
            raise django_forms.ValidationError(_("A version or a label, not both."))
        return data

    def handle(self, request: Any, data: dict[str, Any]) -> Any:
        model = self.initial["name"]
        try:
            answer, meta = api.predict(
                request,
                model,
                data["instances"],
                version=data.get("version") or None,
                label=data.get("label") or None,
            )
        except api.ClientError:
            api.handle(request, _("Prediction failed"))
            return False
        return {"answer": answer, **meta}
