"""The local runtime's bytecode: compiled once, readable by every sandbox user.

A sandbox's user cannot write `__pycache__` in the shared runtime. When the only caches were
those a root process wrote under the platform's umask 077 (directories of mode 0700), every
TensorFlow process on a sandbox compiled TensorFlow from source (~7 s of CPU at each start).
`ensure_runtime` builds with the bytecode and repairs a runtime built without it, once."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

from service import runtime
from service.config import Settings


def _fake_runtime(tmp_path: Path) -> tuple[Settings, Path, Path]:
    """A built runtime (`.complete`) as an older build left it: a module without bytecode, and
    a package whose cache a umask-077 process wrote (0700 directory, 0600 file)."""
    settings = Settings(data_dir=tmp_path / "data", runtime_root=tmp_path / "runtimes")
    target = runtime.runtime_path(settings, settings.default_runtime)
    site = target / "lib" / "python3" / "site-packages"
    (site / "pkg").mkdir(parents=True)
    (target / "bin").mkdir()
    (target / "bin" / "python").symlink_to(sys.executable)
    (site / "pkg" / "__init__.py").write_text("")
    (site / "pkg" / "mod.py").write_text("VALUE = 1\n")
    cache = site / "pkg" / "__pycache__"
    cache.mkdir(mode=0o700)
    old = cache / f"__init__.{sys.implementation.cache_tag}.pyc"
    old.write_bytes(b"")
    old.chmod(0o600)
    (target / ".complete").write_text("0\n")
    return settings, target, site


def _others_read(p: Path) -> bool:
    mode = p.stat().st_mode
    need = stat.S_IROTH | (stat.S_IXOTH if p.is_dir() else 0)
    return mode & need == need


def test_a_runtime_built_without_bytecode_is_compiled_and_made_readable_once(
    tmp_path: Path,
) -> None:
    settings, target, site = _fake_runtime(tmp_path)
    said: list[str] = []
    python = runtime.ensure_runtime(settings, settings.default_runtime, echo=said.append)
    assert python == target / "bin" / "python"
    cache = site / "pkg" / "__pycache__"
    compiled = cache / f"mod.{sys.implementation.cache_tag}.pyc"
    assert compiled.is_file()
    for p in (cache, compiled, *cache.iterdir()):
        assert _others_read(p), oct(p.stat().st_mode)
    marker = target / runtime.COMPILED
    assert marker.is_file() and said and "bytecode compiled" in said[0]
    # done once: the next call reads the marker and compiles nothing
    before = marker.stat().st_mtime_ns
    (site / "pkg" / "late.py").write_text("X = 2\n")
    runtime.ensure_runtime(settings, settings.default_runtime)
    assert marker.stat().st_mtime_ns == before
    assert not (cache / f"late.{sys.implementation.cache_tag}.pyc").exists()


def test_a_runtime_it_may_not_repair_still_runs(tmp_path: Path) -> None:
    """A caller that may not write the runtime's directory (another user than its owner) gets
    the python, not an error; the owner's next call repairs it."""
    settings, target, _ = _fake_runtime(tmp_path)
    settings.runtime_dir.chmod(0o555)
    try:
        if os.access(settings.runtime_dir, os.W_OK):  # root writes anyway: take the lock away
            (settings.runtime_dir / f".{settings.default_runtime}.lock").mkdir()
        python = runtime.ensure_runtime(settings, settings.default_runtime)
    finally:
        settings.runtime_dir.chmod(0o755)
    assert python == target / "bin" / "python"
    assert not (target / runtime.COMPILED).exists()
