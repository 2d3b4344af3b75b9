"""The Python REST client of the stackml API (docs/api.md): one method per route, typed errors."""

from __future__ import annotations

import codecs
import gzip
import io
import os
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import requests

from service.domain.errors import StackMLError

DEFAULT_URL = "http://127.0.0.1:8080"
TERMINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})
FEEDBACK_BATCH = 1000  # items per POST /v1/models/{name}/feedback
# Names never staged with a trainer package: caches and version-control / tool state.
EXCLUDED_DIRS = frozenset(
    {"__pycache__", ".git", ".hg", ".svn", ".venv", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
)
EXCLUDED_SUFFIXES = (".pyc", ".pyo")

Json = dict[str, Any]


class ClientError(StackMLError):
    """Root of the errors the client raises."""

    code = "client_error"


class APIError(ClientError):
    """The API answered with an error (its `{"error": {...}}` body, or a bare HTTP status)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: dict[str, Any] | None = None,
        request_id: str | None = None,
        *,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, details=details)
        self.status = status
        self.code = code
        self.request_id = request_id
        self.retry_after = retry_after

    def __str__(self) -> str:
        return describe_error(self)


class APIUnavailable(ClientError):
    """Nothing answers at the API's URL (connection refused, DNS, or no answer in time)."""

    code = "api_unavailable"


class AuthenticationFailed(ClientError):
    """No token could be had from Keystone (bad credentials, unknown cloud, Keystone down)."""

    code = "authentication_failed"


class TokenSource(Protocol):
    """Where the client's X-Auth-Token comes from (Keystone through keystoneauth)."""

    def token(self) -> str:
        """A valid token (fetched, or cached until it nears expiry)."""

    def invalidate(self) -> None:
        """Forget the cached token: the next `token()` authenticates again."""


class KeystoneTokens:
    """Tokens from a keystoneauth session (clouds.yaml + OS_CLOUD, or OS_* variables); the
    session caches the token and renews it before it expires."""

    def __init__(self, session: Any, what: str) -> None:
        self._session = session
        self._what = what
        self._lock = threading.Lock()  # one login at a time for clones in other threads

    def token(self) -> str:
        from keystoneauth1 import exceptions as ksa_exceptions

        with self._lock:
            try:
                token = self._session.get_token()
            except ksa_exceptions.ClientException as e:
                # keystoneauth's messages name the URL and the failure, never the password
                raise AuthenticationFailed(
                    f"cannot get a Keystone token for {self._what}: {type(e).__name__}: {e} "
                    "(for an API without auth, unset OS_CLOUD and OS_AUTH_URL)"
                ) from e
        if not token:
            raise AuthenticationFailed(f"Keystone gave no token for {self._what}")
        return str(token)

    def invalidate(self) -> None:
        with self._lock:
            self._session.invalidate()

    def __repr__(self) -> str:
        return f"KeystoneTokens({self._what})"


def keystone_tokens(cloud: str | None = None) -> KeystoneTokens:
    """Tokens for `cloud` of clouds.yaml, or (None) for $OS_CLOUD, else the OS_* variables."""
    import openstack.config
    from keystoneauth1 import exceptions as ksa_exceptions
    from openstack import exceptions as sdk_exceptions

    name = cloud or os.environ.get("OS_CLOUD") or None
    what = f"cloud {name!r}" if name else "the OS_* environment variables"
    try:
        config = openstack.config.OpenStackConfig(load_envvars=True)
        region = config.get_one(cloud=name)
        session = region.get_session()
    except (sdk_exceptions.SDKException, ksa_exceptions.ClientException) as e:
        raise AuthenticationFailed(f"cannot authenticate with {what}: {e}") from e
    return KeystoneTokens(session, what)


def openstack_auth_configured(cloud: str | None = None) -> bool:
    """True when the OpenStack way names credentials: a cloud, $OS_CLOUD or $OS_AUTH_URL."""
    return bool(cloud or os.environ.get("OS_CLOUD") or os.environ.get("OS_AUTH_URL"))


class WaitTimeout(ClientError):
    """A job did not reach a terminal state before the deadline."""

    code = "wait_timeout"

    def __init__(self, message: str, *, job: Json | None = None) -> None:
        super().__init__(message, details={"job_id": (job or {}).get("id")})
        self.job = job


def describe_error(err: BaseException) -> str:
    """One sentence for a user: the code and the message (and the request id to quote)."""
    if isinstance(err, APIError):
        extra = f"HTTP {err.status}"
        if err.request_id:
            extra += f", request {err.request_id}"
        message = err.message.rstrip(".") if err.message else "no message"
        fields = err.details.get("fields") if isinstance(err.details, dict) else None
        if isinstance(fields, list):  # say which fields, unless the message already does
            said = [
                f"{f.get('field')}: {f.get('message')}"
                for f in fields
                if isinstance(f, dict) and str(f.get("message")) not in message
            ]
            if said:
                message += " (" + "; ".join(said) + ")"
        return f"{message} [{err.code}, {extra}]"
    if isinstance(err, StackMLError):
        return f"{err.message} [{err.code}]"
    return str(err)


def _labels_param(labels: Mapping[str, str] | Sequence[str] | None) -> list[str]:
    if not labels:
        return []
    if isinstance(labels, Mapping):
        return [f"{k}={v}" for k, v in labels.items()]
    return list(labels)


def _states_param(state: str | Sequence[str] | None) -> list[str]:
    if not state:
        return []
    return [state] if isinstance(state, str) else list(state)


class StackMLClient:
    """A client of one stackml API. Every request has a timeout; errors are `ClientError`s."""

    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        timeout: float = 30,
        *,
        auth: TokenSource | None = None,
    ) -> None:
        """`token`: a fixed X-Auth-Token; `auth`: a source of tokens (see `keystone_tokens`),
        asked before each request and told to re-authenticate once when the API answers 401."""
        self.base_url = (base_url or os.environ.get("STACKML_URL") or DEFAULT_URL).rstrip("/")
        self.timeout = timeout
        self.auth = auth
        self._token = token or os.environ.get("STACKML_TOKEN") or None
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "stackml-client/0.1"
        self.session.headers["Accept"] = "application/json"

    def __repr__(self) -> str:  # never the token
        return f"StackMLClient({self.base_url!r})"

    def clone(self) -> StackMLClient:
        """A client of the same API with its own connection pool (one per thread)."""
        return StackMLClient(self.base_url, token=self._token, timeout=self.timeout, auth=self.auth)

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> StackMLClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport -----------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        timeout: float | tuple[float, float] | None = None,
        ok: Sequence[int] = (),
        **kwargs: Any,
    ) -> requests.Response:
        url = self.base_url + path
        headers = dict(kwargs.pop("headers", None) or {})
        body = kwargs.get("data")
        start = _tell(body)
        for attempt in (1, 2):
            if self.auth is not None:
                headers["X-Auth-Token"] = self.auth.token()
            elif self._token:
                headers["X-Auth-Token"] = self._token
            resp = self._send(method, url, path, headers, timeout, kwargs)
            if (
                resp.status_code == 401
                and attempt == 1
                and self.auth is not None
                and _rewind(body, start)
            ):
                # the token expired (or was revoked) since it was cached: log in once more
                resp.close()
                self.auth.invalidate()
                continue
            break
        if resp.status_code >= 400 and resp.status_code not in ok:
            raise _api_error(resp)
        return resp

    def _send(
        self,
        method: str,
        url: str,
        path: str,
        headers: dict[str, str],
        timeout: float | tuple[float, float] | None,
        kwargs: dict[str, Any],
    ) -> requests.Response:
        try:
            return self.session.request(
                method, url, headers=headers, timeout=timeout or self.timeout, **kwargs
            )
        except requests.ConnectionError as e:
            raise APIUnavailable(
                f"cannot reach the stackml API at {self.base_url} ({_reason(e)}); start it with "
                "`stackml up`, or point STACKML_URL (or --url) at a running API"
            ) from e
        except requests.Timeout as e:
            raise APIUnavailable(
                f"the stackml API at {self.base_url} did not answer {method} {path} in time"
            ) from e
        except requests.RequestException as e:
            raise APIUnavailable(f"request to {url} failed: {e}") from e

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self._request(method, path, **kwargs)
        if resp.status_code == 204 or not resp.content:
            return None
        try:
            return resp.json()
        except ValueError as e:
            raise APIError(
                resp.status_code,
                "bad_response",
                f"the API answered {method} {path} with a body that is not JSON",
                request_id=resp.headers.get("X-Request-Id"),
            ) from e

    # -- jobs ------------------------------------------------------------------------------------

    def create_job(self, spec: Mapping[str, Any]) -> Json:
        result: Json = self._json("POST", "/v1/jobs", json=dict(spec))
        return result

    def predict_batch(
        self,
        model: str,
        input_uris: Sequence[str],
        output_prefix: str,
        *,
        version: int | None = None,
        label: str | None = None,
        format: str | None = None,
        batch_size: int | None = None,
        shard_rows: int | None = None,
        name: str | None = None,
        flavor: str | None = None,
        max_workers: int | None = None,
    ) -> Json:
        """Submit a batch_prediction job: `model`'s `version` or `label` (default: the
        `default` label, resolved once, now) over `input_uris`, into `output_prefix`, on
        `max_workers` servers (default 1)."""
        pred: dict[str, Any] = {
            "model": model,
            "input_uris": list(input_uris),
            "output_prefix": output_prefix,
        }
        for key, value in (
            ("version", version),
            ("label", label),
            ("format", format),
            ("batch_size", batch_size),
            ("shard_rows", shard_rows),
            ("max_workers", max_workers),
        ):
            if value is not None:
                pred[key] = value
        spec: dict[str, Any] = {
            "name": name or f"{model}-batch",
            "type": "batch_prediction",
            "prediction": pred,
        }
        if flavor:
            spec["resources"] = {"flavor": flavor}
        return self.create_job(spec)

    def list_jobs(
        self,
        state: str | Sequence[str] | None = None,
        labels: Mapping[str, str] | Sequence[str] | None = None,
        limit: int | None = None,
        marker: str | None = None,
    ) -> Json:
        """One page: `{"jobs": [...], "next": marker-or-null}`."""
        params: list[tuple[str, str]] = [("state", s) for s in _states_param(state)]
        params += [("label", lbl) for lbl in _labels_param(labels)]
        if limit is not None:
            params.append(("limit", str(limit)))
        if marker:
            params.append(("marker", marker))
        result: Json = self._json("GET", "/v1/jobs", params=params)
        return result

    def iter_jobs(
        self,
        state: str | Sequence[str] | None = None,
        labels: Mapping[str, str] | Sequence[str] | None = None,
        limit: int | None = None,
        marker: str | None = None,
    ) -> Iterator[Json]:
        """Every job of the listing, following `next` (`limit` is the page size)."""
        while True:
            page = self.list_jobs(state=state, labels=labels, limit=limit, marker=marker)
            yield from page.get("jobs") or []
            nxt = page.get("next")
            if not nxt or nxt == marker:
                return
            marker = nxt

    def get_job(self, job_id: str) -> Json:
        result: Json = self._json("GET", f"/v1/jobs/{_seg(job_id)}")
        return result

    def cancel_job(self, job_id: str) -> Json:
        result: Json = self._json("POST", f"/v1/jobs/{_seg(job_id)}/cancel")
        return result or {}

    def delete_job(self, job_id: str) -> None:
        self._request("DELETE", f"/v1/jobs/{_seg(job_id)}")

    def events(self, job_id: str, replica: str | None = None) -> Json:
        """The timeline as the API returns it: `{"events": [...]}`; with `replica`
        (`worker-<k>`), only the events about that replica."""
        params = {"replica": replica} if replica else None
        result: Json = self._json("GET", f"/v1/jobs/{_seg(job_id)}/events", params=params)
        return result

    def metrics(self, job_id: str, replica: str | None = None) -> Json:
        """The metric series: the chief's (the job's), or `replica`'s (`worker-<k>`)."""
        params = {"replica": replica} if replica else None
        result: Json = self._json("GET", f"/v1/jobs/{_seg(job_id)}/metrics", params=params)
        return result

    def logs(self, job_id: str, offset: int = 0, replica: str | None = None) -> tuple[bytes, int]:
        """Stored log bytes from `offset`, and the offset to ask for next: the chief's log, or
        `replica`'s (`worker-<k>`: a distributed job's replica, a batch job's worker)."""
        params: dict[str, str | int] = {"offset": offset}
        if replica:
            params["replica"] = replica
        resp = self._request(
            "GET",
            f"/v1/jobs/{_seg(job_id)}/logs",
            params=params,
            headers={"Accept": "text/plain"},
        )
        data = resp.content
        return data, _next_offset(resp, offset + len(data))

    def follow_logs(
        self,
        job_id: str,
        offset: int = 0,
        *,
        read_timeout: float = 30.0,
        stream_seconds: float = 25.0,
        reconnect_delay: float = 0.5,
        max_failures: int = 5,
        replica: str | None = None,
    ) -> Iterator[bytes]:
        """The log (the chief's, or `replica`'s) as it grows, until the job is terminal and
        every byte was read.

        Streams `?follow=true`; when the stream ends or drops (read timeout, reset), asks
        whether the job is terminal and reconnects from the last offset if it is not. Each
        stream asks the server to end after `stream_seconds` (below `read_timeout`), so a
        quiet trainer means periodic clean reconnects, not abandoned server-side streams.
        Gives up with APIUnavailable after `max_failures` consecutive failed connections.
        """
        failures = 0
        while True:
            got = 0
            try:
                resp = self._request(
                    "GET",
                    f"/v1/jobs/{_seg(job_id)}/logs",
                    params={
                        "offset": offset,
                        "follow": "true",
                        "timeout": stream_seconds,
                        **({"replica": replica} if replica else {}),
                    },
                    headers={"Accept": "text/plain"},
                    stream=True,
                    timeout=(min(self.timeout, 10.0), read_timeout),
                )
                failures = 0
                with resp:
                    for chunk in resp.iter_content(chunk_size=None):
                        if chunk:
                            offset += len(chunk)
                            got += len(chunk)
                            yield chunk
            except APIUnavailable:
                failures += 1
                if failures >= max_failures:
                    raise
            except (requests.RequestException, OSError):
                pass  # the stream dropped mid-way: resume from `offset`
            job = self._get_job_tolerant(job_id)
            if job is not None and job.get("state") in TERMINAL_STATES:
                # the stream may have ended before the last bytes were stored; drain them
                while True:
                    data, nxt = self.logs(job_id, offset, replica)
                    if not data:
                        return
                    offset = max(nxt, offset + len(data))
                    yield data
            if got == 0:
                time.sleep(reconnect_delay * min(failures + 1, 4))

    def _get_job_tolerant(self, job_id: str) -> Json | None:
        try:
            return self.get_job(job_id)
        except APIUnavailable:
            return None

    def wait(
        self,
        job_id: str,
        timeout: float,
        on_event: Callable[[Json], None] | None = None,
        *,
        interval: float = 0.2,
        max_interval: float = 1.0,
    ) -> Json:
        """Poll until the job is terminal and return it; `on_event` sees each new event once.

        Raises WaitTimeout (carrying the last job seen) when `timeout` seconds pass first.
        """
        deadline = time.monotonic() + timeout
        seen = 0
        job: Json | None = None
        while True:
            if on_event is not None:
                evs = _items(self.events(job_id), "events")
                for ev in evs[seen:]:
                    on_event(ev)
                seen = max(seen, len(evs))
            job = self.get_job(job_id)
            if job.get("state") in TERMINAL_STATES:
                if on_event is not None:  # events written between the two reads
                    evs = _items(self.events(job_id), "events")
                    for ev in evs[seen:]:
                        on_event(ev)
                return job
            left = deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeout(
                    f"job {job_id} is still {job.get('state')} after {timeout:.0f}s", job=job
                )
            time.sleep(min(interval, left))
            interval = min(interval * 1.5, max_interval)

    # -- packages ----------------------------------------------------------------------------------

    def upload_package(self, path: str | os.PathLike[str]) -> Json:
        """Upload a `.tar.gz` trainer package (streamed, raw application/gzip body)."""
        p = Path(path)
        with p.open("rb") as fh:
            return self._upload(fh, p.name)

    def upload_package_file(self, fh: BinaryIO, filename: str | None = None) -> Json:
        """Upload a `.tar.gz` trainer package from an open binary file (a web form's upload)."""
        return self._upload(fh, filename)

    def _upload(self, fh: BinaryIO, filename: str | None = None) -> Json:
        result: Json = self._json(
            "POST",
            "/v1/packages",
            params={"filename": filename} if filename else None,
            data=fh,
            headers={"Content-Type": "application/gzip"},
            timeout=(min(self.timeout, 10.0), max(self.timeout, 300.0)),
        )
        return result

    def stage_package(self, directory: str | os.PathLike[str]) -> Json:
        """Tar + gzip a trainer directory (deterministically) and upload it."""
        with tempfile.TemporaryFile(suffix=".tar.gz") as tmp:
            build_package(directory, tmp)
            tmp.seek(0)
            name = Path(directory).resolve().name or "package"
            return self._upload(tmp, f"{name}.tar.gz")

    # -- model registry ---------------------------------------------------------------------------

    def create_model(self, name: str, description: str = "") -> Json:
        result: Json = self._json(
            "POST", "/v1/models", json={"name": name, "description": description}
        )
        return result

    def list_models(self) -> list[Json]:
        return _items(self._json("GET", "/v1/models"), "models")

    def get_model(self, name: str) -> Json:
        result: Json = self._json("GET", f"/v1/models/{_seg(name)}")
        return result

    def delete_model(self, name: str) -> None:
        self._json("DELETE", f"/v1/models/{_seg(name)}")

    def create_version(
        self, model: str, *, job_id: str | None = None, artifact_uri: str | None = None
    ) -> Json:
        """A new version (202, CREATING) from a SUCCEEDED job or a store URI."""
        body = {"job_id": job_id} if job_id is not None else {"artifact_uri": artifact_uri}
        result: Json = self._json("POST", f"/v1/models/{_seg(model)}/versions", json=body)
        return result

    def list_versions(self, model: str) -> list[Json]:
        return _items(self._json("GET", f"/v1/models/{_seg(model)}/versions"), "versions")

    def get_version(self, model: str, version: int) -> Json:
        result: Json = self._json("GET", f"/v1/models/{_seg(model)}/versions/{int(version)}")
        return result

    def delete_version(self, model: str, version: int) -> None:
        self._json("DELETE", f"/v1/models/{_seg(model)}/versions/{int(version)}")

    def set_label(
        self,
        model: str,
        label: str,
        version: int,
        *,
        why: str = "",
        expected_version: int | None | object = ...,
    ) -> Json:
        """Point `label` at `version`; with `expected_version` (None: the label must not
        exist yet), only when the label points there now (409 label_moved otherwise)."""
        body: dict[str, Any] = {"version": int(version), "why": why}
        if expected_version is not ...:
            body["expected_version"] = expected_version
        result: Json = self._json(
            "PUT", f"/v1/models/{_seg(model)}/labels/{_seg(label)}", json=body
        )
        return result

    def rollback_label(self, model: str, label: str = "default", *, why: str = "") -> Json:
        """Move `label` back to the version it pointed at before its last move (409
        rollback_unavailable when there is none, or it is no longer READY)."""
        result: Json = self._json(
            "POST",
            f"/v1/models/{_seg(model)}/labels/{_seg(label)}:rollback",
            json={"why": why},
        )
        return result

    def delete_label(self, model: str, label: str, *, why: str = "") -> Json:
        result: Json = self._json(
            "DELETE", f"/v1/models/{_seg(model)}/labels/{_seg(label)}", params={"why": why}
        )
        return result

    def model_history(self, model: str, *, label: str | None = None, at: str | None = None) -> Json:
        params = {k: v for k, v in (("label", label), ("at", at)) if v is not None}
        result: Json = self._json("GET", f"/v1/models/{_seg(model)}/history", params=params)
        return result

    def wait_version(
        self, model: str, version: int, timeout: float = 300, interval: float = 0.5
    ) -> Json:
        """Poll until the version leaves CREATING (READY or FAILED); TimeoutError after
        `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            v = self.get_version(model, version)
            if v["state"] != "CREATING":
                return v
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"version {version} of {model} still CREATING after {timeout:.0f}s"
                )
            time.sleep(interval)

    # -- endpoints (online prediction) ---------------------------------------------------------

    def deploy(
        self,
        model: str,
        *,
        label: str | None = None,
        version: int | None = None,
        replicas: int | None = None,
        flavor: str | None = None,
        traffic: Mapping[str, int] | None = None,
        log_sample_rate: float | None = None,
    ) -> Json:
        """Create the model's endpoint (202, CREATING): follow `label` (default: `default`)
        or pin `version`."""
        body: dict[str, Any] = {
            k: v
            for k, v in (
                ("label", label),
                ("version", version),
                ("replicas", replicas),
                ("flavor", flavor),
                ("traffic", dict(traffic) if traffic is not None else None),
                ("log_sample_rate", log_sample_rate),
            )
            if v is not None
        }
        result: Json = self._json("POST", f"/v1/models/{_seg(model)}/endpoints", json=body)
        return result

    def list_endpoints(self, model: str) -> list[Json]:
        return _items(self._json("GET", f"/v1/models/{_seg(model)}/endpoints"), "endpoints")

    def get_endpoint(self, model: str, endpoint_id: str) -> Json:
        result: Json = self._json("GET", f"/v1/models/{_seg(model)}/endpoints/{_seg(endpoint_id)}")
        return result

    def update_endpoint(self, model: str, endpoint_id: str, **fields: Any) -> Json:
        """PATCH: replicas, label | version, traffic (None clears a split), log_sample_rate."""
        result: Json = self._json(
            "PATCH", f"/v1/models/{_seg(model)}/endpoints/{_seg(endpoint_id)}", json=fields
        )
        return result

    def scale(self, model: str, endpoint_id: str, replicas: int) -> Json:
        return self.update_endpoint(model, endpoint_id, replicas=replicas)

    def undeploy(self, model: str, endpoint_id: str) -> Json:
        """DELETE: every replica drained and deleted (202, DELETING)."""
        result: Json = self._json(
            "DELETE", f"/v1/models/{_seg(model)}/endpoints/{_seg(endpoint_id)}"
        )
        return result

    # -- prediction ----------------------------------------------------------------------------

    def predict(
        self,
        model: str,
        body: Mapping[str, Any],
        *,
        version: int | None = None,
        label: str | None = None,
        method: str = "predict",
    ) -> tuple[Json, dict[str, str]]:
        """TF Serving's `:predict` (or `:classify`, `:regress`) through the API's proxy: the
        endpoint's default route, or one version, or a label's version. Returns (the model
        server's answer, {"version": X-Model-Version, "request_id": X-Request-Id}). The model
        server's own error ({"error": "..."}) raises APIError with code `model_error`; the
        platform's (no_replica, not_found, ...) raise APIError as every call does."""
        if version is not None and label is not None:
            raise ValueError("give a version or a label, not both")
        path = f"/v1/models/{_seg(model)}"
        if version is not None:
            path += f"/versions/{int(version)}"
        elif label is not None:
            path += f"/labels/{_seg(label)}"
        resp = self._request("POST", f"{path}:{method}", json=dict(body), ok=(400, 404, 500))
        meta = {
            "version": resp.headers.get("X-Model-Version", ""),
            "request_id": resp.headers.get("X-Request-Id", ""),
        }
        try:
            answer = resp.json()
        except ValueError as e:
            raise APIError(
                resp.status_code,
                "bad_response",
                f"the model server answered {method} with a body that is not JSON",
                request_id=meta["request_id"] or None,
            ) from e
        if resp.status_code >= 400:
            if isinstance(answer, dict) and isinstance(answer.get("error"), str):
                raise APIError(
                    resp.status_code,
                    "model_error",
                    f"the model server refused the request: {answer['error']}",
                    {"version": meta["version"]},
                    request_id=meta["request_id"] or None,
                )
            raise _api_error(resp)
        if not isinstance(answer, dict):
            raise APIError(
                resp.status_code,
                "bad_response",
                "the model server's answer is not a JSON object",
                request_id=meta["request_id"] or None,
            )
        return answer, meta

    # -- health ------------------------------------------------------------------------------------

    def healthz(self) -> Json:
        result: Json = self._json("GET", "/healthz")
        return result

    def readyz(self) -> Json:
        """The readiness report; a 503 "not ready" report is returned, not raised."""
        resp = self._request("GET", "/readyz", ok=(503,))
        try:
            body = resp.json()
        except ValueError as e:
            raise APIError(resp.status_code, "bad_response", "readyz is not JSON") from e
        if resp.status_code == 503 and isinstance(body, dict) and "error" in body:
            raise _api_error(resp)
        return body if isinstance(body, dict) else {"status": body}

    # -- feedback and datasets -------------------------------------------------------------------

    def post_feedback(self, model: str, items: Sequence[Mapping[str, Any]]) -> Json:
        """Labels for the model's predictions: items of {"request_id", "label", "time"?}, sent
        in batches of at most 1000 (each batch all or nothing). The counts, summed."""
        total: Json = {"model": model, "received": 0, "created": 0, "updated": 0, "unchanged": 0}
        batch = list(items)
        for i in range(0, len(batch), FEEDBACK_BATCH):
            body = {"feedback": [dict(it) for it in batch[i : i + FEEDBACK_BATCH]]}
            out = self._json("POST", f"/v1/models/{_seg(model)}/feedback", json=body)
            for key in ("received", "created", "updated", "unchanged"):
                total[key] += int(out.get(key, 0))
        return total

    def create_dataset(
        self,
        name: str,
        model: str,
        *,
        start: str | None = None,
        end: str | None = None,
        holdout_fraction: float | None = None,
        format: str | None = None,
    ) -> Json:
        """Build a new version of dataset `name` (202, BUILDING) from `model`'s logged
        predictions joined with their feedback."""
        body: dict[str, Any] = {"name": name, "model": model}
        if start is not None or end is not None:
            body["window"] = {k: v for k, v in (("start", start), ("end", end)) if v is not None}
        if holdout_fraction is not None:
            body["holdout_fraction"] = holdout_fraction
        if format is not None:
            body["format"] = format
        result: Json = self._json("POST", "/v1/datasets", json=body)
        return result

    def list_datasets(self) -> list[Json]:
        return _items(self._json("GET", "/v1/datasets"), "datasets")

    def get_dataset(self, name: str) -> Json:
        result: Json = self._json("GET", f"/v1/datasets/{_seg(name)}")
        return result

    def get_dataset_version(self, name: str, version: int) -> Json:
        result: Json = self._json("GET", f"/v1/datasets/{_seg(name)}/versions/{int(version)}")
        return result

    def wait_dataset(self, name: str, version: int, timeout: float = 300.0) -> Json:
        """Poll a version until it is READY or FAILED; TimeoutError past `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            dv = self.get_dataset_version(name, version)
            if dv.get("state") in ("READY", "FAILED"):
                return dv
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"dataset {name} version {version} still {dv.get('state')} after {timeout}s"
                )
            time.sleep(0.5)

    # -- schedules -------------------------------------------------------------------------------

    def create_schedule(
        self,
        name: str,
        cron: str,
        job: Mapping[str, Any],
        *,
        timezone: str = "UTC",
        concurrency: str | None = None,
        catchup: str | None = None,
        max_catchup: int | None = None,
        paused: bool = False,
        dataset: str | None = None,
    ) -> Json:
        """A schedule that submits `job` (a job spec) at each slot of `cron` in `timezone`;
        with `dataset`, each slot rebuilds that dataset first and the job trains on it."""
        body: dict[str, Any] = {"name": name, "cron": cron, "timezone": timezone, "job": dict(job)}
        if concurrency is not None:
            body["concurrency"] = concurrency
        if catchup is not None:
            body["catchup"] = catchup
        if max_catchup is not None:
            body["max_catchup"] = max_catchup
        if paused:
            body["paused"] = True
        if dataset is not None:
            body["dataset"] = dataset
        result: Json = self._json("POST", "/v1/schedules", json=body)
        return result

    def list_schedules(self) -> list[Json]:
        return _items(self._json("GET", "/v1/schedules"), "schedules")

    def get_schedule(self, ref: str) -> Json:
        """One schedule, by id (sch-...) or name."""
        result: Json = self._json("GET", f"/v1/schedules/{_seg(ref)}")
        return result

    def pause_schedule(self, ref: str) -> Json:
        result: Json = self._json("PATCH", f"/v1/schedules/{_seg(ref)}", json={"paused": True})
        return result

    def resume_schedule(self, ref: str) -> Json:
        result: Json = self._json("PATCH", f"/v1/schedules/{_seg(ref)}", json={"paused": False})
        return result

    def delete_schedule(self, ref: str) -> None:
        self._json("DELETE", f"/v1/schedules/{_seg(ref)}")

    def schedule_runs(self, ref: str, limit: int = 50) -> list[Json]:
        """The slots the schedule handled, latest first."""
        body = self._json("GET", f"/v1/schedules/{_seg(ref)}/runs", params={"limit": int(limit)})
        return _items(body, "runs")

    # -- quotas, usage, flavors, pinned deploys ----------------------------------------------------

    def get_quotas(self, project: str | None = None) -> Json:
        """The project's limits, in_use, queued, defaults and overrides (None: the caller's)."""
        path = "/v1/quotas" if project is None else f"/v1/quotas/{_seg(project)}"
        result: Json = self._json("GET", path)
        return result

    def set_quotas(self, project: str, limits: Mapping[str, int | None]) -> Json:
        """Admin: override `project`'s limits (jobs, servers, gpus; None drops an override)."""
        result: Json = self._json("PUT", f"/v1/quotas/{_seg(project)}", json=dict(limits))
        return result

    def reset_quotas(self, project: str) -> None:
        """Admin: back to the configured defaults."""
        self._json("DELETE", f"/v1/quotas/{_seg(project)}")

    def usage(
        self,
        *,
        since: str | None = None,
        until: str | None = None,
        project: str | None = None,
        all_projects: bool = False,
    ) -> Json:
        """VM-seconds, GPU-hours and cost per job, endpoint and project in a window."""
        params = {k: v for k, v in (("since", since), ("until", until), ("project", project)) if v}
        if all_projects:
            params["all_projects"] = "true"
        result: Json = self._json("GET", "/v1/usage", params=params)
        return result

    def list_flavors(self, *, gpus: int | None = None, gpu_type: str | None = None) -> list[Json]:
        params: dict[str, Any] = {}
        if gpus is not None:
            params["gpus"] = int(gpus)
        if gpu_type:
            params["gpu_type"] = gpu_type
        return _items(self._json("GET", "/v1/flavors", params=params), "flavors")

    def deploy_version(
        self, model: str, version: int, *, replicas: int | None = None, flavor: str | None = None
    ) -> Json:
        """An endpoint pinned to `version`, or the live endpoint moved to it (202)."""
        body = {k: v for k, v in (("replicas", replicas), ("flavor", flavor)) if v is not None}
        result: Json = self._json(
            "POST", f"/v1/models/{_seg(model)}/versions/{int(version)}/deploy", json=body
        )
        return result


def build_package(directory: str | os.PathLike[str], out: BinaryIO) -> None:
    """Write a deterministic .tar.gz of `directory`'s content (paths relative to it).

    Sorted entries, zeroed times and owners, normalised modes: the same tree gives the same
    bytes (and sha256). Caches and VCS directories are left out; symlinks to files are stored
    as the files they point to.
    """
    root = Path(directory)
    if not root.is_dir():
        raise ClientError(f"package path {root} is not a directory")
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for rel in _package_files(root):
                src = root / rel
                info = tarfile.TarInfo(rel.as_posix())
                info.mtime = 0
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                if src.is_dir():
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o755
                    tar.addfile(info)
                else:
                    data = src.read_bytes()
                    info.size = len(data)
                    info.mode = 0o755 if os.access(src, os.X_OK) else 0o644
                    tar.addfile(info, io.BytesIO(data))


def _package_files(root: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        here = Path(dirpath)
        if here != root:
            found.append(here.relative_to(root))
        for name in sorted(filenames):
            path = here / name
            if name.endswith(EXCLUDED_SUFFIXES) or not path.is_file():
                continue
            found.append(path.relative_to(root))
    return sorted(found, key=lambda p: p.as_posix())


def _tell(body: Any) -> int | None:
    """Where a file body starts (None: not a file, or not seekable)."""
    if body is None or isinstance(body, bytes | str):
        return 0
    try:
        return int(body.tell())
    except (AttributeError, OSError, ValueError):
        return None


def _rewind(body: Any, start: int | None) -> bool:
    """Make a body sendable again; False when it cannot be (a stream read once)."""
    if body is None or isinstance(body, bytes | str):
        return True
    if start is None:
        return False
    try:
        body.seek(start)
    except (AttributeError, OSError, ValueError):
        return False
    return True


def _items(body: Any, key: str) -> list[Json]:
    if isinstance(body, list):
        return body
    if isinstance(body, dict):
        value = body.get(key)
        if isinstance(value, list):
            return value
    return []


def _seg(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe="")


def _next_offset(resp: requests.Response, default: int) -> int:
    raw = resp.headers.get("X-Next-Offset")
    try:
        return int(raw) if raw is not None else default
    except ValueError:
        return default


def _reason(err: requests.ConnectionError) -> str:
    text = str(err)
    if "Connection refused" in text or "Errno 111" in text:
        return "connection refused"
    if "Name or service not known" in text or "nodename nor servname" in text:
        return "unknown host"
    return "no connection"


def _api_error(resp: requests.Response) -> APIError:
    request_id = resp.headers.get("X-Request-Id")
    retry_after: float | None = None
    if resp.headers.get("Retry-After"):
        try:
            retry_after = float(resp.headers["Retry-After"])
        except ValueError:
            retry_after = None
    body: Any = None
    try:
        body = resp.json()
    except ValueError:
        body = None
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return APIError(
            resp.status_code,
            str(err.get("code") or f"http_{resp.status_code}"),
            str(err.get("message") or resp.reason or ""),
            err.get("details") if isinstance(err.get("details"), dict) else {},
            err.get("request_id") or request_id,
            retry_after=retry_after,
        )
    text = _decode(resp.content[:300]).strip()
    message = f"{resp.request.method} {resp.url} answered {resp.status_code} {resp.reason}"
    if text and not text.startswith("<"):
        message += f": {text}"
    return APIError(
        resp.status_code,
        f"http_{resp.status_code}",
        message,
        {},
        request_id,
        retry_after=retry_after,
    )


def _decode(data: bytes) -> str:
    return codecs.decode(data, "utf-8", "replace")
