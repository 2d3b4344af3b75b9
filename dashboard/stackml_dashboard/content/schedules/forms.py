from __future__ import annotations

import json
from typing import Any

from django import forms as django_forms
from django.utils.translation import gettext_lazy as _
from horizon import forms, messages

from stackml_dashboard import api
from stackml_dashboard.content.jobs.forms import NAME_RE


class CreateScheduleForm(forms.SelfHandlingForm):
    name = forms.RegexField(label=_("Name"), regex=NAME_RE, max_length=63)
    cron = forms.CharField(
        label=_("Cron"),
        max_length=255,
        help_text=_("5 fields (minute hour day month weekday) or @hourly, @daily, ..."),
    )
    timezone = forms.CharField(label=_("Time zone"), initial="UTC", max_length=64)
    concurrency = forms.ChoiceField(
        label=_("Concurrency"),
        choices=(("Forbid", "Forbid"), ("Allow", "Allow"), ("Replace", "Replace")),
        initial="Forbid",
    )
    catchup = forms.ChoiceField(
        label=_("Missed runs"),
        choices=(("none", _("only the latest")), ("all", _("all (up to the maximum)"))),
        initial="none",
    )
    max_catchup = forms.IntegerField(
        label=_("Maximum missed runs"), initial=10, min_value=1, max_value=100
    )
    job = forms.CharField(
        label=_("Job"),
        widget=forms.Textarea(attrs={"rows": 10}),
        help_text=_("The job spec, JSON, as a job's submission takes it."),
    )
    paused = forms.BooleanField(label=_("Create paused"), required=False)

    def clean_job(self) -> dict[str, Any]:
        try:
            value = json.loads(self.cleaned_data["job"])
        except ValueError as e:
            raise django_forms.ValidationError(_("Not JSON: %s") % e) from e
        if not isinstance(value, dict):
            raise django_forms.ValidationError(_("The job must be a JSON object."))
        return value

    def handle(self, request: Any, data: dict[str, Any]) -> Any:
        try:
            sched = api.schedule_create(
                request,
                data["name"],
                data["cron"],
                data["job"],
                timezone=data["timezone"],
                concurrency=data["concurrency"],
                catchup=data["catchup"],
                max_catchup=data["max_catchup"],
                paused=data["paused"],
            )
        except api.ClientError:
            api.handle(request, _("Unable to create the schedule"))
            return False
        messages.success(request, _("Created schedule %(name)s (%(id)s).") % sched)
        return sched
