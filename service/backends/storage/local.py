"""The local object store: a directory tree, with HMAC-signed prefix grants (see interfaces.py).

Layout under ``root``: each object is the file ``root/<key>``; ``root/.stackml/`` holds
temporary files and the etag sidecars (``.stackml/etag/<key>``), so it is not a valid
first key segment. Grants are Swift-style prefix TempURLs served by ``/v1/store``.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO
from urllib.parse import quote, urlencode

from service.backends.interfaces import Access, Grant, ObjectInfo, ObjectStore
from service.domain.errors import GrantDenied, StoreError

RESERVED = ".stackml"
MAX_KEY_LENGTH = 1024
CHUNK = 1 << 20
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# Which grant access signs which HTTP method (Swift signs the method itself).
METHOD_OF_ACCESS = {Access.READ: "GET", Access.WRITE: "PUT"}


def check_key(key: str, *, prefix: bool = False) -> str:
    """Return `key` if it is a safe relative object key (or, with `prefix`, a key prefix).

    Raises ValueError for absolute paths, `.`/`..`/empty segments, control characters
    and the reserved first segment."""
    if not isinstance(key, str) or not key:
        raise ValueError("an object key must be a non-empty string")
    if len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"an object key is at most {MAX_KEY_LENGTH} characters")
    if _CONTROL.search(key):
        raise ValueError("an object key must not contain control characters")
    if key.startswith("/") or "\\" in key:
        raise ValueError("an object key must be a relative path with '/' separators")
    parts = key.split("/")
    if prefix and parts[-1] == "":
        parts = parts[:-1]  # "a/b/" names everything under a/b
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError("an object key must not contain empty, '.' or '..' segments")
    if parts[0] == RESERVED:
        raise ValueError(f"{RESERVED!r} is reserved")
    return key


def sign(key: bytes, method: str, expires: int, prefix: str) -> str:
    """The TempURL signature: HMAC-SHA256 over "{method}\\n{expires}\\nprefix:{prefix}"."""
    body = f"{method}\n{expires}\nprefix:{prefix}".encode()
    return hmac.new(key, body, hashlib.sha256).hexdigest()


class LocalStore(ObjectStore):
    """See interfaces.py. Writes are atomic (temporary file + rename) and fsynced."""

    scheme = "local"

    def __init__(self, root: Path | str, base_url: str, signing_key: bytes) -> None:
        if not signing_key:
            raise ValueError("the local store needs a signing key")
        self.root = Path(root)
        self.base_url = base_url.rstrip("/")
        self._signing_key = signing_key
        self._tmp = self.root / RESERVED / "tmp"
        self._etags = self.root / RESERVED / "etag"
        # private: objects are 0600 in 0700 dirs, whatever the umask (sandboxes run as other
        # users on this machine and must read nothing here)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.root.stat().st_mode & 0o077:
            os.chmod(self.root, 0o700)
        for d in (self.root / RESERVED, self._tmp, self._etags):
            d.mkdir(mode=0o700, exist_ok=True)

    # -- paths --------------------------------------------------------------------------

    def path(self, key: str) -> Path:
        """The file that holds `key` (it may not exist)."""
        return self.root / check_key(key)

    def _etag_path(self, key: str) -> Path:
        return self._etags / key

    # -- writes -------------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> ObjectInfo:
        return self._write(key, [data])

    def put_file(self, key: str, path: str) -> ObjectInfo:
        with open(path, "rb") as fh:
            return self.put_stream(key, fh)

    def put_stream(
        self, key: str, stream: IO[bytes], expected_md5: str | None = None
    ) -> ObjectInfo:
        """Store what `stream` yields until EOF; with `expected_md5`, refuse a body whose md5
        differs (StoreError, nothing stored)."""
        return self._write(key, _chunks(stream), expected_md5)

    def _write(
        self, key: str, chunks: Iterable[bytes], expected_md5: str | None = None
    ) -> ObjectInfo:
        dest = self.path(key)
        md5 = hashlib.md5(usedforsecurity=False)
        size = 0
        tmp = self._tmp / f"{uuid.uuid4().hex}.part"
        try:
            with _private_file(tmp) as fh:
                for chunk in chunks:
                    md5.update(chunk)
                    size += len(chunk)
                    fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            etag = md5.hexdigest()
            if expected_md5 is not None and expected_md5.strip('"').lower() != etag:
                raise StoreError(
                    f"body md5 {etag} does not match the expected {expected_md5}",
                    reason="etag_mismatch",
                    details={"etag": etag},
                )
            st = tmp.stat()
            # the sidecar names the inode it describes, so a racing writer can't mislabel data
            self._atomic_text(self._etag_path(key), f"{etag} {st.st_size} {st.st_ino}\n")
            self._rename_into(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return ObjectInfo(key=key, size=size, etag=etag)

    def _atomic_text(self, dest: Path, text: str) -> None:
        tmp = self._tmp / f"{uuid.uuid4().hex}.meta"
        try:
            with _private_file(tmp) as fh:
                fh.write(text.encode())
            self._rename_into(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _rename_into(src: Path, dest: Path) -> None:
        # a concurrent delete may prune the parent between mkdir and rename: retry
        for attempt in range(5):
            try:
                dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.replace(src, dest)
                return
            except FileNotFoundError:
                if attempt == 4:
                    raise
            except (NotADirectoryError, IsADirectoryError, FileExistsError) as e:
                raise StoreError(
                    f"cannot store {dest.name}: a key and a prefix collide",
                    details={"path": str(dest)},
                ) from e

    # -- reads --------------------------------------------------------------------------

    def get(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
            raise KeyError(key) from e

    def info(self, key: str) -> ObjectInfo | None:
        """The object's size and etag, or None when there is no such object."""
        p = self.path(key)
        try:
            st = p.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not p.is_file():
            return None
        return ObjectInfo(key=key, size=st.st_size, etag=self._etag(key, p, st))

    def exists(self, key: str) -> bool:
        return self.info(key) is not None

    def _etag(self, key: str, p: Path, st: os.stat_result) -> str:
        try:
            etag, size, ino = self._etag_path(key).read_text().split()
            if int(size) == st.st_size and int(ino) == st.st_ino:
                return etag
        except (OSError, ValueError):
            pass  # missing or stale sidecar: recompute below
        md5 = hashlib.md5(usedforsecurity=False)
        with open(p, "rb") as fh:
            for chunk in _chunks(fh):
                md5.update(chunk)
        return md5.hexdigest()

    def list(self, prefix: str) -> list[ObjectInfo]:
        """Objects whose key starts with `prefix` (a plain string prefix, as in Swift)."""
        if prefix:
            check_key(prefix, prefix=True)
        base_dir = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root / base_dir if base_dir else self.root
        out = []
        for key in self._walk(start):
            if not key.startswith(prefix):
                continue
            try:
                info = self.info(key)
            except ValueError:
                continue  # a file no valid key names (put there by hand): not an object
            if info is not None:
                out.append(info)
        return sorted(out, key=lambda i: i.key)

    def _walk(self, start: Path) -> Iterator[str]:
        if not start.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(start):
            here = Path(dirpath)
            if here == self.root:
                dirnames[:] = [d for d in dirnames if d != RESERVED]
            for name in filenames:
                yield (here / name).relative_to(self.root).as_posix()

    # -- deletes ------------------------------------------------------------------------

    def delete(self, key: str) -> None:
        p = self.path(key)
        with contextlib.suppress(FileNotFoundError, NotADirectoryError, IsADirectoryError):
            p.unlink()
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            self._etag_path(key).unlink()
        self._prune(p.parent, self.root)
        self._prune(self._etag_path(key).parent, self._etags)

    @staticmethod
    def _prune(d: Path, stop: Path) -> None:
        while d != stop and stop in d.parents:
            try:
                d.rmdir()
            except OSError:
                return  # not empty (or already gone): stop climbing
            d = d.parent

    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under `prefix`; returns how many."""
        infos = self.list(prefix)
        for i in infos:
            self.delete(i.key)
        return len(infos)

    # -- grants -------------------------------------------------------------------------

    def grant(self, prefix: str, access: Access, ttl_seconds: int) -> Grant:
        check_key(prefix, prefix=True)
        if ttl_seconds <= 0:
            raise ValueError("a grant needs a positive ttl")
        access = Access(access)
        expires = int(time.time()) + int(ttl_seconds)
        sig = sign(self._signing_key, METHOD_OF_ACCESS[access], expires, prefix)
        query = urlencode(
            {"temp_url_sig": sig, "temp_url_expires": str(expires), "temp_url_prefix": prefix}
        )
        return Grant(
            prefix=prefix,
            access=access,
            expires_at=expires,
            url_prefix=f"{self.base_url}/v1/store/{quote(prefix)}",
            query=query,
        )

    @staticmethod
    def object_url(grant: Grant, relative_key: str) -> str:
        """The signed URL of one object under the grant (what a VM builds itself)."""
        return f"{grant.url_prefix}{quote(relative_key)}?{grant.query}"

    def verify(self, method: str, key: str, sig: str, expires: str | int, prefix: str) -> None:
        """Check a signed request for `key`; raises GrantDenied when it is not allowed.

        HEAD is allowed with a GET or a PUT signature, as in Swift."""
        method = method.upper()
        try:
            check_key(key)
            check_key(prefix, prefix=True)
        except ValueError as e:
            raise GrantDenied(f"invalid object key or prefix: {e}") from e
        try:
            exp = int(expires)
        except (TypeError, ValueError) as e:
            raise GrantDenied("temp_url_expires must be an integer") from e
        if exp < time.time():
            raise GrantDenied("the signed URL has expired", details={"expired_at": exp})
        if not key.startswith(prefix):
            raise GrantDenied("the object is outside the signed prefix")
        methods = ("GET", "PUT") if method == "HEAD" else (method,)
        if not isinstance(sig, str) or not sig:
            raise GrantDenied("temp_url_sig is missing")
        given = sig.encode("utf-8", "replace")
        for m in methods:
            if hmac.compare_digest(sign(self._signing_key, m, exp, prefix).encode(), given):
                return
        raise GrantDenied("the signature does not match")


def _private_file(path: Path) -> IO[bytes]:
    """A new file only its owner can read (0600, whatever the umask), open for writing."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "wb")


def _chunks(stream: IO[bytes]) -> Iterator[bytes]:
    while True:
        chunk = stream.read(CHUNK)
        if not chunk:
            return
        yield chunk
