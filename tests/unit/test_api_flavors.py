"""GET /v1/flavors: the sandbox catalogue as configured, GPU filters and ordering against a fake
backend, and a backend outage as 503."""

from __future__ import annotations

import pytest

from service.api.openapi import document
from service.backends import registry
from service.backends.interfaces import (
    ComputeBackend,
    Flavor,
    ServerRef,
    ServerSpec,
    ServerStatus,
)
from service.config import Settings
from service.domain.errors import BackendError

FIELDS = {"name", "vcpus", "ram_mb", "disk_gb", "gpus", "gpu_type", "price_per_hour"}


class FakeCompute(ComputeBackend):
    """A cloud's flavor list, or an outage; it boots nothing."""

    name = "fake"

    def __init__(self, flavors: list[Flavor], error: BackendError | None = None) -> None:
        self._flavors = flavors
        self.error = error
        self.asked_with: list[Settings | None] = []  # the settings registry.compute() was given

    def flavors(self) -> list[Flavor]:
        if self.error is not None:
            raise self.error
        return self._flavors

    def create_server(self, spec: ServerSpec) -> ServerRef:
        raise NotImplementedError

    def get_server(self, server_id: str) -> ServerStatus:
        raise NotImplementedError

    def delete_server(self, server_id: str) -> None:
        raise NotImplementedError

    def list_servers(self, tag: tuple[str, str] | None = None) -> list[ServerRef]:
        return []

    def console_log(self, server_id: str, tail_bytes: int = 8192) -> str:
        return ""


CLOUD = [
    Flavor("g1.a100x2", 24, 196608, 200, gpus=2, gpu_type="A100", price_per_hour=6.0),
    Flavor("m1.large", 8, 16384, 80, price_per_hour=0.4),
    Flavor("g1.v100x1", 8, 65536, 100, gpus=1, gpu_type="V100", price_per_hour=1.5),
    Flavor("g1.a100x1", 12, 98304, 100, gpus=1, gpu_type="A100", price_per_hour=3.0),
    Flavor("m1.small", 2, 4096, 20, price_per_hour=0.1),
    Flavor("g1.a100x1-b", 12, 98304, 100, gpus=1, gpu_type="A100", price_per_hour=3.0),
]


@pytest.fixture
def cloud(monkeypatch: pytest.MonkeyPatch) -> FakeCompute:
    fake = FakeCompute(list(CLOUD))

    def compute(settings: Settings | None = None) -> ComputeBackend:
        fake.asked_with.append(settings)
        return fake

    monkeypatch.setattr(registry, "compute", compute)
    return fake


def names(resp) -> list[str]:
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return [f["name"] for f in resp.get_json()["flavors"]]


def test_sandbox_catalogue_is_the_configured_one(client, settings):
    resp = client.get("/v1/flavors")
    assert resp.status_code == 200
    body = resp.get_json()
    assert set(body) == {"flavors"}
    configured = sorted(settings.flavors(), key=lambda f: (f.gpus, f.price_per_hour, f.name))
    assert configured, "config/flavors.yaml lists no flavors"
    assert [f["name"] for f in body["flavors"]] == [f.name for f in configured]
    for got, want in zip(body["flavors"], configured, strict=True):
        assert set(got) == FIELDS  # pids and other internals stay private
        assert got == {
            "name": want.name,
            "vcpus": want.vcpus,
            "ram_mb": want.ram_mb,
            "disk_gb": want.disk_gb,
            "gpus": 0,
            "gpu_type": None,
            "price_per_hour": want.price_per_hour,
        }
    assert resp.headers["X-Request-Id"]


def test_sandbox_has_no_gpu_flavors(client):
    assert names(client.get("/v1/flavors?gpus=1")) == []
    assert names(client.get("/v1/flavors?gpu_type=A100")) == []
    assert len(names(client.get("/v1/flavors?gpus=0"))) == len(names(client.get("/v1/flavors")))


def test_asks_the_configured_backend(client, cloud, settings):
    client.get("/v1/flavors")
    assert cloud.asked_with == [settings]


def test_sorted_by_gpus_then_price_then_name(client, cloud):
    assert names(client.get("/v1/flavors")) == [
        "m1.small",
        "m1.large",
        "g1.v100x1",
        "g1.a100x1",
        "g1.a100x1-b",
        "g1.a100x2",
    ]
    # the backend's own list is left as it was
    assert [f.name for f in cloud.flavors()] == [f.name for f in CLOUD]


def test_gpu_fields(client, cloud):
    flavors = {f["name"]: f for f in client.get("/v1/flavors").get_json()["flavors"]}
    assert flavors["g1.a100x2"] == {
        "name": "g1.a100x2",
        "vcpus": 24,
        "ram_mb": 196608,
        "disk_gb": 200,
        "gpus": 2,
        "gpu_type": "A100",
        "price_per_hour": 6.0,
    }
    assert flavors["m1.small"]["gpus"] == 0 and flavors["m1.small"]["gpu_type"] is None


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("gpus=1", ["g1.v100x1", "g1.a100x1", "g1.a100x1-b"]),
        ("gpus=2", ["g1.a100x2"]),
        ("gpus=0", ["m1.small", "m1.large"]),
        ("gpus=8", []),
        ("gpu_type=A100", ["g1.a100x1", "g1.a100x1-b", "g1.a100x2"]),
        ("gpu_type=a100", ["g1.a100x1", "g1.a100x1-b", "g1.a100x2"]),
        ("gpu_type=H100", []),
        ("gpus=1&gpu_type=V100", ["g1.v100x1"]),
        ("gpus=2&gpu_type=V100", []),
        (
            "gpus=&gpu_type=",
            ["m1.small", "m1.large", "g1.v100x1", "g1.a100x1", "g1.a100x1-b", "g1.a100x2"],
        ),
    ],
)
def test_filters(client, cloud, query, expected):
    assert names(client.get(f"/v1/flavors?{query}")) == expected


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("gpus=two", "gpus"),
        ("gpus=1.5", "gpus"),
        ("gpus=-1", "gpus"),
        ("gpus=100000", "gpus"),
        ("gpu_type=A100%0A", "gpu_type"),
        ("gpu_type=-x", "gpu_type"),
        ("gpu_type=a%20b", "gpu_type"),
        ("gpu_type=" + "x" * 65, "gpu_type"),
    ],
)
def test_bad_filters_are_400(client, cloud, error_of, query, parameter):
    err = error_of(client.get(f"/v1/flavors?{query}"), 400, "invalid_request")
    assert err["details"]["parameter"] == parameter
    assert parameter in err["message"]


def test_backend_outage_is_503_with_retry_after(client, cloud, error_of):
    cloud.error = BackendError("Nova answered 503", reason="compute_unavailable")
    resp = client.get("/v1/flavors")
    err = error_of(resp, 503, "backend_unavailable")
    assert "Nova answered 503" in err["message"]
    assert err["details"] == {"backend": "sandbox", "reason": "compute_unavailable"}
    assert int(resp.headers["Retry-After"]) > 0


def test_documented_response_matches(client, cloud):
    doc = document()
    op = doc["paths"]["/v1/flavors"]["get"]
    assert {p["name"] for p in op["parameters"]} == {"gpus", "gpu_type"}
    assert {"200", "400", "503", "500"} <= set(op["responses"])
    schema = doc["components"]["schemas"]["Flavor"]
    assert set(schema["properties"]) == FIELDS
    for f in client.get("/v1/flavors").get_json()["flavors"]:
        assert set(f) == set(schema["properties"])
