from __future__ import annotations

from typing import Any

from django.urls import reverse
from django.utils.translation import gettext_lazy as _
from horizon import tables


class Endpoint:
    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.id = str(data["id"])
        self.model = str(data.get("model") or "")
        self.state = data.get("state") or ""
        self.follows = (
            f"label {data['label']}" if data.get("label") else f"version {data.get('version')}"
        )
        self.serving_version = data.get("serving_version") or "-"
        traffic = data.get("traffic") or {}
        self.traffic = ", ".join(f"v{k}: {v}%" for k, v in sorted(traffic.items())) or "-"
        servers = data.get("servers") or []
        ready = sum(1 for s in servers if s.get("replica_state") == "ready")
        self.replicas = f"{ready}/{data.get('replicas')}"
        self.flavor = data.get("flavor") or ""


def _link(e: Endpoint) -> str:
    return reverse("horizon:machine_learning:endpoints:detail", args=[e.model, e.id])


class EndpointsTable(tables.DataTable):
    model = tables.Column("model", verbose_name=_("Model"))
    id = tables.Column("id", verbose_name=_("Endpoint"), link=_link)
    state = tables.Column("state", verbose_name=_("State"))
    follows = tables.Column("follows", verbose_name=_("Follows"))
    serving = tables.Column("serving_version", verbose_name=_("Serving version"))
    traffic = tables.Column("traffic", verbose_name=_("Traffic"))
    replicas = tables.Column("replicas", verbose_name=_("Ready replicas"))
    flavor = tables.Column("flavor", verbose_name=_("Flavor"))

    def get_object_id(self, datum: Endpoint) -> str:
        return datum.id

    class Meta:
        name = "endpoints"
        verbose_name = _("Endpoints")
