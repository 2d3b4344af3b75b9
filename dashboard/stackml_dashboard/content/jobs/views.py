from __future__ import annotations

from typing import Any

from django.http import HttpResponse, HttpResponseRedirect, JsonResponse
from django.urls import reverse, reverse_lazy
from django.utils.translation import gettext_lazy as _
from django.views import View
from horizon import forms, messages, tables, views

from stackml_dashboard import api, charts
from stackml_dashboard.content.jobs import forms as job_forms
from stackml_dashboard.content.jobs import tables as job_tables

PAGE_SIZE = 50
LOG_TAIL_BYTES = 64 * 1024


class IndexView(tables.DataTableView):
    table_class = job_tables.JobsTable
    template_name = "machine_learning/jobs/index.html"
    page_title = _("Jobs")

    def has_more_data(self, table: Any) -> bool:
        return self._more

    def get_data(self) -> list[job_tables.Job]:
        self._more = False
        info = self.get_server_filter_info(self.request) or {}
        state = (info.get("value") or "").strip().upper() or None
        marker = self.request.GET.get(self.table_class._meta.pagination_param)
        try:
            jobs, nxt = api.job_list(self.request, state=state, limit=PAGE_SIZE, marker=marker)
        except api.ClientError:
            api.handle(self.request, _("Unable to list the jobs"))
            return []
        self._more = bool(nxt)
        return [job_tables.Job(j) for j in jobs]


class SubmitView(forms.ModalFormView):
    form_class = job_forms.SubmitJobForm
    template_name = "machine_learning/jobs/submit.html"
    page_title = _("Submit a training job")
    submit_label = _("Submit")
    submit_url = reverse_lazy("horizon:machine_learning:jobs:submit")
    cancel_url = reverse_lazy("horizon:machine_learning:jobs:index")

    def get_success_url(self) -> str:
        form = getattr(self, "_form", None)
        job = getattr(form, "job", None)
        if job:
            return reverse("horizon:machine_learning:jobs:detail", args=[job["id"]])
        return str(self.cancel_url)

    def form_valid(self, form: Any) -> Any:
        self._form = form
        return super().form_valid(form)


def _timeline(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for ev in events:
        kind = ev.get("kind") or ""
        change = ""
        if ev.get("to"):
            change = f"{ev.get('from') or '∅'} → {ev['to']}"
        rows.append(
            {"at": ev.get("at"), "kind": kind, "change": change, "message": ev.get("message") or ""}
        )
    return rows


class DetailView(views.HorizonTemplateView):
    template_name = "machine_learning/jobs/detail.html"
    page_title = "{{ job.name }}"

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        job_id = kwargs["job_id"]
        index = reverse("horizon:machine_learning:jobs:index")
        try:
            job = api.job_get(self.request, job_id)
            events = api.job_events(self.request, job_id)
            metrics = api.job_metrics(self.request, job_id)
        except api.ClientError:
            api.handle(self.request, _("Unable to show job %s") % job_id, redirect=index)
            raise  # not reached: handle() redirects
        row = job_tables.Job(job)
        context.update(
            job=job,
            row=row,
            terminal=row.terminal,
            timeline=_timeline(events),
            charts=charts.charts(metrics),
            log_url=reverse("horizon:machine_learning:jobs:log", args=[job_id]),
            url=index,
            cancel_url=reverse("horizon:machine_learning:jobs:cancel", args=[job_id]),
            delete_url=reverse("horizon:machine_learning:jobs:delete", args=[job_id]),
            resources=job.get("resources") or [],
            usage=job.get("usage") or {},
            tuning=job.get("tuning"),
            trials=_trials(job.get("tuning")),
        )
        return context


def _trials(tuning: Any) -> list[dict[str, Any]]:
    """A tuning job's trials as the page lists them, the best one marked."""
    if not isinstance(tuning, dict):
        return []
    best = (tuning.get("best_trial") or {}).get("trial")
    return [
        {
            "trial": t.get("trial"),
            "job_id": t.get("job_id"),
            "state": t.get("state"),
            "params": ", ".join(
                f"{k}={v}" for k, v in sorted((t.get("hyperparameters") or {}).items())
            ),
            "value": None if t.get("value") is None else f"{t['value']:.6g}",
            "best": t.get("trial") == best,
        }
        for t in tuning.get("trials") or []
    ]


class LogView(View):
    """The log from `offset` (the page polls it): JSON {text, next_offset, state}. A first
    call (offset absent) starts at most LOG_TAIL_BYTES before the end."""

    def get(self, request: Any, job_id: str) -> HttpResponse:
        raw = request.GET.get("offset")
        try:
            offset = max(0, int(raw)) if raw is not None else 0
        except ValueError:
            return JsonResponse({"error": "offset must be an integer"}, status=400)
        try:
            data, nxt = api.job_logs(request, job_id, offset)
            state = api.job_get(request, job_id).get("state")
        except api.APIError as e:
            return JsonResponse({"error": api.message(e)}, status=e.status)
        except api.ClientError as e:
            return JsonResponse({"error": api.message(e)}, status=502)
        if raw is None and len(data) > LOG_TAIL_BYTES:
            data = data[-LOG_TAIL_BYTES:]
        text = data.decode("utf-8", "replace")
        return JsonResponse({"text": text, "next_offset": nxt, "state": state})


class CancelView(View):
    """POST: ask the API to cancel the job (the detail page's button)."""

    def post(self, request: Any, job_id: str) -> HttpResponse:
        detail = reverse("horizon:machine_learning:jobs:detail", args=[job_id])
        try:
            api.job_cancel(request, job_id)
        except api.ClientError:
            api.handle(request, _("Unable to cancel job %s") % job_id)
        else:
            messages.success(request, _("Cancellation requested for job %s.") % job_id)
        return HttpResponseRedirect(detail)


class DeleteView(View):
    """POST: delete the (finished) job; back to the list, or to the job when refused."""

    def post(self, request: Any, job_id: str) -> HttpResponse:
        try:
            api.job_delete(request, job_id)
        except api.ClientError:
            api.handle(request, _("Unable to delete job %s") % job_id)
            return HttpResponseRedirect(
                reverse("horizon:machine_learning:jobs:detail", args=[job_id])
            )
        messages.success(request, _("Deleted job %s.") % job_id)
        return HttpResponseRedirect(reverse("horizon:machine_learning:jobs:index"))
