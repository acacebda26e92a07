"""``python -m xwhep.bench``: the same as ``xw bench``."""

from xwhep.bench.runner import main

if __name__ == "__main__":
    raise SystemExit(main())
