"""``python -m xwhep.vm build minimal|debian [--cache DIR] [--force]``: build (or find in the cache) a VM image
and print its manifest as JSON (what ``xw vm build`` will do)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from xwhep.vm.images import ImageError, build_debian, build_minimal, cache_dir


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (1 with one line on stderr when the image cannot be built)."""
    p = argparse.ArgumentParser(prog="python -m xwhep.vm", description="xwhep VM images, from Debian packages only")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build an image, or find it in the cache; print its manifest")
    b.add_argument("kind", choices=["minimal", "debian"])
    b.add_argument("--cache", type=Path, help=f"image cache (default {cache_dir()})")
    b.add_argument("--force", action="store_true", help="build again even if the cache has it")
    args = p.parse_args(argv)
    build = build_minimal if args.kind == "minimal" else build_debian
    try:
        image = build(args.cache, force=args.force)
    except (ImageError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(image.to_json(), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
