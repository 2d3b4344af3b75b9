from __future__ import annotations

import json
from typing import Any

from django.urls import reverse, reverse_lazy
from django.utils.translation import gettext_lazy as _
from horizon import forms, tables, views

from stackml_dashboard import api
from stackml_dashboard.content.schedules import forms as schedule_forms
from stackml_dashboard.content.schedules import tables as schedule_tables

INDEX = "horizon:machine_learning:schedules:index"


class IndexView(tables.DataTableView):
    table_class = schedule_tables.SchedulesTable
    template_name = "machine_learning/schedules/index.html"
    page_title = _("Schedules")

    def get_data(self) -> list[schedule_tables.Schedule]:
        try:
            return [schedule_tables.Schedule(s) for s in api.schedule_list(self.request)]
        except api.ClientError:
            api.handle(self.request, _("Unable to list the schedules"))
            return []


class CreateView(forms.ModalFormView):
    form_class = schedule_forms.CreateScheduleForm
    template_name = "machine_learning/schedules/create.html"
    page_title = _("Create a schedule")
    submit_label = _("Create")
    submit_url = reverse_lazy("horizon:machine_learning:schedules:create")
    success_url = reverse_lazy(INDEX)
    cancel_url = reverse_lazy(INDEX)

    def get_initial(self) -> dict[str, Any]:
        """`?from_job=<id>`: that job's spec as the template (without its model URI)."""
        job_id = self.request.GET.get("from_job")
        if not job_id:
            return {}
        try:
            spec = dict(api.job_get(self.request, job_id).get("spec") or {})
        except api.ClientError:
            api.handle(self.request, _("Unable to read job %s") % job_id)
            return {}
        output = dict(spec.get("output") or {})
        output.pop("model_uri", None)
        spec.pop("output", None)
        if output:
            spec["output"] = output
        return {"job": json.dumps(spec, indent=2, sort_keys=True)}


class DetailView(views.HorizonTemplateView):
    template_name = "machine_learning/schedules/detail.html"
    page_title = "{{ schedule.name }}"

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        ref = kwargs["schedule_id"]
        try:
            schedule = api.schedule_get(self.request, ref)
            runs = api.schedule_runs(self.request, ref)
        except api.ClientError:
            api.handle(self.request, _("Unable to show schedule %s") % ref, redirect=reverse(INDEX))
            raise  # not reached: handle() redirects
        context.update(
            schedule=schedule,
            runs=runs,
            job_json=json.dumps(schedule.get("job") or {}, indent=2, sort_keys=True),
            url=reverse(INDEX),
        )
        return context
