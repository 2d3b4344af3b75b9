"""The plugin's test base: Horizon's TestCase with stackml's API in the service catalog."""

from __future__ import annotations

from typing import Any

from openstack_dashboard.test import helpers as test

ML_URL = "http://ml.example.com:8080"
ML_SERVICE = {
    "type": "machine-learning",
    "name": "stackml",
    "endpoints_links": [],
    "endpoints": [
        {"region": "RegionOne", "interface": "public", "url": ML_URL},
        {"region": "RegionOne", "interface": "internal", "url": ML_URL},
        {"region": "RegionOne", "interface": "admin", "url": ML_URL},
    ],
}


class TestCase(test.TestCase):
    def _setup_test_data(self) -> None:
        super()._setup_test_data()
        self.service_catalog.append(dict(ML_SERVICE))


def job(job_id: str = "job-1", state: str = "RUNNING", **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": job_id,
        "name": f"name-{job_id}",
        "project_id": "p1",
        "type": "training",
        "state": state,
        "failure": None,
        "spec": {
            "trainer": {
                "package_uri": "swift://stackml/p/staging/x/pkg.tar.gz",
                "module": "trainer.task",
            },
            "resources": {"flavor": "m1.small"},
        },
        "created_at": "2026-12-05T08:00:00.000000Z",
        "started_at": None,
        "finished_at": None,
        "resources": [],
        "output": {"model_uri": f"swift://stackml/p/models/{job_id}/"},
        "metrics": {"loss": 0.25},
        "cancel_requested": False,
        "usage": {"vm_seconds": 12.0, "gpu_hours": 0.0, "cost": 0.01},
    }
    data.update(extra)
    return data
