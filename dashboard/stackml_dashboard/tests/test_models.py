"""The Models and Endpoints panels against a mocked API layer."""

from __future__ import annotations

from typing import Any

from django.urls import reverse
from openstack_dashboard.test import helpers as test

from service.client import APIError
from stackml_dashboard import api
from stackml_dashboard.tests.helpers import TestCase

MODELS = reverse("horizon:machine_learning:models:index")
ENDPOINTS = reverse("horizon:machine_learning:endpoints:index")


def url(name: str, *args: str) -> str:
    return reverse(f"horizon:machine_learning:{name}", args=list(args))


def model(name: str = "demo", **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": "mdl-1",
        "name": name,
        "project_id": "p1",
        "description": "a regression",
        "created_by": "u",
        "created_at": "2026-12-05T08:00:00.000000Z",
        "versions": 2,
        "latest_version": 2,
        "labels": {"default": 1, "canary": 2},
        "endpoint": None,
    }
    data.update(extra)
    return data


def endpoint(**extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": "ep-1",
        "model": "demo",
        "project_id": "p1",
        "name": "default",
        "state": "READY",
        "label": "default",
        "version": None,
        "target_version": 1,
        "serving_version": 1,
        "traffic": {"1": 90, "2": 10},
        "replicas": 2,
        "flavor": "m1.small",
        "failure_message": None,
        "servers": [
            {
                "name": "r0",
                "version": 1,
                "replica_state": "ready",
                "state": "active",
                "address": "http://127.0.0.1:9000",
                "health_failures": 0,
                "last_error": None,
                "last_health_at": "t",
            },
            {
                "name": "r1",
                "version": 2,
                "replica_state": "loading",
                "state": "active",
                "address": None,
                "health_failures": 1,
                "last_error": "model loading",
                "last_health_at": "t",
            },
        ],
    }
    data.update(extra)
    return data


class ModelTests(TestCase):
    @test.create_mocks({api: ["model_list"]})
    def test_list(self) -> None:
        self.mock_model_list.return_value = [model()]
        res = self.client.get(MODELS)
        self.assertContains(res, "canary→2, default→1")
        self.assertContains(res, url("models:detail", "demo"))

    @test.create_mocks({api: ["model_get", "version_list", "model_history"]})
    def test_detail_versions_labels_history(self) -> None:
        self.mock_model_get.return_value = model(
            endpoint={"id": "ep-1", "state": "READY", "serving_version": 1, "replicas": 2}
        )
        self.mock_version_list.return_value = [
            {
                "version": 1,
                "state": "READY",
                "labels": ["default"],
                "source_job_id": "job-1",
                "metrics": {"loss": 0.125},
                "created_at": "t",
                "failure_message": None,
            },
            {
                "version": 2,
                "state": "FAILED",
                "labels": [],
                "source_job_id": None,
                "metrics": {},
                "created_at": "t",
                "failure_message": "no saved_model.pb at the top of the artifact",
            },
        ]
        self.mock_model_history.return_value = [
            {
                "label": "default",
                "from_version": None,
                "to_version": 1,
                "at": "t1",
                "by": "system",
                "why": "first READY version",
            },
        ]
        res = self.client.get(url("models:detail", "demo"))
        self.assertContains(res, "loss=0.125")
        self.assertContains(res, "no saved_model.pb at the top of the artifact")
        self.assertContains(res, "first READY version")
        self.assertContains(res, url("endpoints:detail", "demo", "ep-1"))

    @test.create_mocks({api: ["model_get", "version_list", "model_history", "model_list"]})
    def test_another_projects_model_is_not_found(self) -> None:
        self.mock_model_get.side_effect = APIError(404, "not_found", "no model named x")
        self.mock_model_list.return_value = []
        res = self.client.get(url("models:detail", "x"), follow=True)
        self.assertContains(res, "no model named x [not_found, HTTP 404]")

    @test.create_mocks({api: ["model_create"]})
    def test_create(self) -> None:
        self.mock_model_create.return_value = model("new")
        res = self.client.post(url("models:create"), {"name": "new", "description": "d"})
        self.assertNoFormErrors(res)
        self.assertRedirectsNoFollow(res, MODELS)
        self.mock_model_create.assert_called_once_with(test.IsHttpRequest(), "new", "d")

    @test.create_mocks({api: ["version_create"]})
    def test_register_from_a_job(self) -> None:
        self.mock_version_create.return_value = {"model": "demo", "version": 3}
        res = self.client.post(url("models:register", "demo"), {"job_id": "job-9"})
        self.assertRedirectsNoFollow(res, url("models:detail", "demo"))
        self.mock_version_create.assert_called_once_with(test.IsHttpRequest(), "demo", "job-9")

    @test.create_mocks({api: ["label_set"]})
    def test_move_a_label_refused(self) -> None:
        self.mock_label_set.side_effect = APIError(
            409, "version_not_ready", "version 2 of demo is FAILED, not READY"
        )
        res = self.client.post(
            url("models:label", "demo"), {"label": "default", "version": "2", "why": "try"}
        )
        self.assertEqual(res.status_code, 200)  # the form again, with the API's sentence
        self.assertContains(res, "version 2 of demo is FAILED, not READY")
        self.mock_label_set.assert_called_once_with(
            test.IsHttpRequest(), "demo", "default", 2, "try"
        )

    @test.create_mocks({api: ["deploy"]})
    def test_deploy(self) -> None:
        self.mock_deploy.return_value = endpoint(state="CREATING")
        res = self.client.post(url("models:deploy", "demo"), {"label": "canary", "replicas": "2"})
        self.assertRedirectsNoFollow(res, url("models:detail", "demo"))
        self.mock_deploy.assert_called_once_with(
            test.IsHttpRequest(), "demo", label="canary", replicas=2
        )

    @test.create_mocks({api: ["deploy"]})
    def test_deploy_label_or_version(self) -> None:
        res = self.client.post(
            url("models:deploy", "demo"), {"label": "canary", "version": "2", "replicas": "1"}
        )
        self.assertFormErrors(res, 1)
        self.mock_deploy.assert_not_called()

    @test.create_mocks({api: ["predict"]})
    def test_predict_shows_the_answer(self) -> None:
        self.mock_predict.return_value = (
            {"predictions": [[0.5]]},
            {"version": "1", "request_id": "req-7"},
        )
        res = self.client.post(url("models:predict", "demo"), {"instances": "[[1, 2]]"})
        self.assertContains(res, '<span id="ml-served-by">1</span>')
        self.assertContains(res, "&quot;predictions&quot;")
        self.mock_predict.assert_called_once_with(
            test.IsHttpRequest(), "demo", {"instances": [[1, 2]]}, version=None, label=None
        )

    @test.create_mocks({api: ["predict"]})
    def test_predict_without_an_endpoint(self) -> None:
        self.mock_predict.side_effect = APIError(404, "no_endpoint", "demo has no endpoint")
        res = self.client.post(url("models:predict", "demo"), {"instances": "[[1, 2]]"})
        self.assertContains(res, "demo has no endpoint [no_endpoint, HTTP 404]")
        self.assertNotContains(res, "ml-predict-answer")


class EndpointTests(TestCase):
    @test.create_mocks({api: ["endpoint_list"]})
    def test_list_replicas_and_traffic(self) -> None:
        self.mock_endpoint_list.return_value = [endpoint()]
        res = self.client.get(ENDPOINTS)
        (row,) = res.context["endpoints_table"].data
        self.assertEqual((row.replicas, row.traffic), ("1/2", "v1: 90%, v2: 10%"))
        self.assertContains(res, url("endpoints:detail", "demo", "ep-1"))

    @test.create_mocks({api: ["endpoint_get"]})
    def test_detail_health(self) -> None:
        self.mock_endpoint_get.return_value = endpoint()
        res = self.client.get(url("endpoints:detail", "demo", "ep-1"))
        self.assertContains(res, "model loading")
        self.assertContains(res, "http://127.0.0.1:9000")
        self.assertContains(res, url("endpoints:scale", "demo", "ep-1"))

    @test.create_mocks({api: ["endpoint_scale"]})
    def test_scale(self) -> None:
        self.mock_endpoint_scale.side_effect = APIError(
            409, "quota_exceeded", "3 replicas would use 5 servers of 4"
        )
        res = self.client.post(url("endpoints:scale", "demo", "ep-1"), {"replicas": "3"})
        self.assertRedirectsNoFollow(res, url("endpoints:detail", "demo", "ep-1"))
        self.mock_endpoint_scale.assert_called_once_with(test.IsHttpRequest(), "demo", "ep-1", 3)
        self.assertMessageCount(error=1)

    @test.create_mocks({api: ["endpoint_scale"]})
    def test_scale_needs_a_number(self) -> None:
        res = self.client.post(url("endpoints:scale", "demo", "ep-1"), {"replicas": "many"})
        self.assertRedirectsNoFollow(res, url("endpoints:detail", "demo", "ep-1"))
        self.mock_endpoint_scale.assert_not_called()

    @test.create_mocks({api: ["endpoint_delete"]})
    def test_delete(self) -> None:
        self.mock_endpoint_delete.return_value = endpoint(state="DELETING")
        res = self.client.post(url("endpoints:delete", "demo", "ep-1"))
        self.assertRedirectsNoFollow(res, ENDPOINTS)
        self.mock_endpoint_delete.assert_called_once_with(test.IsHttpRequest(), "demo", "ep-1")
