"""The Jobs panel against a mocked API layer (stackml_dashboard.api), with Horizon's helpers."""

from __future__ import annotations

from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse
from openstack_dashboard.test import helpers as test

from service.client import APIError, APIUnavailable
from stackml_dashboard import api
from stackml_dashboard.tests.helpers import ML_URL, TestCase, job

INDEX = reverse("horizon:machine_learning:jobs:index")
SUBMIT = reverse("horizon:machine_learning:jobs:submit")


def detail(job_id: str) -> str:
    return reverse("horizon:machine_learning:jobs:detail", args=[job_id])


def not_found(job_id: str) -> APIError:
    return APIError(404, "not_found", f"no job {job_id}", request_id="req-1")


class ApiLayerTests(TestCase):
    def test_client_uses_the_catalog_endpoint_and_the_users_token(self) -> None:
        c = api.client(self.request)
        self.assertEqual(c.base_url, ML_URL)
        self.assertEqual(c._token, self.request.user.token.id)
        self.assertNotIn(c._token, repr(c))


class JobsIndexTests(TestCase):
    @test.create_mocks({api: ["job_list"]})
    def test_lists_the_projects_jobs(self) -> None:
        self.mock_job_list.return_value = (
            [job("job-1", "RUNNING"), job("job-2", "SUCCEEDED")],
            None,
        )
        res = self.client.get(INDEX)
        self.assertTemplateUsed(res, "machine_learning/jobs/index.html")
        rows = res.context["jobs_table"].data
        self.assertEqual([r.id for r in rows], ["job-1", "job-2"])
        self.assertContains(res, detail("job-1"))
        self.assertContains(res, "loss=0.25")
        self.mock_job_list.assert_called_once_with(
            test.IsHttpRequest(), state=None, limit=50, marker=None
        )

    @test.create_mocks({api: ["job_list"]})
    def test_state_filter_goes_to_the_api(self) -> None:
        self.mock_job_list.return_value = ([job("job-3", "FAILED")], None)
        res = self.client.post(
            INDEX, {"jobs__filter__q_field": "state", "jobs__filter__q": "failed"}
        )
        self.assertRedirectsNoFollow(res, INDEX)  # a new filter: back to the first page
        res = self.client.get(INDEX)  # the filter is kept in the session
        self.assertEqual([r.id for r in res.context["jobs_table"].data], ["job-3"])
        self.mock_job_list.assert_called_with(
            test.IsHttpRequest(), state="FAILED", limit=50, marker=None
        )

    @test.create_mocks({api: ["job_list"]})
    def test_next_page_follows_the_marker(self) -> None:
        self.mock_job_list.return_value = ([job("job-9")], "job-9")
        res = self.client.get(INDEX + "?marker=job-10")
        self.assertContains(res, "marker=job-9")
        self.mock_job_list.assert_called_once_with(
            test.IsHttpRequest(), state=None, limit=50, marker="job-10"
        )

    @test.create_mocks({api: ["job_list"]})
    def test_api_error_is_a_message_with_the_apis_sentence(self) -> None:
        self.mock_job_list.side_effect = APIUnavailable(
            "cannot reach the stackml API at http://ml (connection refused)"
        )
        res = self.client.get(INDEX)
        self.assertEqual(res.status_code, 200)
        self.assertEqual(len(res.context["jobs_table"].data), 0)
        self.assertMessageCount(res, error=1)
        self.assertContains(res, "cannot reach the stackml API")

    @test.create_mocks({api: ["job_list", "job_cancel"]})
    def test_cancel_row_action(self) -> None:
        self.mock_job_list.return_value = ([job("job-1", "RUNNING")], None)
        self.mock_job_cancel.return_value = job("job-1", "CANCELLING")
        res = self.client.post(INDEX, {"action": "jobs__cancel__job-1"})
        self.assertRedirectsNoFollow(res, INDEX)
        self.mock_job_cancel.assert_called_once_with(test.IsHttpRequest(), "job-1")

    @test.create_mocks({api: ["job_list", "job_delete"]})
    def test_delete_refused_shows_why(self) -> None:
        self.mock_job_list.return_value = ([job("job-1", "FAILED")], None)
        self.mock_job_delete.side_effect = APIError(
            409, "teardown_pending", "job-1 still has servers being deleted"
        )
        res = self.client.post(INDEX, {"action": "jobs__delete__job-1"}, follow=True)
        self.mock_job_delete.assert_called_once_with(test.IsHttpRequest(), "job-1")
        self.assertContains(res, "job-1 still has servers being deleted")


class JobDetailTests(TestCase):
    @test.create_mocks({api: ["job_get", "job_events", "job_metrics"]})
    def test_timeline_and_metric_charts(self) -> None:
        self.mock_job_get.return_value = job("job-1", "SUCCEEDED")
        self.mock_job_events.return_value = [
            {"at": "t1", "kind": "transition", "from": None, "to": "QUEUED", "message": ""},
            {"at": "t2", "kind": "transition", "from": "QUEUED", "to": "RUNNING", "message": ""},
            {"at": "t3", "kind": "provision", "from": None, "to": None, "message": "ssh ok"},
        ]
        self.mock_job_metrics.return_value = {
            "loss": [
                {"value": 0.9, "step": None, "epoch": 1, "at": "t"},
                {"value": 0.4, "step": None, "epoch": 2, "at": "t"},
            ],
            "<b>acc</b>": [{"value": 0.5, "step": 3, "epoch": None, "at": "t"}],
        }
        res = self.client.get(detail("job-1"))
        self.assertTemplateUsed(res, "machine_learning/jobs/detail.html")
        self.assertContains(res, "QUEUED → RUNNING")
        self.assertContains(res, "ssh ok")
        self.assertContains(res, 'class="stackml-chart" data-metric="loss"')
        self.assertContains(res, "<polyline", count=2)
        self.assertContains(res, "&lt;b&gt;acc&lt;/b&gt;")
        self.assertNotContains(res, "<b>acc</b>")
        self.assertContains(res, reverse("horizon:machine_learning:jobs:delete", args=["job-1"]))
        self.assertNotContains(res, 'id="job-cancel"')
        log_url = reverse("horizon:machine_learning:jobs:log", args=["job-1"])
        self.assertContains(res, f'data-log-url="{log_url}"')  # the page's log tail polls it

    @test.create_mocks({api: ["job_get", "job_events", "job_metrics"]})
    def test_a_tuning_job_lists_its_trials_and_a_trial_links_back(self) -> None:
        trials = [
            {
                "trial": 1,
                "job_id": "job-t1",
                "state": "SUCCEEDED",
                "value": 0.5,
                "hyperparameters": {"lr": 0.1},
            },
            {
                "trial": 2,
                "job_id": "job-t2",
                "state": "STOPPED",
                "value": 2.25,
                "hyperparameters": {"lr": 1.0},
            },
        ]
        tuning = {
            "metric": "loss",
            "goal": "minimize",
            "max_trials": 6,
            "trials": trials,
            "best_trial": {"trial": 1, "job_id": "job-t1", "value": 0.5},
        }
        self.mock_job_get.return_value = job("job-1", "RUNNING", tuning=tuning)
        self.mock_job_events.return_value = []
        self.mock_job_metrics.return_value = {}
        res = self.client.get(detail("job-1"))
        self.assertContains(res, 'id="job-trials"')
        self.assertContains(res, "loss (minimize), 2 of 6")
        self.assertContains(res, '<tr class="success">', count=1)
        self.assertContains(res, "1 (best)")
        self.assertContains(res, "lr=1.0")
        self.assertContains(res, "STOPPED")
        self.assertContains(res, detail("job-t2"))
        self.mock_job_get.return_value = job("job-t2", "CANCELLED", parent_id="job-1", trial=2)
        res = self.client.get(detail("job-t2"))
        self.assertContains(res, 'id="job-trial"')
        self.assertContains(res, f'<a href="{detail("job-1")}">job-1</a>')
        self.assertNotContains(res, 'id="job-trials"')

    @test.create_mocks({api: ["job_get", "job_events", "job_metrics", "job_list"]})
    def test_another_projects_job_is_not_found(self) -> None:
        self.mock_job_get.side_effect = not_found("job-x")
        res = self.client.get(detail("job-x"))
        self.assertRedirectsNoFollow(res, INDEX)
        self.assertMessageCount(error=1)
        self.mock_job_events.assert_not_called()
        self.mock_job_list.return_value = ([], None)
        res = self.client.get(detail("job-x"), follow=True)
        # the API's sentence is the message itself, not behind Horizon's "Details" toggle
        self.assertContains(
            res, "Unable to show job job-x: no job job-x [not_found, HTTP 404, request req-1]"
        )

    @test.create_mocks({api: ["job_cancel"]})
    def test_cancel_button(self) -> None:
        self.mock_job_cancel.return_value = job("job-1", "CANCELLING")
        res = self.client.post(reverse("horizon:machine_learning:jobs:cancel", args=["job-1"]))
        self.assertRedirectsNoFollow(res, detail("job-1"))
        self.mock_job_cancel.assert_called_once_with(test.IsHttpRequest(), "job-1")

    @test.create_mocks({api: ["job_cancel", "job_get", "job_events", "job_metrics"]})
    def test_cancel_of_a_finished_job_says_why(self) -> None:
        self.mock_job_cancel.side_effect = APIError(409, "job_terminal", "job-1 is SUCCEEDED")
        self.mock_job_get.return_value = job("job-1", "SUCCEEDED")
        self.mock_job_events.return_value = []
        self.mock_job_metrics.return_value = {}
        res = self.client.post(
            reverse("horizon:machine_learning:jobs:cancel", args=["job-1"]), follow=True
        )
        self.assertContains(res, "job-1 is SUCCEEDED [job_terminal, HTTP 409]")

    @test.create_mocks({api: ["job_delete"]})
    def test_delete_button(self) -> None:
        res = self.client.post(reverse("horizon:machine_learning:jobs:delete", args=["job-1"]))
        self.assertRedirectsNoFollow(res, INDEX)
        self.mock_job_delete.assert_called_once_with(test.IsHttpRequest(), "job-1")

    @test.create_mocks({api: ["job_logs", "job_get"]})
    def test_log_tail(self) -> None:
        self.mock_job_logs.return_value = (b"epoch 1\nepoch 2\n", 16)
        self.mock_job_get.return_value = job("job-1", "RUNNING")
        url = reverse("horizon:machine_learning:jobs:log", args=["job-1"])
        res = self.client.get(url + "?offset=0")
        self.assertEqual(
            res.json(), {"text": "epoch 1\nepoch 2\n", "next_offset": 16, "state": "RUNNING"}
        )
        self.mock_job_logs.assert_called_once_with(test.IsHttpRequest(), "job-1", 0)

    @test.create_mocks({api: ["job_logs", "job_get"]})
    def test_log_of_an_unknown_job(self) -> None:
        self.mock_job_logs.side_effect = not_found("job-x")
        url = reverse("horizon:machine_learning:jobs:log", args=["job-x"])
        res = self.client.get(url)
        self.assertEqual(res.status_code, 404)
        self.assertIn("no job job-x", res.json()["error"])
        res = self.client.get(url + "?offset=abc")
        self.assertEqual(res.status_code, 400)


class SubmitTests(TestCase):
    def _form(self, **over: object) -> dict[str, object]:
        data: dict[str, object] = {
            "name": "keras-1",
            "package": SimpleUploadedFile("pkg.tar.gz", b"\x1f\x8b fake", "application/gzip"),
            "module": "trainer.task",
            "args": "--data 'a b'",
            "flavor": "m1.small",
            "hyperparameters": '{"epochs": 2}',
            "labels": "team=ml\n",
            "max_runtime_seconds": "600",
            "register_as": "keras",
        }
        data.update(over)
        return data

    @test.create_mocks({api: ["package_upload", "job_create"]})
    def test_stages_the_package_then_creates_the_job(self) -> None:
        self.mock_package_upload.return_value = {"package_uri": "swift://s/p/staging/ab/pkg.tar.gz"}
        self.mock_job_create.return_value = job("job-7", "QUEUED", name="keras-1")
        res = self.client.post(SUBMIT, self._form())
        self.assertNoFormErrors(res)
        self.assertRedirectsNoFollow(res, detail("job-7"))
        (req, fh, filename), _ = self.mock_package_upload.call_args
        self.assertEqual(filename, "pkg.tar.gz")
        self.mock_job_create.assert_called_once_with(
            test.IsHttpRequest(),
            {
                "name": "keras-1",
                "trainer": {
                    "package_uri": "swift://s/p/staging/ab/pkg.tar.gz",
                    "module": "trainer.task",
                    "args": ["--data", "a b"],
                },
                "resources": {"flavor": "m1.small"},
                "hyperparameters": {"epochs": 2},
                "labels": {"team": "ml"},
                "output": {"register_as": "keras"},
                "max_runtime_seconds": 600,
            },
        )

    @test.create_mocks({api: ["package_upload", "job_create"]})
    def test_bad_fields_are_form_errors_and_call_nothing(self) -> None:
        res = self.client.post(
            SUBMIT,
            self._form(
                name="-bad",
                package=SimpleUploadedFile("pkg.zip", b"PK", "application/zip"),
                hyperparameters="[1]",
                labels="nokey",
                register_as="Not A Model",
            ),
        )
        self.assertFormErrors(res, 5)
        self.mock_package_upload.assert_not_called()
        self.mock_job_create.assert_not_called()

    @test.create_mocks({api: ["package_upload", "job_create"]})
    def test_a_refused_spec_shows_the_apis_sentence(self) -> None:
        self.mock_package_upload.return_value = {"package_uri": "swift://s/p/staging/ab/p.tar.gz"}
        self.mock_job_create.side_effect = APIError(
            422,
            "validation_failed",
            "1 field is invalid: resources.flavor: unknown flavor 'm9.huge'",
        )
        res = self.client.post(SUBMIT, self._form(flavor="m9.huge"), follow=True)
        self.assertContains(res, "unknown flavor &#x27;m9.huge&#x27;")

    @test.create_mocks({api: ["package_upload", "job_create"]})
    def test_an_invalid_package_is_not_submitted(self) -> None:
        self.mock_package_upload.side_effect = APIError(
            422, "invalid_package", "the package is not a gzip'd tar"
        )
        res = self.client.post(SUBMIT, self._form(), follow=True)
        self.assertContains(res, "invalid_package")
        self.mock_job_create.assert_not_called()


class PluginTests(test.TestCase):  # Horizon's own test catalog: no machine-learning service
    def test_the_plugin_adds_its_dashboard_and_keeps_horizons(self) -> None:
        import horizon

        slugs = [d.slug for d in horizon.get_dashboards()]
        self.assertIn("project", slugs)
        self.assertIn("identity", slugs)
        self.assertIn("machine_learning", slugs)
        self.assertEqual(horizon.get_default_dashboard().slug, "project")

    @test.create_mocks({api: ["job_list"]})
    def test_no_machine_learning_service_no_panel(self) -> None:
        res = self.client.get(INDEX)
        self.assertNotEqual(res.status_code, 200)
        self.mock_job_list.assert_not_called()
