from __future__ import annotations

from typing import Any

from django.urls import reverse
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext_lazy
from horizon import tables

from stackml_dashboard import api


class Schedule:
    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.id = str(data["id"])
        self.name = data.get("name") or ""
        self.cron = data.get("cron") or ""
        self.timezone = data.get("timezone") or ""
        self.concurrency = data.get("concurrency") or ""
        self.paused = bool(data.get("paused"))
        self.next_fire_at = data.get("next_fire_at") or ""
        last = data.get("last_run") or {}
        self.last_run = (
            f"{last.get('fire_time')}: {last.get('outcome')}" if last.get("outcome") else ""
        )


def _link(s: Schedule) -> str:
    return reverse("horizon:machine_learning:schedules:detail", args=[s.id])


class CreateSchedule(tables.LinkAction):
    name = "create"
    verbose_name = _("Create Schedule")
    url = "horizon:machine_learning:schedules:create"
    icon = "plus"


class PauseSchedule(tables.BatchAction):
    name = "pause"

    @staticmethod
    def action_present(count: int) -> str:
        return ngettext_lazy("Pause Schedule", "Pause Schedules", count)

    @staticmethod
    def action_past(count: int) -> str:
        return ngettext_lazy("Paused Schedule", "Paused Schedules", count)

    def allowed(self, request: Any, s: Schedule | None = None) -> bool:
        return s is None or not s.paused

    def action(self, request: Any, obj_id: str) -> None:
        try:
            api.schedule_pause(request, obj_id, True)
        except api.ClientError:
            api.handle(request, _("Unable to pause schedule %s") % obj_id, escalate=True)


class ResumeSchedule(tables.BatchAction):
    name = "resume"

    @staticmethod
    def action_present(count: int) -> str:
        return ngettext_lazy("Resume Schedule", "Resume Schedules", count)

    @staticmethod
    def action_past(count: int) -> str:
        return ngettext_lazy("Resumed Schedule", "Resumed Schedules", count)

    def allowed(self, request: Any, s: Schedule | None = None) -> bool:
        return s is None or s.paused

    def action(self, request: Any, obj_id: str) -> None:
        try:
            api.schedule_pause(request, obj_id, False)
        except api.ClientError:
            api.handle(request, _("Unable to resume schedule %s") % obj_id, escalate=True)


class DeleteSchedule(tables.DeleteAction):
    help_text = _("The jobs it started are left as they are.")

    @staticmethod
    def action_present(count: int) -> str:
        return ngettext_lazy("Delete Schedule", "Delete Schedules", count)

    @staticmethod
    def action_past(count: int) -> str:
        return ngettext_lazy("Deleted Schedule", "Deleted Schedules", count)

    def delete(self, request: Any, obj_id: str) -> None:
        try:
            api.schedule_delete(request, obj_id)
        except api.ClientError:
            api.handle(request, _("Unable to delete schedule %s") % obj_id, escalate=True)


class SchedulesTable(tables.DataTable):
    name = tables.Column("name", verbose_name=_("Name"), link=_link)
    cron = tables.Column("cron", verbose_name=_("Cron"))
    timezone = tables.Column("timezone", verbose_name=_("Time zone"))
    concurrency = tables.Column("concurrency", verbose_name=_("Concurrency"))
    paused = tables.Column("paused", verbose_name=_("Paused"))
    next_fire_at = tables.Column("next_fire_at", verbose_name=_("Next run"))
    last_run = tables.Column("last_run", verbose_name=_("Last run"))

    def get_object_id(self, datum: Schedule) -> str:
        return datum.id

    def get_object_display(self, datum: Schedule) -> str:
        return datum.name

    class Meta:
        name = "schedules"
        verbose_name = _("Schedules")
        table_actions = (CreateSchedule, DeleteSchedule)
        row_actions = (PauseSchedule, ResumeSchedule, DeleteSchedule)
