"""The Quotas and Usage panel against a mocked API layer."""

from __future__ import annotations

from django.urls import reverse
from openstack_dashboard.test import helpers as test

from service.client import APIError
from stackml_dashboard import api
from stackml_dashboard.tests.helpers import TestCase

INDEX = reverse("horizon:machine_learning:quotas:index")
QUOTA = {
    "project_id": "p1",
    "limits": {"jobs": 4, "servers": 8, "gpus": 2},
    "in_use": {"jobs": 1, "servers": 2, "gpus": 1},
    "queued": 3,
    "defaults": {"jobs": 4, "servers": 8, "gpus": 2},
    "overrides": {},
}
USAGE = {
    "project_id": "p1",
    "since": "2026-11-05T00:00:00.000000Z",
    "until": "2026-12-05T00:00:00.000000Z",
    "totals": {"vm_seconds": 7200.0, "gpu_hours": 1.5, "cost": 3.25, "jobs": 1},
    "projects": [],
    "jobs": [
        {
            "id": "job-1",
            "name": "train",
            "project_id": "p1",
            "state": "SUCCEEDED",
            "vm_seconds": 5400.0,
            "gpu_hours": 1.5,
            "cost": 3.0,
        },
    ],
    "endpoints": [
        {
            "id": "ep-1",
            "name": "demo/default",
            "project_id": "p1",
            "state": "READY",
            "vm_seconds": 1800.0,
            "gpu_hours": 0.0,
            "cost": 0.25,
        },
    ],
}


class QuotaPanelTests(TestCase):
    @test.create_mocks({api: ["quotas", "usage"]})
    def test_quota_and_usage_of_the_project(self) -> None:
        self.mock_quotas.return_value = QUOTA
        self.mock_usage.return_value = USAGE
        res = self.client.get(INDEX)
        self.assertTemplateUsed(res, "machine_learning/quotas/index.html")
        rows = {r["key"]: r for r in res.context["quota_rows"]}
        self.assertEqual((rows["gpus"]["used"], rows["gpus"]["limit"]), (1, 2))
        self.assertEqual(rows["gpus"]["percent"], 50)
        self.assertContains(res, "3 job(s) queued.")
        self.assertContains(res, "<dd>1.5</dd>")  # GPU-hours in the window
        self.assertContains(res, "<dd>3.25</dd>")  # cost
        jobs = res.context["job_usage_table"].data
        self.assertEqual([(r.id, r.vm_hours, r.gpu_hours) for r in jobs], [("job-1", 1.5, 1.5)])
        self.assertEqual(
            [r.name for r in res.context["endpoint_usage_table"].data], ["demo/default"]
        )
        self.mock_usage.assert_called_once_with(
            test.IsHttpRequest(), since=None, until=None, all_projects=False
        )
        self.assertNotContains(res, 'id="project_usage"')

    @test.create_mocks({api: ["quotas", "usage"]})
    def test_a_bad_window_is_the_apis_message(self) -> None:
        self.mock_quotas.return_value = QUOTA
        self.mock_usage.side_effect = APIError(
            400, "invalid_request", "since must be an ISO 8601 time, e.g. 2026-11-01T00:00:00Z"
        )
        res = self.client.get(INDEX + "?since=yesterday")
        self.assertEqual(res.status_code, 200)
        self.assertContains(res, "since must be an ISO 8601 time")
        self.assertEqual(len(res.context["job_usage_table"].data), 0)
        self.mock_usage.assert_called_once_with(
            test.IsHttpRequest(), since="yesterday", until=None, all_projects=False
        )

    @test.create_mocks({api: ["quotas", "usage"]})
    def test_every_projects_usage_for_an_admin(self) -> None:
        self.mock_quotas.return_value = QUOTA
        self.mock_usage.return_value = dict(
            USAGE,
            projects=[
                {
                    "project_id": "p1",
                    "vm_seconds": 7200.0,
                    "gpu_hours": 1.5,
                    "cost": 3.25,
                    "jobs": 1,
                },
                {
                    "project_id": "p2",
                    "vm_seconds": 3600.0,
                    "gpu_hours": 4.0,
                    "cost": 9.0,
                    "jobs": 2,
                },
            ],
        )
        res = self.client.get(INDEX + "?all_projects=1")
        rows = res.context["project_usage_table"].data
        self.assertEqual(
            [(r.project_id, r.jobs, r.gpu_hours, r.cost) for r in rows],
            [("p1", 1, 1.5, 3.25), ("p2", 2, 4.0, 9.0)],
        )
        self.assertContains(res, 'id="project_usage"')
        self.mock_usage.assert_called_once_with(
            test.IsHttpRequest(), since=None, until=None, all_projects=True
        )

    @test.create_mocks({api: ["quotas", "usage"]})
    def test_a_member_asking_for_all_projects_gets_the_apis_refusal(self) -> None:
        self.mock_quotas.return_value = QUOTA
        self.mock_usage.side_effect = APIError(
            403, "forbidden", "all_projects=true needs the admin role"
        )
        res = self.client.get(INDEX + "?all_projects=1")
        self.assertContains(res, "all_projects=true needs the admin role [forbidden, HTTP 403]")
