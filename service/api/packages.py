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
import posixpath
import re
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import IO

from flask import Blueprint, Response, jsonify, request
from werkzeug.utils import secure_filename

from service.api import ctx
from service.api.auth import current_project
from service.api.errors import InvalidPackage, UnsupportedMediaType, field_error, fields_failed
from service.domain.errors import PayloadTooLarge

bp = Blueprint("packages", __name__)

RAW_TYPES = frozenset({"application/gzip", "application/x-gzip", "application/octet-stream"})
DEFAULT_FILENAME = "package.tar.gz"
FILENAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
CHUNK = 1 << 20
MAX_MEMBERS = 100_000
# a gzip bomb is refused once its members claim more than this many times the upload limit
MAX_EXPANSION = 16
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@bp.post("/v1/packages")
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


def verify_tarball(path: Path, *, max_unpacked: int, max_members: int = MAX_MEMBERS) -> None:
    """Raise InvalidPackage unless `path` is a gzip-compressed tar whose members all stay
    inside the directory it is unpacked into (no absolute paths, `..`, outward links,
    devices or FIFOs)."""
    with open(path, "rb") as fh:
        if fh.read(2) != b"\x1f\x8b":
            raise InvalidPackage("the package is not gzip-compressed (expected a .tar.gz)")
    members = 0
    unpacked = 0
    try:
        with tarfile.open(path, mode="r:gz") as tf:
            for m in tf:
                members += 1
                unpacked += max(0, m.size)
                if members > max_members:
                    raise InvalidPackage(f"the package has more than {max_members} members")
                if unpacked > max_unpacked:
                    raise InvalidPackage(f"the package unpacks to more than {max_unpacked} bytes")
                problem = _member_problem(m)
                if problem:
                    raise InvalidPackage(
                        f"unsafe member {m.name!r}: {problem}",
                        details={"member": m.name, "problem": problem},
                    )
    except (tarfile.TarError, gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise InvalidPackage(f"the package is not a valid .tar.gz: {e}") from e
    if members == 0:
        raise InvalidPackage("the package contains no files")


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
