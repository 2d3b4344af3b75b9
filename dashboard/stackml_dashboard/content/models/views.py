from __future__ import annotations

import json
from typing import Any

from django.urls import reverse, reverse_lazy
from django.utils.translation import gettext_lazy as _
from horizon import forms, tables, views

from stackml_dashboard import api
from stackml_dashboard.content.models import forms as model_forms
from stackml_dashboard.content.models import tables as model_tables

INDEX = "horizon:machine_learning:models:index"


def _detail(name: str) -> str:
    return reverse("horizon:machine_learning:models:detail", args=[name])


class IndexView(tables.DataTableView):
    table_class = model_tables.ModelsTable
    template_name = "machine_learning/models/index.html"
    page_title = _("Models")

    def get_data(self) -> list[model_tables.Model]:
        try:
            return [model_tables.Model(m) for m in api.model_list(self.request)]
        except api.ClientError:
            api.handle(self.request, _("Unable to list the models"))
            return []


class CreateView(forms.ModalFormView):
    form_class = model_forms.CreateModelForm
    template_name = "machine_learning/models/form.html"
    page_title = _("Create a model")
    submit_label = _("Create")
    submit_url = reverse_lazy("horizon:machine_learning:models:create")
    success_url = reverse_lazy(INDEX)
    cancel_url = reverse_lazy(INDEX)


class DetailView(views.HorizonTemplateView):
    template_name = "machine_learning/models/detail.html"
    page_title = "{{ model.name }}"

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        name = kwargs["name"]
        try:
            model = api.model_get(self.request, name)
            versions = api.version_list(self.request, name)
            history = api.model_history(self.request, name)
        except api.ClientError:
            api.handle(self.request, _("Unable to show model %s") % name, redirect=reverse(INDEX))
            raise  # not reached: handle() redirects
        for v in versions:
            v["metrics_text"] = ", ".join(
                f"{k}={val:.4g}"
                for k, val in sorted((v.get("metrics") or {}).items())
                if isinstance(val, int | float)
            )
        context.update(
            model=model,
            versions=versions,
            history=list(reversed(history)),
            endpoint=model.get("endpoint"),
            url=reverse(INDEX),
        )
        return context


class _ModelFormView(forms.ModalFormView):
    """A form about one model: its name in the initial data; back to the model's page."""

    template_name = "machine_learning/models/form.html"
    url_name = ""

    def get_initial(self) -> dict[str, Any]:
        return {"name": self.kwargs["name"]}

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        context["submit_url"] = reverse(self.url_name, args=[self.kwargs["name"]])
        context["cancel_url"] = _detail(self.kwargs["name"])
        return context

    def get_success_url(self) -> str:
        return _detail(self.kwargs["name"])


class RegisterView(_ModelFormView):
    form_class = model_forms.RegisterForm
    page_title = _("Register a version")
    submit_label = _("Register")
    url_name = "horizon:machine_learning:models:register"


class LabelView(_ModelFormView):
    form_class = model_forms.LabelForm
    page_title = _("Move a label")
    submit_label = _("Move")
    url_name = "horizon:machine_learning:models:label"


class DeployView(_ModelFormView):
    form_class = model_forms.DeployForm
    page_title = _("Deploy")
    submit_label = _("Deploy")
    url_name = "horizon:machine_learning:models:deploy"


class PredictView(_ModelFormView):
    """Predict through the model's endpoint; the answer is shown under the form."""

    form_class = model_forms.PredictForm
    page_title = _("Predict")
    submit_label = _("Predict")
    url_name = "horizon:machine_learning:models:predict"
    template_name = "machine_learning/models/predict.html"

    def form_valid(self, form: Any) -> Any:
        result = form.handle(self.request, form.cleaned_data)
        context = self.get_context_data(form=form)
        if result:
            context["answer"] = json.dumps(result["answer"], indent=2)
            context["served_by"] = result.get("version") or ""
            context["request_id"] = result.get("request_id") or ""
        return self.render_to_response(context)
