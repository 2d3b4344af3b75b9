"""`stackml-dashboard-enable`: copy the plugin's enabled files into a Horizon's
openstack_dashboard/local/enabled/ (or the directory given), printing each file copied."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ENABLED = Path(__file__).resolve().parent / "enabled"


def enabled_files() -> list[Path]:
    return sorted(ENABLED.glob("_1[0-9][0-9][0-9]_*.py"))


def default_target() -> Path:
    import openstack_dashboard

    return Path(openstack_dashboard.__file__).resolve().parent / "local" / "enabled"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stackml-dashboard-enable", description=__doc__)
    parser.add_argument(
        "target",
        nargs="?",
        type=Path,
        help="Horizon's enabled directory (default: openstack_dashboard/local/enabled)",
    )
    parser.add_argument("--remove", action="store_true", help="remove the files instead")
    args = parser.parse_args(argv)
    target: Path = args.target or default_target()
    if not target.is_dir():
        print(f"no such directory: {target}", file=sys.stderr)
        return 1
    for src in enabled_files():
        dst = target / src.name
        if args.remove:
            dst.unlink(missing_ok=True)
            print(f"removed {dst}")
        else:
            shutil.copyfile(src, dst)
            print(f"{src.name} -> {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
