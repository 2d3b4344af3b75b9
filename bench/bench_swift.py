"""Benchmark: model export to real Swift -- the runner (TempURL PUTs, SLO segments, manifests
by the worker) vs python-swiftclient's own segmented upload (SwiftService.upload, SLO).

    .venv/bin/python bench/bench_swift.py [--big 3] [--big-mib 64] [--small 200] [--rounds 3]

Starts a devcloud (real Keystone + real Swift) on free loopback ports in a scratch directory,
writes one model directory (`--big` files of `--big-mib` MiB plus `--small` small files), and
uploads it in interleaved rounds with both clients: the same bytes, the same segment size, the
runner's upload thread count (EXPORT_THREADS) for swiftclient's pools, and every container
(swiftclient's `<container>_segments` too) created before the clock starts on both sides. The
figure is the ratio of median throughputs runner/swiftclient (target >= 0.9). The last line is
JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devcloud.cloud import DevCloud, default_venv_root
from service.backends.interfaces import Access, ObjectInfo
from service.backends.storage.swift import SwiftStore
from workers.vm.runner import EXPORT_THREADS

RUNNER = Path(__file__).resolve().parents[1] / "workers" / "vm" / "runner.py"
CACHED_VENVS = Path("/var/cache/stackml/devcloud-venvs")
SEGMENTS_SUFFIX = "_segments"  # where SwiftService.upload puts SLO segments by default


def make_model(root: Path, big: int, big_mib: int, small: int) -> int:
    model = root / "model"
    (model / "variables").mkdir(parents=True)
    (model / "assets").mkdir()
    total = 0
    block = os.urandom(1 << 20)
    for i in range(big):
        with open(model / "variables" / f"variables.data-{i:05d}-of-{big:05d}", "wb") as fh:
            for j in range(big_mib):
                fh.write(bytes([i, j % 256]) + block[2:])  # distinct segments, cheap to make
        total += big_mib << 20
    for i in range(small):
        data = os.urandom(1024 + (i * 7919) % (64 * 1024))
        (model / "assets" / f"part-{i:04d}.bin").write_bytes(data)
        total += len(data)
    return total


def runner_export(store: SwiftStore, job_dir: Path, prefix: str) -> float:
    """Seconds for the runner's export plus the worker's manifests (what a job pays)."""
    grant = store.grant(prefix, Access.WRITE, 3600)
    doc = {
        "url_prefix": grant.url_prefix,
        "query": grant.query,
        "segment_bytes": grant.segment_bytes,
    }
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(RUNNER), "export", str(job_dir)],
        input=json.dumps(doc),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"runner export failed: {proc.stderr}")
    objects = json.loads(proc.stdout.strip().splitlines()[-1])["objects"]
    for obj in objects:
        if obj.get("segments"):
            segs = [ObjectInfo(prefix + s["key"], s["size"], s["etag"]) for s in obj["segments"]]
            store.put_manifest(prefix + obj["key"], segs, expected_etag=obj["etag"])
    elapsed = time.perf_counter() - t0
    listed = {o.key: o for o in store.list(prefix)}
    for obj in objects:
        got = listed[prefix + obj["key"]]
        assert (got.etag, got.size) == (obj["etag"], obj["size"]), obj["key"]
    return elapsed


def swiftclient_upload(store: SwiftStore, job_dir: Path, container: str, segment: int) -> float:
    """Seconds for SwiftService.upload of the same files, with the same segment size and the
    runner's thread count, into containers created before the clock starts (the runner's
    container is created by the grant, also before its clock)."""
    from swiftclient.service import SwiftService, SwiftUploadObject

    # a Keystone token and the storage URL (swiftclient's v3 auth would need keystoneclient)
    options = {
        "os_auth_token": store.session.get_token(),
        "os_storage_url": store.endpoint,
        "segment_size": segment,
        "use_slo": True,
        # the runner uploads every part (segments and small files) through one pool of
        # EXPORT_THREADS; swiftclient has two pools (objects, segments): each gets as many
        "object_uu_threads": EXPORT_THREADS,
        "segment_threads": EXPORT_THREADS,
    }
    model = job_dir / "model"
    files = sorted(p for p in model.rglob("*") if p.is_file())
    objs = [SwiftUploadObject(str(p), object_name=str(p.relative_to(model))) for p in files]
    with SwiftService(options=options) as svc:
        for name in (container, f"{container}{SEGMENTS_SUFFIX}"):
            created = svc.post(container=name)
            if not created["success"]:
                raise SystemExit(f"creating container {name} failed: {created.get('error')}")
        t0 = time.perf_counter()
        for result in svc.upload(container, objs):
            if not result["success"]:
                raise SystemExit(f"swiftclient upload failed: {result.get('error')}")
        return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--big", type=int, default=3)
    ap.add_argument("--big-mib", type=int, default=64)
    ap.add_argument("--small", type=int, default=200)
    ap.add_argument("--segment-mib", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    segment = args.segment_mib << 20
    work = Path(tempfile.mkdtemp(prefix="bench-swift-", dir="/var/tmp"))
    venvs = CACHED_VENVS if CACHED_VENVS.exists() else default_venv_root()
    cloud = DevCloud(work / "devcloud", venv_root=venvs)
    try:
        cloud.up(keystone_port=0, swift_port=0, emulator_port=0, emulator=False)
        total = make_model(work / "job", args.big, args.big_mib, args.small)
        store = SwiftStore(cloud.connection("devcloud-stackml"), segment_bytes=segment)
        store.temp_url_key()
        runner_s, client_s = [], []
        for r in range(args.rounds):
            runner_s.append(runner_export(store, work / "job", f"stackml-bench/r{r}/"))
            client_s.append(swiftclient_upload(store, work / "job", f"stackml-sc{r}", segment))
            store.delete_prefix(f"stackml-bench/r{r}/")
            store.delete_prefix(f"stackml-sc{r}/")
            store.delete_prefix(f"stackml-sc{r}{SEGMENTS_SUFFIX}/")
        mb = total / 1e6
        r_med, c_med = statistics.median(runner_s), statistics.median(client_s)
        figures = {
            "bench": "swift_export",
            "bytes": total,
            "files": args.big + args.small,
            "segment_bytes": segment,
            "threads": EXPORT_THREADS,
            "runner_mb_s": round(mb / r_med, 1),
            "swiftclient_mb_s": round(mb / c_med, 1),
            "ratio": round(c_med / r_med, 3),
            "runner_s": [round(x, 3) for x in runner_s],
            "swiftclient_s": [round(x, 3) for x in client_s],
        }
        print(
            f"model: {args.big} x {args.big_mib} MiB + {args.small} small files "
            f"({mb:.0f} MB), segments of {args.segment_mib} MiB, {args.rounds} rounds, "
            f"{EXPORT_THREADS} upload threads, containers created before the clock on both sides"
        )
        print(f"  runner export (TempURL, SLO)      {figures['runner_mb_s']:8.1f} MB/s")
        print(f"  swiftclient SwiftService.upload   {figures['swiftclient_mb_s']:8.1f} MB/s")
        print(f"  ratio runner/swiftclient          {figures['ratio']:8.2f}x  (target >= 0.9)")
    finally:
        cloud.down()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
