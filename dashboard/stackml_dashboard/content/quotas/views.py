from __future__ import annotations

from typing import Any

from django.utils.translation import gettext_lazy as _
from horizon import tables

from stackml_dashboard import api
from stackml_dashboard.content.quotas import tables as quota_tables

RESOURCES = (("jobs", _("Running jobs")), ("servers", _("Servers")), ("gpus", _("GPUs")))


class IndexView(tables.MultiTableView):
    """The project's quota (limits, in use, queued) and its metered usage in a window
    (`?since=&until=`, ISO 8601; the API's default: the last 30 days); an admin may ask for
    every project's (`?all_projects=1`: GPU-hours and cost per project)."""

    table_classes = (
        quota_tables.ProjectUsageTable,
        quota_tables.JobUsageTable,
        quota_tables.EndpointUsageTable,
    )
    template_name = "machine_learning/quotas/index.html"
    page_title = _("Quotas and Usage")

    def _usage(self) -> dict[str, Any]:
        if not hasattr(self, "_usage_cache"):
            self._usage_cache: dict[str, Any] = {}
            try:
                self._usage_cache = api.usage(
                    self.request,
                    since=self.request.GET.get("since") or None,
                    until=self.request.GET.get("until") or None,
                    all_projects=self._all_projects(),
                )
            except api.ClientError:
                api.handle(self.request, _("Unable to read the usage"))
        return self._usage_cache

    def _all_projects(self) -> bool:
        return self.request.GET.get("all_projects") == "1"

    def get_project_usage_data(self) -> list[quota_tables.Row]:
        return [quota_tables.Row(r) for r in self._usage().get("projects") or []]

    def get_job_usage_data(self) -> list[quota_tables.Row]:
        return [quota_tables.Row(r) for r in self._usage().get("jobs") or []]

    def get_endpoint_usage_data(self) -> list[quota_tables.Row]:
        return [quota_tables.Row(r) for r in self._usage().get("endpoints") or []]

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        quota: dict[str, Any] = {}
        try:
            quota = api.quotas(self.request)
        except api.ClientError:
            api.handle(self.request, _("Unable to read the quota"))
        limits, used = quota.get("limits") or {}, quota.get("in_use") or {}
        rows = []
        for key, label in RESOURCES:
            limit, n = limits.get(key), int(used.get(key) or 0)
            pct = min(100, round(100 * n / limit)) if isinstance(limit, int) and limit else 0
            rows.append({"key": key, "label": label, "limit": limit, "used": n, "percent": pct})
        usage = self._usage()
        context.update(
            quota=quota,
            quota_rows=rows,
            usage=usage,
            totals=usage.get("totals") or {},
            since=self.request.GET.get("since") or usage.get("since") or "",
            until=self.request.GET.get("until") or usage.get("until") or "",
            all_projects=self._all_projects(),
            is_admin=bool(getattr(self.request.user, "is_superuser", False)),
        )
        return context
