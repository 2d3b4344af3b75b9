from __future__ import annotations

from typing import Any

from django.urls import reverse
from django.utils.translation import gettext_lazy as _
from horizon import tables


class Row:
    """A usage row (a job's or an endpoint's servers in the window)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.id = str(data.get("id") or data.get("project_id") or "")
        self.project_id = data.get("project_id") or ""
        self.jobs = data.get("jobs") or 0
        self.name = data.get("name") or ""
        self.state = data.get("state") or ""
        self.vm_hours = round(float(data.get("vm_seconds") or 0) / 3600, 6)
        self.gpu_hours = data.get("gpu_hours") or 0
        self.cost = data.get("cost") or 0


def _job_link(row: Row) -> str:
    return reverse("horizon:machine_learning:jobs:detail", args=[row.id])


class JobUsageTable(tables.DataTable):
    name = tables.Column("name", verbose_name=_("Job"), link=_job_link)
    id = tables.Column("id", verbose_name=_("ID"))
    state = tables.Column("state", verbose_name=_("State"))
    vm_hours = tables.Column("vm_hours", verbose_name=_("Server-hours"))
    gpu_hours = tables.Column("gpu_hours", verbose_name=_("GPU-hours"))
    cost = tables.Column("cost", verbose_name=_("Cost"))

    def get_object_id(self, datum: Row) -> str:
        return datum.id

    class Meta:
        name = "job_usage"
        verbose_name = _("Jobs in the window")


class EndpointUsageTable(tables.DataTable):
    name = tables.Column("name", verbose_name=_("Endpoint"))
    id = tables.Column("id", verbose_name=_("ID"))
    state = tables.Column("state", verbose_name=_("State"))
    vm_hours = tables.Column("vm_hours", verbose_name=_("Server-hours"))
    gpu_hours = tables.Column("gpu_hours", verbose_name=_("GPU-hours"))
    cost = tables.Column("cost", verbose_name=_("Cost"))

    def get_object_id(self, datum: Row) -> str:
        return datum.id

    class Meta:
        name = "endpoint_usage"
        verbose_name = _("Endpoints in the window")


class ProjectUsageTable(tables.DataTable):
    """Every project's totals in the window (admins, `?all_projects=1`)."""

    project = tables.Column("project_id", verbose_name=_("Project"))
    jobs = tables.Column("jobs", verbose_name=_("Jobs"))
    vm_hours = tables.Column("vm_hours", verbose_name=_("Server-hours"))
    gpu_hours = tables.Column("gpu_hours", verbose_name=_("GPU-hours"))
    cost = tables.Column("cost", verbose_name=_("Cost"))

    def get_object_id(self, datum: Row) -> str:
        return datum.project_id

    class Meta:
        name = "project_usage"
        verbose_name = _("Projects in the window")
