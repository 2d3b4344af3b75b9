"""POST /v1/packages: safe .tar.gz trainer packages are staged in the project's store area."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import zlib

import pytest

from service.api.errors import InvalidPackage
from service.api.packages import verify_tarball

GZIP = "application/gzip"


def upload(client, data: bytes, ctype: str = GZIP, query: str = ""):
    return client.post(f"/v1/packages{query}", data=data, content_type=ctype)


def member(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def test_good_tarball_is_staged(client, tarball, store, spec):
    data = tarball({"trainer/__init__.py": b"", "trainer/task.py": b"print(1)\n"})
    resp = upload(client, data, query="?filename=my-trainer.tar.gz")
    assert resp.status_code == 201, resp.get_json()
    body = resp.get_json()
    sha = hashlib.sha256(data).hexdigest()
    assert body == {
        "package_uri": f"local://projects/local/staging/{sha[:16]}/my-trainer.tar.gz",
        "sha256": sha,
        "size": len(data),
    }
    assert store.get(store.key_of(body["package_uri"])) == data
    # and a job can use it straight away
    job = client.post("/v1/jobs", json=spec(body["package_uri"]))
    assert job.status_code == 202


@pytest.mark.parametrize("ctype", ["application/x-gzip", "application/octet-stream"])
def test_other_raw_types_and_default_name(client, tarball, ctype):
    resp = upload(client, tarball({"m.py": b"x=1\n"}), ctype)
    assert resp.status_code == 201
    assert resp.get_json()["package_uri"].endswith("/package.tar.gz")


def test_multipart_upload(client, tarball, store):
    data = tarball({"pkg/m.py": b"x=1\n"})
    resp = client.post(
        "/v1/packages",
        content_type="multipart/form-data",
        data={"file": (io.BytesIO(data), "../../etc/trainer.tgz")},
    )
    assert resp.status_code == 201, resp.get_json()
    uri = resp.get_json()["package_uri"]
    assert uri.endswith("/etc_trainer.tgz")  # the client's filename, made safe
    assert store.get(store.key_of(uri)) == data


def test_multipart_without_file_field(client, error_of):
    resp = client.post(
        "/v1/packages",
        content_type="multipart/form-data",
        data={"other": (io.BytesIO(b"x"), "x.tgz")},
    )
    err = error_of(resp, 422)
    assert err["details"]["fields"][0]["field"] == "file"


def test_links_inside_the_package_are_fine(client, tarball):
    data = tarball(
        {"pkg/a.py": b""},
        [
            member("pkg/b.py", tarfile.SYMTYPE, "a.py"),
            member("pkg/sub", tarfile.SYMTYPE, "../pkg"),
            member("pkg/c.py", tarfile.LNKTYPE, "pkg/a.py"),
        ],
    )
    assert upload(client, data).status_code == 201


@pytest.mark.parametrize(
    ("extra", "files"),
    [
        ([], {"../evil": b"x"}),
        ([], {"pkg/../../evil": b"x"}),
        ([], {"/etc/evil": b"x"}),
        ([member("pkg/link", tarfile.SYMTYPE, "../../etc/passwd")], {}),
        ([member("link", tarfile.SYMTYPE, "/etc/passwd")], {}),
        ([member("hard", tarfile.LNKTYPE, "../outside")], {}),
        ([member("dev", tarfile.CHRTYPE)], {}),
        ([member("blk", tarfile.BLKTYPE)], {}),
        ([member("fifo", tarfile.FIFOTYPE)], {}),
    ],
)
def test_unsafe_members_are_refused(client, tarball, error_of, store, extra, files):
    resp = upload(client, tarball({"ok.py": b"", **files}, extra))
    err = error_of(resp, 422, "invalid_package")
    assert err["details"]["member"]
    assert store.list("projects/") == []


@pytest.mark.parametrize(
    "data",
    [
        b"PK\x03\x04 this is a zip",
        gzip.compress(b"just some gzip'd text, not a tar"),
        b"\x1f\x8b\x08\x00truncated",
        gzip.compress(b""),
    ],
)
def test_not_a_tar_gz(client, error_of, data):
    error_of(upload(client, data), 422, "invalid_package")


def test_plain_tar_is_refused(client, error_of):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("a.py")
        tf.addfile(info, io.BytesIO(b""))
    error_of(upload(client, buf.getvalue()), 422, "invalid_package")


def test_empty_body(client, error_of):
    error_of(upload(client, b""), 422, "invalid_package")


def test_too_large(client, tarball, error_of, settings, store):
    data = tarball({"blob.bin": os.urandom(settings.max_package_bytes + 1024)})
    assert len(data) > settings.max_package_bytes
    error_of(upload(client, data), 413, "payload_too_large")
    multipart = client.post(
        "/v1/packages",
        content_type="multipart/form-data",
        data={"file": (io.BytesIO(data), "big.tar.gz")},
    )
    error_of(multipart, 413, "payload_too_large")
    assert store.list("projects/") == []


def test_gzip_bomb_is_refused(client, error_of, settings):
    big = tarfile.TarInfo("zeros.bin")
    big.size = settings.max_package_bytes * 20
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.addfile(big, io.BytesIO(bytes(big.size)))
    assert len(buf.getvalue()) < settings.max_package_bytes
    err = error_of(upload(client, buf.getvalue()), 422, "invalid_package")
    assert "unpacks to more" in err["message"]


@pytest.mark.parametrize(
    "ctype", ["application/json", "text/plain", "application/x-www-form-urlencoded"]
)
def test_wrong_content_type(client, tarball, error_of, ctype):
    error_of(upload(client, tarball({"a.py": b""}), ctype), 415, "unsupported_media_type")


def _tar_then_zeros(tail: int, *, truncate: bool) -> bytes:
    """A valid little tar, then `tail` zero bytes in the same gzip stream (after the archive's
    end, where the old check never looked); `truncate` cuts the gzip stream's last bytes off,
    so that only a check that reads to the end sees it is broken."""
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as tf:
        info = tarfile.TarInfo("trainer/task.py")
        info.size = 9
        tf.addfile(info, io.BytesIO(b"print(1)\n"))
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
    out = [comp.compress(tar.getvalue())]
    zeros = bytes(1 << 20)
    for _ in range(tail >> 20):
        out.append(comp.compress(zeros))
    out.append(comp.flush())
    data = b"".join(out)
    return data[:-64] if truncate else data


def test_a_decompression_bomb_is_stopped_while_it_is_read(client, error_of, settings, store):
    # 64 MiB of zeros after the archive: about 64 KiB compressed, under the upload limit
    data = _tar_then_zeros(64 << 20, truncate=True)
    assert len(data) < settings.max_package_bytes
    err = error_of(upload(client, data), 422, "invalid_package")
    # the ratio limit stopped it: decompressing to the end would have found the cut instead
    assert "expands more than" in err["message"], err
    assert err["details"] == {"max_ratio": 200}
    assert store.list("projects/") == []


def test_the_unpacked_size_counts_while_reading_and_after_the_archive(tmp_path):
    # the ratio check off: only the total-size limit can stop this one, and it must stop it
    # before the end of the stream (which is cut off: reading on would report that instead)
    path = tmp_path / "bomb.tar.gz"
    path.write_bytes(_tar_then_zeros(64 << 20, truncate=True))
    with pytest.raises(InvalidPackage, match="unpacks to more than 4194304 bytes"):
        verify_tarball(path, max_unpacked=4 << 20, max_ratio=0)
    path.write_bytes(_tar_then_zeros(2 << 20, truncate=False))
    verify_tarball(path, max_unpacked=4 << 20, max_ratio=0)  # under the limit: fine
    with pytest.raises(InvalidPackage, match="expands more than 200 times"):
        verify_tarball(path, max_unpacked=4 << 20)


@pytest.mark.parametrize(
    "links",
    [
        # lexically each stays inside; followed, `up` is the parent of the package root
        [("sub", "."), ("up", "sub/..")],
        [("a", "b"), ("b", "c"), ("c", "d/.."), ("d", "."), ("x", "a/etc")],
        # a link to a link to ../../etc (the second is refused on its own too)
        [("pkg/l1", "l2"), ("pkg/l2", "../sub/.."), ("sub", "."), ("pkg/esc", "l1/etc")],
        # a loop: no file system resolves it
        [("p", "q"), ("q", "p")],
    ],
)
def test_link_chains_are_resolved_not_read_lexically(client, tarball, error_of, store, links):
    extra = [member(name, tarfile.SYMTYPE, target) for name, target in links]
    err = error_of(upload(client, tarball({"ok.py": b""}, extra)), 422, "invalid_package")
    assert "link" in err["details"]["problem"]
    assert store.list("projects/") == []


def test_a_file_written_through_an_outward_link_is_refused(client, tarball, error_of):
    extra = [member("sub", tarfile.SYMTYPE, "."), member("up", tarfile.SYMTYPE, "sub/..")]
    data = tarball({"ok.py": b"", "up/evil.py": b"x"}, extra)
    err = error_of(upload(client, data), 422, "invalid_package")
    assert err["details"]["member"] == "up/evil.py"


def test_a_hard_link_through_an_outward_symlink_is_refused(client, tarball, error_of):
    extra = [
        member("sub", tarfile.SYMTYPE, "."),
        member("up", tarfile.SYMTYPE, "sub/.."),
        member("stolen", tarfile.LNKTYPE, "up/etc/passwd"),
    ]
    err = error_of(upload(client, tarball({"ok.py": b""}, extra)), 422, "invalid_package")
    assert "link" in err["details"]["problem"]


def test_inward_link_chains_are_fine(client, tarball):
    extra = [
        member("pkg/l1", tarfile.SYMTYPE, "l2"),
        member("pkg/l2", tarfile.SYMTYPE, "../pkg/data"),
        member("pkg/data", tarfile.SYMTYPE, "real"),
        member("alias", tarfile.SYMTYPE, "pkg"),
        member("alias2", tarfile.LNKTYPE, "alias/real/x.py"),
    ]
    data = tarball({"pkg/real/x.py": b"", "alias/y.py": b""}, extra)
    assert upload(client, data).status_code == 201
