"""xwhep: a secured desktop-grid and virtualization middleware after XtremWeb-HEP."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("xwhep")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

__all__ = ["Client", "Executor", "XwError", "__version__"]


def __getattr__(name: str) -> object:
    # The SDK is imported on first use only, so that the pure core never drags the HTTP stack in.
    if name in ("Client", "XwError"):
        from xwhep.client import sdk

        return getattr(sdk, name)
    if name == "Executor":  # the concurrent.futures bridge (needs the "executor" extra: cloudpickle)
        from xwhep.bridges.executor import Executor

        return Executor
    raise AttributeError(name)
