from __future__ import annotations

from typing import Any

from django.http import HttpResponse, HttpResponseRedirect
from django.urls import reverse
from django.utils.translation import gettext_lazy as _
from django.views import View
from horizon import messages, tables, views

from stackml_dashboard import api
from stackml_dashboard.content.endpoints import tables as ep_tables

INDEX = "horizon:machine_learning:endpoints:index"


class IndexView(tables.DataTableView):
    table_class = ep_tables.EndpointsTable
    template_name = "machine_learning/endpoints/index.html"
    page_title = _("Endpoints")

    def get_data(self) -> list[ep_tables.Endpoint]:
        try:
            return [ep_tables.Endpoint(e) for e in api.endpoint_list(self.request)]
        except api.ClientError:
            api.handle(self.request, _("Unable to list the endpoints"))
            return []


class DetailView(views.HorizonTemplateView):
    """Replicas with their health, the traffic split, scale and delete."""

    template_name = "machine_learning/endpoints/detail.html"
    page_title = "{{ endpoint.model }} / {{ endpoint.name }}"

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        model, ep_id = kwargs["model"], kwargs["endpoint_id"]
        try:
            endpoint = api.endpoint_get(self.request, model, ep_id)
        except api.ClientError:
            api.handle(
                self.request, _("Unable to show endpoint %s") % ep_id, redirect=reverse(INDEX)
            )
            raise  # not reached: handle() redirects
        row = ep_tables.Endpoint(endpoint)
        context.update(
            endpoint=endpoint,
            row=row,
            servers=endpoint.get("servers") or [],
            scale_url=reverse("horizon:machine_learning:endpoints:scale", args=[model, ep_id]),
            delete_url=reverse("horizon:machine_learning:endpoints:delete", args=[model, ep_id]),
            live=endpoint.get("state") not in ("DELETING", "DELETED"),
            url=reverse(INDEX),
        )
        return context


def _detail(model: str, ep_id: str) -> str:
    return reverse("horizon:machine_learning:endpoints:detail", args=[model, ep_id])


class ScaleView(View):
    """POST replicas=N: the endpoint's page's scale form."""

    def post(self, request: Any, model: str, endpoint_id: str) -> HttpResponse:
        try:
            replicas = int(request.POST.get("replicas", ""))
        except ValueError:
            messages.error(request, _("Replicas must be a whole number."))
            return HttpResponseRedirect(_detail(model, endpoint_id))
        try:
            api.endpoint_scale(request, model, endpoint_id, replicas)
        except api.ClientError:
            api.handle(request, _("Unable to scale endpoint %s") % endpoint_id)
        else:
            messages.success(request, _("Scaling to %d replica(s).") % replicas)
        return HttpResponseRedirect(_detail(model, endpoint_id))


class DeleteView(View):
    def post(self, request: Any, model: str, endpoint_id: str) -> HttpResponse:
        try:
            api.endpoint_delete(request, model, endpoint_id)
        except api.ClientError:
            api.handle(request, _("Unable to delete endpoint %s") % endpoint_id)
            return HttpResponseRedirect(_detail(model, endpoint_id))
        messages.success(request, _("Endpoint %s is being deleted.") % endpoint_id)
        return HttpResponseRedirect(reverse(INDEX))
