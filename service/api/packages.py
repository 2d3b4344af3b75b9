"""POST /v1/packages: take a trainer tarball over HTTP, check it is a safe .tar.gz, stage it.

Accepted bodies: the raw tarball as `application/gzip`, `application/x-gzip` or
`application/octet-stream` (name it with `?filename=`), or a `multipart/form-data` form whose
`file` field is the tarball. Anything else is 415. The body is spooled to a temporary file
(never held in memory), hashed, checked, then stored under
`projects/<project>/staging/<sha256[:16]>/<filename>`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import posixpath
import re
import tarfile
import tempfile
import zlib
from collections import deque
from pathlib import Path
from typing import IO

from flask import Blueprint, Response, jsonify, request
from werkzeug.utils import secure_filename

from service.api import ctx
from service.api.auth import current_project
from service.api.errors import InvalidPackage, UnsupportedMediaType, field_error, fields_failed
from service.api.guard import accepts_form
from service.domain.errors import PayloadTooLarge

bp = Blueprint("packages", __name__)

RAW_TYPES = frozenset({"application/gzip", "application/x-gzip", "application/octet-stream"})
DEFAULT_FILENAME = "package.tar.gz"
FILENAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
CHUNK = 1 << 20
MAX_MEMBERS = 100_000
# a gzip bomb is refused once it unpacks (or its members claim to unpack) to more than this
# many times the upload limit, or, past its first RATIO_FLOOR bytes, to more than MAX_RATIO
# times the compressed bytes read so far; both are checked while it is being decompressed
MAX_EXPANSION = 16
MAX_RATIO = 200
RATIO_FLOOR = 1 << 20
# symbolic links followed while resolving one path (Linux's own limit is 40)
MAX_LINK_HOPS = 40
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@bp.post("/v1/packages")
@accepts_form  # the dashboard's upload form (a cross-site one is refused by the guard)
def upload() -> tuple[Response, int]:
    c = ctx()
    project = current_project()
    limit = c.settings.max_package_bytes
    request.max_content_length = limit
    mimetype = request.mimetype
    tmp_dir = c.settings.data_dir / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=tmp_dir, prefix="package-", suffix=".tar.gz") as tmp:
        if mimetype == "multipart/form-data":
            part = request.files.get("file")
            if part is None:
                raise fields_failed([field_error("file", "the form needs a 'file' field")])
            filename = part.filename
            sha256, size = _spool(part.stream, tmp, limit)
        elif mimetype in RAW_TYPES:
            filename = request.args.get("filename")
            sha256, size = _spool(request.stream, tmp, limit)
        else:
            raise UnsupportedMediaType(
                "send the package as application/gzip or as the 'file' field of a "
                "multipart/form-data form",
                details={"content_type": mimetype or None},
            )
        if size == 0:
            raise InvalidPackage("the package is empty")
        verify_tarball(Path(tmp.name), max_unpacked=limit * MAX_EXPANSION)
        store = c.store_for(project)
        key = f"{store.project_prefix(project)}staging/{sha256[:16]}/{_filename(filename)}"
        store.put_file(key, tmp.name)
    return jsonify({"package_uri": store.uri(key), "sha256": sha256, "size": size}), 201


def _spool(src: IO[bytes], dst: IO[bytes], limit: int) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    while True:
        chunk = src.read(CHUNK)
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(
                f"the package is larger than {limit} bytes", details={"max_bytes": limit}
            )
        digest.update(chunk)
        dst.write(chunk)
    dst.flush()
    return digest.hexdigest(), size


def _filename(raw: str | None) -> str:
    name = secure_filename(raw or "")
    return name if FILENAME_RE.match(name) else DEFAULT_FILENAME


def verify_tarball(
    path: Path,
    *,
    max_unpacked: int,
    max_members: int = MAX_MEMBERS,
    max_ratio: int = MAX_RATIO,
) -> None:
    """Raise InvalidPackage unless `path` is a gzip-compressed tar whose members all stay
    inside the directory it is unpacked into (no absolute paths, `..`, links that lead out,
    even through other links, devices or FIFOs). The whole gzip stream is decompressed once,
    and the size and ratio limits stop it as soon as they are passed."""
    with open(path, "rb") as fh:
        if fh.read(2) != b"\x1f\x8b":
            raise InvalidPackage("the package is not gzip-compressed (expected a .tar.gz)")
        fh.seek(0)
        inflated = _Inflater(fh, max_out=max_unpacked, max_ratio=max_ratio)
        tree = _Tree()
        members = 0
        declared = 0
        try:
            with tarfile.open(fileobj=inflated, mode="r|") as tf:  # a stream: no seeking
                for m in tf:
                    members += 1
                    declared += max(0, m.size)
                    if members > max_members:
                        raise InvalidPackage(f"the package has more than {max_members} members")
                    if declared > max_unpacked:
                        raise InvalidPackage(
                            f"the package unpacks to more than {max_unpacked} bytes",
                            details={"max_unpacked_bytes": max_unpacked},
                        )
                    problem = _member_problem(m)
                    if problem:
                        raise InvalidPackage(
                            f"unsafe member {m.name!r}: {problem}",
                            details={"member": m.name, "problem": problem},
                        )
                    tree.add(m)
            inflated.drain()  # what follows the archive counts too (and the gzip CRC)
        except (tarfile.TarError, gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise InvalidPackage(f"the package is not a valid .tar.gz: {e}") from e
    if members == 0:
        raise InvalidPackage("the package contains no files")
    tree.check()


class _Counting(io.RawIOBase):
    """A readable file that counts the bytes read from it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self._raw.read(len(b))
        n = len(data)
        b[:n] = data
        self.count += n
        return n


class _Inflater(io.RawIOBase):
    """The decompressed bytes of a gzip file, refused (InvalidPackage) as soon as there are more
    than `max_out` of them, or, past RATIO_FLOOR, more than `max_ratio` per compressed byte."""

    def __init__(self, raw: IO[bytes], *, max_out: int, max_ratio: int) -> None:
        self._compressed = _Counting(raw)
        self._gz = gzip.GzipFile(fileobj=self._compressed, mode="rb")
        self.max_out = max_out
        self.max_ratio = max_ratio
        self.out = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = self._gz.readinto(b)
        self.out += n
        if self.out > self.max_out:
            raise InvalidPackage(
                f"the package unpacks to more than {self.max_out} bytes",
                details={"max_unpacked_bytes": self.max_out},
            )
        read = max(1, self._compressed.count)
        if self.max_ratio and self.out > RATIO_FLOOR and self.out > self.max_ratio * read:
            raise InvalidPackage(
                f"the package expands more than {self.max_ratio} times when unpacked "
                "(a decompression bomb?)",
                details={"max_ratio": self.max_ratio},
            )
        return n

    def drain(self) -> None:
        buf = bytearray(CHUNK)
        while self.readinto(buf):
            pass


class _Tree:
    """The package's links, to resolve every path through them as the file system would
    after extraction (a link to a link to `..` leads out, whatever each one says lexically)."""

    def __init__(self) -> None:
        self.symlinks: dict[str, str] = {}
        self.hardlinks: dict[str, str] = {}
        self.names: list[str] = []
        self.kinds: dict[str, str] = {}

    def add(self, m: tarfile.TarInfo) -> None:
        name = _norm(m.name)
        kind = "symlink" if m.issym() else "other"
        if self.kinds.setdefault(name, kind) != kind or (
            m.issym() and self.symlinks.get(name, m.linkname) != m.linkname
        ):
            raise InvalidPackage(
                f"unsafe member {m.name!r}: it is in the package twice, once as a link",
                details={"member": m.name, "problem": "member defined twice, once as a link"},
            )
        self.names.append(name)
        if m.issym():
            self.symlinks[name] = m.linkname
        elif m.islnk():
            self.hardlinks[name] = m.linkname

    def check(self) -> None:
        for name in self.names:
            parent = posixpath.dirname(name)
            if parent and self._leads_out(parent):
                self._refuse(name, "its directory is a link pointing outside the package")
        for name, target in self.symlinks.items():
            if self._leads_out(posixpath.join(posixpath.dirname(name), target)):
                self._refuse(name, "symbolic link leading outside the package through links")
        for name, target in self.hardlinks.items():
            if self._leads_out(target):
                self._refuse(name, "hard link leading outside the package through links")

    @staticmethod
    def _refuse(name: str, problem: str) -> None:
        raise InvalidPackage(
            f"unsafe member {name!r}: {problem}", details={"member": name, "problem": problem}
        )

    def _leads_out(self, path: str) -> bool:
        """Whether `path` (relative to the package root) resolves outside the root when every
        link on the way is followed; a chain longer than MAX_LINK_HOPS counts as out."""
        resolved: list[str] = []
        todo = deque(path.split("/"))
        hops = 0
        while todo:
            part = todo.popleft()
            if part in ("", "."):
                continue
            if part == "..":
                if not resolved:
                    return True
                resolved.pop()
                continue
            candidate = "/".join([*resolved, part])
            target = self.symlinks.get(candidate)
            if target is None:
                resolved.append(part)
                continue
            hops += 1
            if hops > MAX_LINK_HOPS or target.startswith("/"):
                return True
            todo.extendleft(reversed(target.split("/")))
        return False


def _norm(name: str) -> str:
    return "/".join(p for p in name.split("/") if p not in ("", "."))


def _escapes(path: str) -> bool:
    return path.startswith("/") or path == ".." or path.startswith("../")


def _member_problem(m: tarfile.TarInfo) -> str | None:
    name = m.name
    if _CONTROL.search(name) or "\\" in name:
        return "control character or backslash in its name"
    if name.startswith("/"):
        return "absolute path"
    if ".." in name.split("/"):
        return "'..' in its path"
    if m.issym():
        if _CONTROL.search(m.linkname) or m.linkname.startswith("/"):
            return "symbolic link to an absolute path"
        target = posixpath.normpath(posixpath.join(posixpath.dirname(name), m.linkname))
        if _escapes(target):
            return "symbolic link pointing outside the package"
    elif m.islnk():
        if _escapes(posixpath.normpath(m.linkname)) or _CONTROL.search(m.linkname):
            return "hard link pointing outside the package"
    elif not (m.isfile() or m.isdir()):
        return "device, FIFO or other special file"
    return None
