"""The Schedules panel against a mocked API layer."""

from __future__ import annotations

import json
from typing import Any

from django.urls import reverse
from openstack_dashboard.test import helpers as test

from service.client import APIError
from stackml_dashboard import api
from stackml_dashboard.tests.helpers import TestCase, job

INDEX = reverse("horizon:machine_learning:schedules:index")
CREATE = reverse("horizon:machine_learning:schedules:create")
SPEC = {"name": "nightly", "trainer": {"package_uri": "swift://s/p/pkg.tar.gz", "module": "t"}}


def schedule(sid: str = "sch-1", paused: bool = False, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": sid,
        "project_id": "p1",
        "name": f"name-{sid}",
        "cron": "0 3 * * *",
        "timezone": "Europe/Berlin",
        "concurrency": "Forbid",
        "catchup": "none",
        "max_catchup": 10,
        "paused": paused,
        "next_fire_at": None if paused else "2026-12-06T02:00:00.000000Z",
        "next_fire_times": [] if paused else ["2026-12-06T02:00:00.000000Z"],
        "last_run": {
            "fire_time": "2026-12-05T02:00:00Z",
            "outcome": "started",
            "reason": "",
            "job_id": "job-5",
            "missed": 0,
            "recorded_at": "x",
        },
        "created_by": "u",
        "created_at": "x",
        "updated_at": "x",
    }
    data.update(extra)
    return data


class ScheduleIndexTests(TestCase):
    @test.create_mocks({api: ["schedule_list"]})
    def test_lists_the_projects_schedules(self) -> None:
        self.mock_schedule_list.return_value = [schedule("sch-1"), schedule("sch-2", True)]
        res = self.client.get(INDEX)
        self.assertTemplateUsed(res, "machine_learning/schedules/index.html")
        rows = res.context["schedules_table"].data
        self.assertEqual([(r.id, r.paused) for r in rows], [("sch-1", False), ("sch-2", True)])
        self.assertContains(res, "2026-12-05T02:00:00Z: started")
        # pause only where it runs, resume only where it is paused
        self.assertContains(res, "schedules__pause__sch-1")
        self.assertNotContains(res, "schedules__pause__sch-2")
        self.assertContains(res, "schedules__resume__sch-2")
        self.assertNotContains(res, "schedules__resume__sch-1")

    @test.create_mocks({api: ["schedule_list", "schedule_pause"]})
    def test_pause_and_resume(self) -> None:
        self.mock_schedule_list.return_value = [schedule("sch-1"), schedule("sch-2", True)]
        self.mock_schedule_pause.return_value = {}
        res = self.client.post(INDEX, {"action": "schedules__pause__sch-1"})
        self.assertRedirectsNoFollow(res, INDEX)
        res = self.client.post(INDEX, {"action": "schedules__resume__sch-2"})
        self.assertRedirectsNoFollow(res, INDEX)
        self.assertEqual(
            [c.args[1:] for c in self.mock_schedule_pause.call_args_list],
            [("sch-1", True), ("sch-2", False)],
        )

    @test.create_mocks({api: ["schedule_list", "schedule_delete"]})
    def test_delete(self) -> None:
        self.mock_schedule_list.return_value = [schedule("sch-1")]
        res = self.client.post(INDEX, {"action": "schedules__delete__sch-1"})
        self.assertRedirectsNoFollow(res, INDEX)
        self.mock_schedule_delete.assert_called_once_with(test.IsHttpRequest(), "sch-1")


class ScheduleCreateTests(TestCase):
    def _form(self, **over: Any) -> dict[str, Any]:
        data = {
            "name": "nightly",
            "cron": "@daily",
            "timezone": "UTC",
            "concurrency": "Replace",
            "catchup": "all",
            "max_catchup": "3",
            "job": json.dumps(SPEC),
        }
        data.update(over)
        return data

    @test.create_mocks({api: ["schedule_create"]})
    def test_creates_it(self) -> None:
        self.mock_schedule_create.return_value = schedule("sch-9", name="nightly")
        res = self.client.post(CREATE, self._form())
        self.assertNoFormErrors(res)
        self.assertRedirectsNoFollow(res, INDEX)
        self.mock_schedule_create.assert_called_once_with(
            test.IsHttpRequest(),
            "nightly",
            "@daily",
            SPEC,
            timezone="UTC",
            concurrency="Replace",
            catchup="all",
            max_catchup=3,
            paused=False,
        )

    @test.create_mocks({api: ["schedule_create"]})
    def test_refused_by_the_api_says_why(self) -> None:
        self.mock_schedule_create.side_effect = APIError(
            422, "validation_failed", "1 field is invalid: cron: 0 0 30 2 * never fires"
        )
        res = self.client.post(CREATE, self._form(cron="0 0 30 2 *"), follow=True)
        self.assertContains(res, "0 0 30 2 * never fires")

    @test.create_mocks({api: ["schedule_create"]})
    def test_job_must_be_a_json_object(self) -> None:
        res = self.client.post(CREATE, self._form(job="[1, 2]"))
        self.assertFormErrors(res, 1)
        self.mock_schedule_create.assert_not_called()

    @test.create_mocks({api: ["job_get"]})
    def test_starts_from_a_jobs_spec_without_its_model_uri(self) -> None:
        spec = dict(SPEC, output={"model_uri": "swift://s/p/models/mine/", "register_as": "m"})
        self.mock_job_get.return_value = job("job-1", "SUCCEEDED", spec=spec)
        res = self.client.get(CREATE + "?from_job=job-1")
        initial = json.loads(res.context["form"].initial["job"])
        self.assertEqual(initial["output"], {"register_as": "m"})
        self.assertEqual(initial["trainer"], SPEC["trainer"])


class ScheduleDetailTests(TestCase):
    @test.create_mocks({api: ["schedule_get", "schedule_runs"]})
    def test_detail_with_runs(self) -> None:
        self.mock_schedule_get.return_value = schedule("sch-1", job=SPEC, live_jobs=["job-7"])
        self.mock_schedule_runs.return_value = [
            {
                "fire_time": "2026-12-05T02:00:00Z",
                "outcome": "skipped",
                "reason": "job-7 is still RUNNING",
                "job_id": None,
                "missed": 2,
                "recorded_at": "x",
            }
        ]
        res = self.client.get(reverse("horizon:machine_learning:schedules:detail", args=["sch-1"]))
        self.assertContains(res, "job-7 is still RUNNING (2 missed)")
        self.assertContains(res, reverse("horizon:machine_learning:jobs:detail", args=["job-7"]))
        self.assertContains(res, "&quot;module&quot;: &quot;t&quot;")

    @test.create_mocks({api: ["schedule_get", "schedule_runs"]})
    def test_another_projects_schedule_is_not_found(self) -> None:
        self.mock_schedule_get.side_effect = APIError(404, "not_found", "no schedule sch-x")
        res = self.client.get(reverse("horizon:machine_learning:schedules:detail", args=["sch-x"]))
        self.assertRedirectsNoFollow(res, INDEX)
        self.mock_schedule_runs.assert_not_called()
