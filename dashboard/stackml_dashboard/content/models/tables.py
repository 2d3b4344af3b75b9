from __future__ import annotations

from typing import Any

from django.urls import reverse
from django.utils.translation import gettext_lazy as _
from django.utils.translation import ngettext_lazy
from horizon import tables

from stackml_dashboard import api


class Model:
    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.id = str(data.get("id") or data["name"])
        self.name = str(data["name"])
        self.description = data.get("description") or ""
        self.versions = data.get("versions") or 0
        self.latest_version = data.get("latest_version") or ""
        labels = data.get("labels") or {}
        self.labels = ", ".join(f"{k}→{v}" for k, v in sorted(labels.items()))
        self.created_at = data.get("created_at") or ""


def _link(m: Model) -> str:
    return reverse("horizon:machine_learning:models:detail", args=[m.name])


class CreateModel(tables.LinkAction):
    name = "create"
    verbose_name = _("Create Model")
    url = "horizon:machine_learning:models:create"
    icon = "plus"


class DeleteModel(tables.DeleteAction):
    help_text = _("Its versions, labels and history go; the stored artifacts stay.")

    @staticmethod
    def action_present(count: int) -> str:
        return ngettext_lazy("Delete Model", "Delete Models", count)

    @staticmethod
    def action_past(count: int) -> str:
        return ngettext_lazy("Deleted Model", "Deleted Models", count)

    def delete(self, request: Any, obj_id: str) -> None:
        try:
            api.model_delete(request, obj_id)
        except api.ClientError:
            api.handle(request, _("Unable to delete model %s") % obj_id, escalate=True)


class ModelsTable(tables.DataTable):
    name = tables.Column("name", verbose_name=_("Name"), link=_link)
    description = tables.Column("description", verbose_name=_("Description"))
    versions = tables.Column("versions", verbose_name=_("Versions"))
    latest = tables.Column("latest_version", verbose_name=_("Latest"))
    labels = tables.Column("labels", verbose_name=_("Labels"))
    created = tables.Column("created_at", verbose_name=_("Created"))

    def get_object_id(self, datum: Model) -> str:
        return datum.name  # the API names models by name

    def get_object_display(self, datum: Model) -> str:
        return datum.name

    class Meta:
        name = "models"
        verbose_name = _("Models")
        table_actions = (CreateModel, DeleteModel)
        row_actions = (DeleteModel,)
