from __future__ import annotations

from typing import Any

from django.urls import reverse
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext_lazy
from horizon import tables

from stackml_dashboard import api

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})


class Job:
    """A row: the API's job with attribute access (Horizon tables read attributes)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.id = str(data["id"])
        self.name = data.get("name") or ""
        self.state = data.get("state") or ""
        self.created_at = data.get("created_at")
        self.started_at = data.get("started_at")
        self.finished_at = data.get("finished_at")
        spec = data.get("spec") or {}
        self.flavor = (spec.get("resources") or {}).get("flavor") or ""
        metrics = data.get("metrics") or {}
        self.metrics = ", ".join(
            f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if isinstance(v, int | float)
        )
        failure = data.get("failure") or {}
        self.failure = failure.get("message") or failure.get("reason") or ""

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL


class JobFilterAction(tables.FilterAction):
    filter_type = "server"
    filter_choices = (("state", _("State ="), True),)


class SubmitJob(tables.LinkAction):
    name = "submit"
    verbose_name = _("Submit Job")
    url = "horizon:machine_learning:jobs:submit"
    icon = "plus"


class CancelJob(tables.BatchAction):
    name = "cancel"
    classes = ("btn-danger",)
    help_text = _("A queued job stops at once, a running one after its servers are released.")

    @staticmethod
    def action_present(count: int) -> str:
        return ngettext_lazy("Cancel Job", "Cancel Jobs", count)

    @staticmethod
    def action_past(count: int) -> str:
        return ngettext_lazy(
            "Cancellation requested for Job", "Cancellation requested for Jobs", count
        )

    def allowed(self, request: Any, job: Job | None = None) -> bool:
        return job is None or not job.terminal

    def action(self, request: Any, obj_id: str) -> None:
        try:
            api.job_cancel(request, obj_id)
        except api.ClientError:
            api.handle(request, _("Unable to cancel job %s") % obj_id, escalate=True)


class DeleteJob(tables.DeleteAction):
    help_text = _("Only finished jobs whose servers are gone can be deleted.")

    @staticmethod
    def action_present(count: int) -> str:
        return ngettext_lazy("Delete Job", "Delete Jobs", count)

    @staticmethod
    def action_past(count: int) -> str:
        return ngettext_lazy("Deleted Job", "Deleted Jobs", count)

    def allowed(self, request: Any, job: Job | None = None) -> bool:
        return job is None or job.terminal

    def delete(self, request: Any, obj_id: str) -> None:
        try:
            api.job_delete(request, obj_id)
        except api.ClientError:
            api.handle(request, _("Unable to delete job %s") % obj_id, escalate=True)


def detail_link(job: Job) -> str:
    return reverse("horizon:machine_learning:jobs:detail", args=[job.id])


class JobsTable(tables.DataTable):
    name = tables.Column("name", verbose_name=_("Name"), link=detail_link)
    id = tables.Column("id", verbose_name=_("ID"))
    state = tables.Column("state", verbose_name=_("State"))
    flavor = tables.Column("flavor", verbose_name=_("Flavor"))
    created = tables.Column("created_at", verbose_name=_("Submitted"))
    finished = tables.Column("finished_at", verbose_name=_("Finished"))
    metrics = tables.Column("metrics", verbose_name=_("Latest metrics"))
    failure = tables.Column("failure", verbose_name=_("Failure"))

    def get_object_id(self, datum: Job) -> str:
        return datum.id

    def get_object_display(self, datum: Job) -> str:
        return datum.name or datum.id

    class Meta:
        name = "jobs"
        verbose_name = _("Training Jobs")
        pagination_param = "marker"
        table_actions = (JobFilterAction, SubmitJob, CancelJob, DeleteJob)
        row_actions = (CancelJob, DeleteJob)
