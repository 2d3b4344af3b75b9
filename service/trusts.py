"""Keystone trusts: how stackml acts in the submitting project after the user's token is gone.

With `auth: keystone`, `compute: openstack` and `tenancy: project` (the default), submitting a
job (and creating a model's endpoint: service/api/endpoints.py, `endpoints.trust_id`) creates a
trust from the caller (trustor) to stackml's service user (trustee: the user of
`openstack_cloud`), scoped to the caller's project and the roles in the caller's token (or those
of them that `trust_roles` allows), with impersonation (as Heat, Sahara and Magnum do): the
job's servers and keypairs are the user's, in the user's project, under its quotas, visible in
its Horizon. The API creates it with the
caller's own token; nothing of the token is kept.

Workers authenticate as the service user with the trust id (no project scope: Keystone scopes a
trust token to the trust's project) for every call they make for the job, however long after
the user's token expired. When the job's servers are gone the trust is deleted (teardown, or the
reconciler's trust debts, or `DELETE /v1/jobs/{id}`) through the trust itself: with
impersonation its token is the trustor's, whom Keystone lets delete their trust. An endpoint's
trust goes the same way once the endpoint is DELETED (workers/steps/serve.py `release_trust`,
or the reconciler's endpoint trust debts), after its tag was swept through it.

`tenancy: service` keeps everything in the service user's own project instead (no trusts).
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any, cast

import openstack.config
from keystoneauth1 import exceptions as ksa_exc
from openstack import exceptions as sdk_exc
from openstack.config.cloud_region import CloudRegion
from openstack.connection import Connection

from service.config import Settings
from service.domain.errors import (
    BackendError,
    Forbidden,
    ServiceUnavailable,
    TransientBackendError,
    Unauthorized,
)

log = logging.getLogger("stackml.trusts")

# auth options that scope a token: a trust token takes its scope from the trust
SCOPE_KEYS = (
    "project_name",
    "project_id",
    "project_domain_name",
    "project_domain_id",
    "domain_name",
    "domain_id",
    "system_scope",
    "tenant_name",
    "tenant_id",
)


class TrustUnavailable(TransientBackendError):
    """Keystone did not answer about a trust (or failed); worth a retry."""

    reason = "keystone_unavailable"


def enabled(settings: Settings) -> bool:
    """Whether jobs act through trusts in their own project (else: the service project)."""
    return (
        settings.auth == "keystone"
        and settings.compute == "openstack"
        and settings.tenancy == "project"
    )


def _region(cloud: str, timeout: float, trust_id: str | None = None) -> CloudRegion:
    """The service user's cloud from clouds.yaml; with `trust_id`, scoped by that trust."""
    if trust_id is None:
        return openstack.config.get_cloud_region(cloud=cloud or None, api_timeout=timeout)
    # merged into the cloud's own auth options: "" unsets its project scope
    scoped = {key: "" for key in SCOPE_KEYS}
    scoped["trust_id"] = trust_id
    return openstack.config.get_cloud_region(cloud=cloud or None, api_timeout=timeout, auth=scoped)


def identity_url(settings: Settings) -> str:
    region = _region(settings.openstack_cloud, settings.openstack_call_timeout)
    url = str(region.config["auth"]["auth_url"]).rstrip("/")
    return url if url.endswith("/v3") else url + "/v3"


_trustee_lock = threading.Lock()


@functools.cache
def _trustee(cloud: str, timeout: float) -> str:
    conn = openstack.connect(cloud=cloud or None, api_timeout=timeout)
    try:
        user_id = conn.current_user_id
    finally:
        conn.close()
    if not user_id:
        raise TrustUnavailable(f"cloud {cloud!r}: Keystone did not say who the service user is")
    return str(user_id)


def trustee_user_id(settings: Settings) -> str:
    """The service user's id (asked of Keystone once per process)."""
    with _trustee_lock:
        try:
            return _trustee(settings.openstack_cloud, settings.openstack_call_timeout)
        except (sdk_exc.SDKException, ksa_exc.ClientException) as e:
            raise TrustUnavailable(
                f"stackml could not authenticate its service user: {_message(e)}"
            ) from e


def _message(e: BaseException) -> str:
    text = str(getattr(e, "details", None) or e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def create(
    settings: Settings, *, token: str, user_id: str, project_id: str, roles: frozenset[str]
) -> str:
    """A trust from the caller to the service user on `project_id` with `roles`; its id.

    401: the caller's token stopped being valid; 403: Keystone refused (its reason is passed
    on); 503: Keystone or the service user is unreachable. Nothing is created on an error."""
    delegated = _delegated(settings, roles)
    trustee = trustee_user_id(settings)
    body = {
        "trust": {
            "trustor_user_id": user_id,
            "trustee_user_id": trustee,
            "project_id": project_id,
            "impersonation": True,
            "allow_redelegation": False,
            "roles": [{"name": r} for r in sorted(delegated)],
        }
    }
    session = _region(settings.openstack_cloud, settings.openstack_call_timeout).get_session()
    try:
        r = session.post(
            identity_url(settings) + "/OS-TRUST/trusts",
            json=body,
            headers={"X-Auth-Token": token},
            authenticated=False,
            raise_exc=False,
            timeout=settings.openstack_call_timeout,
        )
    except ksa_exc.ClientException as e:  # connection refused, timed out, TLS
        raise ServiceUnavailable(
            f"Keystone did not answer when stackml asked for a trust: {_message(e)}",
            retry_after=10,
        ) from e
    if r.status_code == 201:
        return str(r.json()["trust"]["id"])
    reason = _keystone_reason(r)
    if r.status_code == 401:
        raise Unauthorized(f"Keystone no longer accepts your token: {reason}")
    if r.status_code in (400, 403, 404):
        raise Forbidden(
            "Keystone refused to let stackml act for you in this project "
            f"(a trust to stackml's service user): {reason}",
            details={"keystone_status": r.status_code},
        )
    raise ServiceUnavailable(
        f"Keystone answered {r.status_code} when stackml asked for a trust: {reason}",
        retry_after=10,
    )


def _delegated(settings: Settings, roles: frozenset[str]) -> frozenset[str]:
    """The caller's roles the trust carries: all of them, or those `trust_roles` allows."""
    if not settings.trust_roles:
        return roles
    allowed = {r.lower() for r in settings.trust_roles}
    delegated = frozenset(r for r in roles if r.lower() in allowed)
    if not delegated:
        raise Forbidden(
            "stackml acts in your project only with the roles "
            f"{', '.join(sorted(settings.trust_roles))} (trust_roles), and your token has none "
            "of them",
            details={"trust_roles": sorted(settings.trust_roles), "your_roles": sorted(roles)},
        )
    return delegated


def _keystone_reason(r: Any) -> str:
    try:
        return str(r.json()["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return (r.text or "").strip()[:300] or f"HTTP {r.status_code}"


# Version discovery documents (GET / of each service) are the same for every user of a cloud,
# keyed by URL: the trust connections of a process share them per cloud, as openstacksdk's own
# Connection.connect_as shares its parent's (saves a GET per service per new trust).
_discovery: dict[str, dict[str, Any]] = {}
_discovery_lock = threading.Lock()


def connect(cloud: str, trust_id: str, timeout: float) -> Connection:
    """An openstacksdk connection as `cloud`'s user acting through the trust, in the trust's
    project."""
    region = _region(cloud, timeout, trust_id)
    with _discovery_lock:
        # set before the session exists (CloudRegion's constructor turns an empty dict to None)
        region._discovery_cache = _discovery.setdefault(cloud, {})
    return Connection(config=region)


def delete(settings: Settings, trust_id: str, conn: Connection | None = None) -> str:
    """Delete the trust; "deleted", or "gone" when it no longer exists or can no longer be
    used (deleted by its user, or its user lost the roles: it then grants nothing).
    TrustUnavailable when Keystone did not answer (retry later).

    `conn`: a connection already logged in through this trust (the job's backend's), which
    saves a Keystone login; it is left open. Without it, one is made and closed."""
    own = conn is None
    if conn is None:
        conn = connect(settings.openstack_cloud, trust_id, settings.openstack_call_timeout)
    try:
        conn.identity.delete_trust(trust_id, ignore_missing=False)  # type: ignore[union-attr]
        return "deleted"
    except (ksa_exc.NotFound, sdk_exc.NotFoundException) as e:
        log.info("trust %s is gone already (%s)", trust_id, e)
        return "gone"
    except ksa_exc.Unauthorized as e:
        # the trust no longer authenticates (gone, or its trustor lost the roles) unless it is
        # the service user's own login that fails: then nothing is known, retry later
        _check_service_login(settings)
        log.info("trust %s no longer authenticates (%s): nothing left to delete", trust_id, e)
        return "gone"
    except (sdk_exc.SDKException, ksa_exc.ClientException) as e:
        raise TrustUnavailable(f"deleting trust {trust_id}: {_message(e)}") from e
    finally:
        if own:
            conn.close()


def logged_in(backend: Any, trust_id: str) -> Connection | None:
    """The connection of `backend` (one acting through the trust, registry.compute(trust_id=)),
    which has as a rule logged in through the trust already, so deleting the trust with it
    costs no second Keystone login; None when the backend has none or it cannot be made (then
    `delete` makes its own, and tells a trust that is gone from a Keystone that does not
    answer)."""
    connection = getattr(backend, "connection", None)
    if connection is None:
        return None
    try:
        return cast("Connection", connection())
    except BackendError as e:
        log.info("trust %s: its backend cannot log in (%s)", trust_id, e)
        return None


def refused(e: BaseException) -> bool:
    """Whether `e`, or an error it was raised from, is Keystone answering 401: through a trust,
    the trust is gone or grants nothing (or the service user's own login fails: `delete` tells
    which)."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, ksa_exc.Unauthorized) or getattr(seen, "status_code", None) == 401:
            return True
        seen = seen.__cause__
    return False


def _check_service_login(settings: Settings) -> None:
    conn = openstack.connect(
        cloud=settings.openstack_cloud or None, api_timeout=settings.openstack_call_timeout
    )
    try:
        conn.authorize()
    except (sdk_exc.SDKException, ksa_exc.ClientException) as e:
        raise TrustUnavailable(
            f"stackml's service user cannot log in to Keystone: {_message(e)}"
        ) from e
    finally:
        conn.close()


def reset() -> None:
    _trustee.cache_clear()
