"""service/trusts.py without a Keystone: when trusts are used, and that a trust connection
carries the trust and none of the service user's own project scope (Keystone refuses a token
request scoped to both; openstacksdk would otherwise keep clouds.yaml's project)."""

from __future__ import annotations

from pathlib import Path

import pytest

from service import trusts
from service.config import Settings

CLOUDS = """
clouds:
  svc:
    auth:
      auth_url: http://127.0.0.1:5000/v3
      username: stackml
      password: secret
      project_name: service
      project_domain_name: Default
      user_domain_name: Default
    region_name: RegionOne
    interface: public
    identity_api_version: 3
"""


@pytest.mark.parametrize(
    ("auth", "compute", "tenancy", "expected"),
    [
        ("keystone", "openstack", "project", True),
        ("keystone", "openstack", "service", False),
        ("keystone", "sandbox", "project", False),
        ("noauth", "openstack", "project", False),
    ],
)
def test_trusts_only_with_keystone_the_openstack_backend_and_project_tenancy(
    auth: str, compute: str, tenancy: str, expected: bool
) -> None:
    s = Settings(auth=auth, compute=compute, tenancy=tenancy)  # type: ignore[arg-type]
    assert trusts.enabled(s) is expected


def test_trust_connection_is_scoped_by_the_trust_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "clouds.yaml").write_text(CLOUDS)
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(tmp_path / "clouds.yaml"))
    plugin = trusts._region("svc", 7.0, "trust-123").get_auth()
    scope = {k: v for k, v in vars(plugin).items() if "project" in k or "domain_id" in k}
    assert plugin._trust_id == "trust-123"
    assert set(scope.values()) == {None}, scope  # no project scope, not even the string "None"
    assert plugin._username == "stackml" and plugin._user_domain_name == "Default"
    own = trusts._region("svc", 7.0).get_auth()
    assert own._project_name == "service" and own._trust_id is None


def test_identity_url_ends_in_v3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "clouds.yaml").write_text(CLOUDS.replace("5000/v3", "5000/"))
    monkeypatch.setenv("OS_CLIENT_CONFIG_FILE", str(tmp_path / "clouds.yaml"))
    s = Settings(openstack_cloud="svc")
    assert trusts.identity_url(s) == "http://127.0.0.1:5000/v3"


def test_trust_roles_limit_what_a_trust_delegates() -> None:
    from service.domain.errors import Forbidden

    caller = frozenset({"member", "reader", "admin"})
    assert trusts._delegated(Settings(), caller) == caller  # default: every role of the token
    s = Settings(trust_roles=["Member", "load-balancer_member"])  # (names case-insensitive)
    assert trusts._delegated(s, caller) == {"member"}
    with pytest.raises(Forbidden) as e:
        trusts._delegated(s, frozenset({"reader"}))
    assert "your token has none of them" in str(e.value)
    assert e.value.details == {
        "trust_roles": ["Member", "load-balancer_member"],
        "your_roles": ["reader"],
    }
