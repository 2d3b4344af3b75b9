"""The Swift object store: per-project containers, TempURL grants, SLO uploads (see interfaces.py).

Keys are ``<container>/<object path>``; ``project_prefix(p)`` is the container
``<container_prefix><p>/``. All objects live in the account of the connection's project
(stackml's service project), one container per stackml project.

- Grants are prefix-scoped TempURLs (``temp_url_prefix``) signed with HMAC-SHA256 by the
  account's Temp-URL-Key: read grants sign GET, write grants sign PUT (HEAD works with either).
- Files above ``segment_bytes`` go up as Static Large Objects: segments in the container
  ``<container>_segments`` (python-swiftclient's convention), then the manifest.
- A VM cannot create an SLO with a TempURL: Swift's tempurl middleware rebuilds the query
  string from its own parameters, so ``?multipart-manifest=put`` never reaches the slo
  middleware and the manifest lands as a plain JSON object. The runner therefore PUTs the
  segments under ``<grant prefix>.stackml-segments/<file>/<n>`` and the worker joins them with
  :meth:`SwiftStore.put_manifest` (a few hundred bytes of metadata; Swift checks every
  segment's etag and size). ``list()`` hides those segment objects.
- Every upload is verified: a single object's ETag is the MD5 of its body; an SLO's ETag is
  the MD5 of its segments' MD5 hex digests concatenated. ``ObjectInfo.etag`` is exactly what
  Swift reports: for an SLO that is the SLO ETag (listing ``slo_etag``), not the body's MD5.
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import IO, Any
from urllib.parse import quote, urlencode, urlparse

import requests

from service.backends.interfaces import Access, Grant, ObjectInfo, ObjectStore
from service.backends.storage.local import check_key
from service.domain.errors import StoreError

log = logging.getLogger(__name__)

SEGMENTS_DIR = ".stackml-segments"  # runner-uploaded SLO segments under a grant's prefix
LISTING_LIMIT = 10000
CHUNK = 1 << 20
RETRIES = 3
METHOD_OF_ACCESS = {Access.READ: "GET", Access.WRITE: "PUT"}


def slo_etag(segment_etags: Sequence[str]) -> str:
    """The ETag Swift gives an SLO: MD5 of the segments' MD5 hex digests, concatenated."""
    return hashlib.md5("".join(segment_etags).encode(), usedforsecurity=False).hexdigest()


def _clean_etag(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().strip('"').lower()


class _Slice:
    """`length` bytes of a file from `offset`, hashed (MD5) as they are read; sized for requests."""

    def __init__(self, fh: IO[bytes], offset: int, length: int) -> None:
        self._fh = fh
        self._left = length
        self._len = length
        self.md5 = hashlib.md5(usedforsecurity=False)
        fh.seek(offset)

    def __len__(self) -> int:
        return self._len

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        n = self._left if size is None or size < 0 else min(size, self._left)
        data = self._fh.read(min(n, CHUNK * 8))
        self._left -= len(data)
        self.md5.update(data)
        return data


class SwiftStore(ObjectStore):
    """See interfaces.py and the module docstring.

    `conn` is an openstacksdk Connection (its session, and the object-store endpoint of its
    catalog unless `endpoint` is given). `temp_url_key`: the account key that signs grants;
    None reads the account's Temp-URL-Key and sets a random one when it has none. Pass a key
    derived from stackml's secret so that every worker signs with the same key without a race.
    """

    scheme = "swift"

    def __init__(
        self,
        conn: Any,
        *,
        segment_bytes: int = 0,
        container_prefix: str = "stackml-",
        temp_url_key: str | None = None,
        endpoint: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        if segment_bytes < 0:
            raise ValueError("segment_bytes must be >= 0 (0: never segment)")
        self.conn = conn
        self.session = getattr(conn, "session", conn)
        self.segment_bytes = int(segment_bytes)
        self.container_prefix = container_prefix
        self.timeout = float(timeout)
        self._endpoint = endpoint.rstrip("/") if endpoint else None
        self._configured_key = temp_url_key
        self._key: str | None = None
        self._containers: set[str] = set()
        self._lock = threading.Lock()

    # -- addressing -------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The account URL, e.g. http://127.0.0.1:8090/v1/AUTH_<project id>."""
        if self._endpoint is None:
            from keystoneauth1 import exceptions as ks_exc
            from openstack import exceptions as os_exc

            try:
                url = self.conn.object_store.get_endpoint()
            except (ks_exc.ClientException, os_exc.SDKException) as e:
                raise StoreError(
                    f"cannot find the object-store endpoint: {e}", reason="store_unavailable"
                ) from e
            if not url:
                raise StoreError("the cloud's catalog has no object-store endpoint")
            self._endpoint = str(url).rstrip("/")
        return self._endpoint

    @property
    def account_path(self) -> str:
        return urlparse(self.endpoint).path  # /v1/AUTH_<project id>

    def project_prefix(self, project_id: str) -> str:
        return f"{self.container_prefix}{project_id}/"

    @staticmethod
    def split(key: str, *, prefix: bool = False) -> tuple[str, str]:
        """(container, object path) of a key; with `prefix` the path may be empty."""
        check_key(key, prefix=prefix)
        container, sep, path = key.partition("/")
        if not sep or (not path and not prefix):
            raise ValueError(f"{key!r} is not <container>/<object>")
        if len(container) > 256:
            raise ValueError("a Swift container name is at most 256 characters")
        return container, path

    def _url(self, container: str, path: str = "") -> str:
        url = f"{self.endpoint}/{quote(container, safe='')}"
        return f"{url}/{quote(path)}" if path else url

    # -- HTTP ---------------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        url: str,
        *,
        params: dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        data: Any = None,
        stream: bool = False,
    ) -> Any:
        from keystoneauth1 import exceptions as ks_exc

        try:
            return self.session.request(
                url,
                method,
                params=params,
                headers=headers or {},
                data=data,
                raise_exc=False,
                timeout=self.timeout,
                stream=stream,
                log=data is None,
            )
        except ks_exc.ClientException as e:
            raise StoreError(
                f"swift {method} {url.split('?', 1)[0]} failed: {e}", reason="store_unavailable"
            ) from e

    @staticmethod
    def _fail(what: str, resp: Any, reason: str = "store_error") -> StoreError:
        body = (resp.text or "")[:300].strip()
        return StoreError(
            f"{what}: swift answered {resp.status_code} {body}".strip(),
            reason=reason,
            details={"status": resp.status_code},
        )

    def _ensure_container(self, container: str) -> None:
        if container in self._containers:
            return
        resp = self._request("PUT", self._url(container))
        if resp.status_code not in (201, 202, 204):
            raise self._fail(f"cannot create container {container}", resp)
        with self._lock:
            self._containers.add(container)

    # -- writes -------------------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> ObjectInfo:
        container, path = self.split(key)
        if self.segment_bytes and len(data) > self.segment_bytes:
            import io

            return self._put_slo(container, path, io.BytesIO(data), len(data))
        self._ensure_container(container)
        etag = hashlib.md5(data, usedforsecurity=False).hexdigest()
        resp = self._request(
            "PUT",
            self._url(container, path),
            headers={"Etag": etag, "Content-Type": "application/octet-stream"},
            data=data,
        )
        self._check_put(key, resp, etag)
        return ObjectInfo(key=key, size=len(data), etag=etag)

    def put_file(self, key: str, path: str) -> ObjectInfo:
        container, obj = self.split(key)
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            if self.segment_bytes and size > self.segment_bytes:
                return self._put_slo(container, obj, fh, size)
            self._ensure_container(container)
            etag = self._put_part(self._url(container, obj), fh, 0, size, key)
        return ObjectInfo(key=key, size=size, etag=etag)

    def _put_part(self, url: str, fh: IO[bytes], offset: int, length: int, what: str) -> str:
        """PUT `length` bytes of `fh` from `offset` to `url`; returns the verified MD5."""
        for attempt in range(RETRIES):
            body = _Slice(fh, offset, length)
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(length)}
            try:
                resp = self._request("PUT", url, headers=headers, data=body)
            except StoreError:
                if attempt == RETRIES - 1:
                    raise
                time.sleep(0.5 * (attempt + 1))
                continue
            if resp.status_code >= 500 and attempt < RETRIES - 1:
                time.sleep(0.5 * (attempt + 1))
                continue
            etag = body.md5.hexdigest()
            self._check_put(what, resp, etag)
            return etag
        raise StoreError(f"uploading {what} failed after {RETRIES} tries")  # not reached

    def _check_put(self, what: str, resp: Any, expected: str) -> None:
        if resp.status_code == 422:
            raise self._fail(f"{what} arrived corrupted (etag mismatch)", resp, "upload_failed")
        if resp.status_code != 201:
            raise self._fail(f"uploading {what} failed", resp, "upload_failed")
        got = _clean_etag(resp.headers.get("Etag"))
        if got != expected:
            raise StoreError(
                f"{what} arrived corrupted: swift's etag {got} != md5 {expected}",
                reason="upload_failed",
                details={"etag": got, "md5": expected},
            )

    def _put_slo(self, container: str, obj: str, fh: IO[bytes], size: int) -> ObjectInfo:
        seg_container = f"{container}_segments"
        self._ensure_container(container)
        self._ensure_container(seg_container)
        old = self._manifest_segments(container, obj)
        base = f"{obj}/slo/{time.time():.6f}/{size}/{self.segment_bytes}"
        segments = []
        for n, offset in enumerate(range(0, size, self.segment_bytes)):
            length = min(self.segment_bytes, size - offset)
            seg = f"{base}/{n:08d}"
            etag = self._put_part(
                self._url(seg_container, seg), fh, offset, length, f"{container}/{obj} part {n}"
            )
            segments.append(ObjectInfo(key=f"{seg_container}/{seg}", size=length, etag=etag))
        info = self.put_manifest(f"{container}/{obj}", segments)
        for seg_key in old:  # the replaced version's segments
            self._delete_plain(seg_key)
        return info

    def put_manifest(
        self, key: str, segments: Sequence[ObjectInfo], expected_etag: str | None = None
    ) -> ObjectInfo:
        """Join uploaded segment objects (keys in this store) into one SLO at `key`.

        Swift checks each segment's current etag and size against `segments` (which carry what
        the uploader hashed locally) and the whole against `expected_etag`; any difference is a
        StoreError with reason `upload_failed`, and nothing is written at `key`."""
        container, obj = self.split(key)
        if not segments:
            raise StoreError(f"{key}: a large object needs at least one segment")
        manifest = []
        for seg in segments:
            seg_container, seg_obj = self.split(seg.key)
            manifest.append(
                {"path": f"/{seg_container}/{seg_obj}", "etag": seg.etag, "size_bytes": seg.size}
            )
        etag = slo_etag([s.etag for s in segments])
        if expected_etag is not None and _clean_etag(expected_etag) != etag:
            raise StoreError(
                f"{key}: the uploader's etag {expected_etag} does not match its segments ({etag})",
                reason="upload_failed",
            )
        self._ensure_container(container)
        resp = self._request(
            "PUT",
            self._url(container, obj),
            params={"multipart-manifest": "put"},
            headers={"Etag": etag, "Content-Type": "application/octet-stream"},
            data=json.dumps(manifest).encode(),
        )
        if resp.status_code in (400, 409, 422):
            raise self._fail(
                f"{key}: a segment differs from what was uploaded", resp, "upload_failed"
            )
        self._check_put(key, resp, etag)
        return ObjectInfo(key=key, size=sum(s.size for s in segments), etag=etag)

    # -- reads --------------------------------------------------------------------------------

    def get(self, key: str) -> bytes:
        container, obj = self.split(key)
        resp = self._request("GET", self._url(container, obj), stream=True)
        try:
            if resp.status_code == 404:
                raise KeyError(key)
            if resp.status_code != 200:
                raise self._fail(f"cannot read {key}", resp)
            try:
                data: bytes = resp.content
            except requests.RequestException as e:
                raise StoreError(
                    f"reading {key} broke off: {e} (for a large object: a segment is missing "
                    "or changed)",
                    reason="store_error",
                ) from e
        finally:
            resp.close()
        expected = resp.headers.get("Content-Length")
        if expected is not None and int(expected) != len(data):
            raise StoreError(
                f"reading {key} broke off after {len(data)} of {expected} bytes "
                "(for a large object: a segment is missing or changed)"
            )
        if "X-Static-Large-Object" not in resp.headers:
            etag = _clean_etag(resp.headers.get("Etag"))
            got = hashlib.md5(data, usedforsecurity=False).hexdigest()
            if etag and etag != got:
                raise StoreError(f"{key} read back with md5 {got}, swift's etag is {etag}")
        return data

    def info(self, key: str) -> ObjectInfo | None:
        """Size and etag of one object (the SLO etag for a large object), None if absent."""
        container, obj = self.split(key)
        resp = self._request("HEAD", self._url(container, obj))
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise self._fail(f"cannot stat {key}", resp)
        return ObjectInfo(
            key=key,
            size=int(resp.headers.get("Content-Length", 0)),
            etag=_clean_etag(resp.headers.get("Etag")),
        )

    def list(self, prefix: str) -> list[ObjectInfo]:
        """Objects under `prefix`, sorted; runner segment objects (`.stackml-segments/`) hidden."""
        return [o for o in self._list(prefix) if not _is_segment(o.key)]

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        if "/" not in prefix:
            for container in self._containers_with(prefix):
                yield from self._list_container(container, "")
            return
        container, path = self.split(prefix, prefix=True)
        yield from self._list_container(container, path)

    def _containers_with(self, prefix: str) -> builtins.list[str]:
        out: builtins.list[str] = []
        marker = ""
        while True:
            params = {"format": "json", "limit": str(LISTING_LIMIT), "marker": marker}
            if prefix:
                params["prefix"] = prefix
            resp = self._request("GET", self.endpoint, params=params)
            if resp.status_code == 204:
                return out
            if resp.status_code != 200:
                raise self._fail("cannot list containers", resp)
            page = resp.json()
            out += [c["name"] for c in page]
            if len(page) < LISTING_LIMIT:
                return out
            marker = page[-1]["name"]

    def _list_container(self, container: str, path: str) -> Iterator[ObjectInfo]:
        marker = ""
        while True:
            params = {"format": "json", "limit": str(LISTING_LIMIT), "marker": marker}
            if path:
                params["prefix"] = path
            resp = self._request("GET", self._url(container), params=params)
            if resp.status_code == 404:
                return
            if resp.status_code == 204:
                return
            if resp.status_code != 200:
                raise self._fail(f"cannot list {container}/{path}", resp)
            page = resp.json()
            for item in page:
                if "subdir" in item:
                    continue
                etag = _clean_etag(item.get("slo_etag") or item.get("hash"))
                yield ObjectInfo(
                    key=f"{container}/{item['name']}", size=int(item["bytes"]), etag=etag
                )
            if len(page) < LISTING_LIMIT:
                return
            marker = page[-1]["name"]

    # -- deletes ------------------------------------------------------------------------------

    def delete(self, key: str) -> None:
        """Idempotent; a large object goes with its segments (`?multipart-manifest=delete`)."""
        self._delete(key)

    def _delete(self, key: str) -> bool:
        """Delete one object (a manifest with its segments); True when there was one."""
        container, obj = self.split(key)
        resp = self._request(
            "DELETE",
            self._url(container, obj),
            params={"multipart-manifest": "delete"},
            headers={"Accept": "application/json"},
        )
        if resp.status_code == 404:
            return False
        if resp.status_code == 204:
            return True
        if resp.status_code != 200:
            raise self._fail(f"cannot delete {key}", resp)
        try:
            result = resp.json()
        except ValueError:
            return True
        errors = result.get("Errors") or []
        if errors and all("Not an SLO manifest" in str(e) for e in errors):
            return self._delete_plain(key)  # a plain object: delete it as one
        if errors or not str(result.get("Response Status", "200")).startswith(("2", "404")):
            raise StoreError(f"deleting {key} left errors: {errors or result}")
        return int(result.get("Number Deleted") or 0) > 0

    def _delete_plain(self, key: str) -> bool:
        container, obj = self.split(key)
        resp = self._request("DELETE", self._url(container, obj))
        if resp.status_code not in (204, 404):
            raise self._fail(f"cannot delete {key}", resp)
        return bool(resp.status_code == 204)

    def delete_keys(self, keys: Iterable[str], *, within: str | None = None) -> int:
        """See interfaces.py: exactly these objects, one DELETE each (a missing one is no
        error); a runner segment (`.stackml-segments/`) is deleted as a plain object, a
        manifest with its segments. Returns how many existed."""
        todo = self._keys_to_delete(keys, within)
        for key in todo:
            self.split(key)  # a malformed key is a ValueError before anything is deleted
        n = 0
        for key in todo:
            n += self._delete_plain(key) if _is_segment(key) else self._delete(key)
        return n

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under `prefix`, runner segments included; returns how many."""
        infos = list(self._list(prefix))
        for info in infos:
            if _is_segment(info.key):
                self._delete_plain(info.key)
            else:
                self.delete(info.key)
        return len(infos)

    def _manifest_segments(self, container: str, obj: str) -> builtins.list[str]:
        """Segment keys of the SLO at container/obj (none if it is absent or not an SLO)."""
        resp = self._request(
            "GET",
            self._url(container, obj),
            params={"multipart-manifest": "get", "format": "raw"},
        )
        if resp.status_code != 200 or "X-Static-Large-Object" not in resp.headers:
            return []
        try:
            return [str(s["path"]).lstrip("/") for s in resp.json()]
        except (ValueError, KeyError, TypeError):
            return []

    # -- grants -------------------------------------------------------------------------------

    def grant(self, prefix: str, access: Access, ttl_seconds: int) -> Grant:
        container, path = self.split(prefix, prefix=True)
        if ttl_seconds <= 0:
            raise ValueError("a grant needs a positive ttl")
        access = Access(access)
        if access is Access.WRITE:
            self._ensure_container(container)  # the VM cannot create it with a TempURL
        key = self.temp_url_key()
        expires = int(time.time()) + int(ttl_seconds)
        method = METHOD_OF_ACCESS[access]
        # tempurl signs the unquoted path: prefix:/v1/<account>/<container>/<path prefix>
        body = f"{method}\n{expires}\nprefix:{self.account_path}/{container}/{path}"
        sig = hmac.new(key.encode(), body.encode(), hashlib.sha256).hexdigest()
        query = urlencode(
            {"temp_url_sig": sig, "temp_url_expires": str(expires), "temp_url_prefix": path}
        )
        url_prefix = f"{self._url(container)}/{quote(path)}"
        return Grant(
            prefix=prefix,
            access=access,
            expires_at=expires,
            url_prefix=url_prefix,
            query=query,
            segment_bytes=self.segment_bytes,
        )

    def temp_url_key(self) -> str:
        """The account key grants are signed with; set on the account once if absent."""
        if self._key is not None:
            return self._key
        with self._lock:
            if self._key is None:
                self._key = self._load_key()
        return self._key

    def _account_keys(self) -> tuple[str | None, str | None]:
        resp = self._request("HEAD", self.endpoint)
        if resp.status_code not in (200, 204):
            raise self._fail("cannot read the account's Temp-URL-Key", resp)
        h = resp.headers
        return h.get("X-Account-Meta-Temp-URL-Key"), h.get("X-Account-Meta-Temp-URL-Key-2")

    def _set_account_key(self, header: str, value: str) -> None:
        resp = self._request("POST", self.endpoint, headers={header: value})
        if resp.status_code not in (200, 204):
            raise self._fail(
                "cannot set the account's Temp-URL-Key (stackml's user needs an operator "
                "role, e.g. member or admin, on its project)",
                resp,
            )

    def _load_key(self) -> str:
        key1, key2 = self._account_keys()
        want = self._configured_key
        if want is None:
            if key1:
                return key1
            self._set_account_key("X-Account-Meta-Temp-URL-Key", secrets.token_hex(32))
            key1, _ = self._account_keys()  # a concurrent setter may have won: use what stuck
            if not key1:
                raise StoreError("the account's Temp-URL-Key did not stick")
            return key1
        if want in (key1, key2):
            return want
        # keep an operator's own key working: take the free slot, else the second one
        header = "X-Account-Meta-Temp-URL-Key-2" if key1 else "X-Account-Meta-Temp-URL-Key"
        if key1 and key2:
            log.warning("replacing the account's Temp-URL-Key-2 with stackml's grant key")
        self._set_account_key(header, want)
        return want


def _is_segment(key: str) -> bool:
    return f"/{SEGMENTS_DIR}/" in key
