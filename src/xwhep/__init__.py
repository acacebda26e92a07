"""xwhep: a secured desktop-grid and virtualization middleware after XtremWeb-HEP."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("xwhep")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
