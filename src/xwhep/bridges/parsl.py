"""A Parsl executor backed by xwhep: ``@python_app`` functions of a Parsl workflow run as xwhep works.

Why an executor, not a provider: a Parsl *provider* starts blocks of Parsl's own workers (HighThroughputExecutor
workers) that connect back to the workflow's interchange over the network; xwhep jobs run with no network at all
(only their own loopback), and a volunteer's worker only ever connects out to the xwhep server. So the natural fit
is the other layer: Parsl keeps its DataFlowKernel (dependencies, retries, memoization) in the workflow's process,
and each ready task goes to :class:`xwhep.Executor` as a work, its result coming back through the repository.

    from parsl.config import Config
    from xwhep.bridges.parsl import XwhepExecutor

    parsl.load(Config(executors=[XwhepExecutor(config="~/xwhome/admin.conf")]))

What does not carry over: ``bash_app`` and file staging (a job cannot reach the workflow's files: pass data by
value, or choose an ``app`` whose image has what the tasks need, Parsl included for bash apps), Parsl's resource
monitoring (no network in a job). ``walltime=`` becomes the work's wall-clock limit; a task's
``parsl_resource_specification`` may carry work options (``wallclock``, ``requirements``, ``min_memory``, …).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from parsl.app.errors import wrap_error
from parsl.app.python import timeout
from parsl.executors.base import ParslExecutor
from parsl.executors.errors import InvalidResourceSpecification
from parsl.utils import RepresentationMixin

from xwhep.bridges.executor import WORK_OPTIONS, Executor
from xwhep.client.sdk import Client

__all__ = ["XwhepExecutor"]

# Parsl wraps every python_app in wrap_error (exceptions returned as a value, to be re-raised by the
# DataFlowKernel) and, given a walltime, in timeout(): both are closures whose body imports parsl, which a job's
# Python does not have. They are recognised by their code objects and taken off; the work's own exception and
# wall clock do the same job.
_WRAP_ERROR_CODE = wrap_error(lambda: None).__code__
_TIMEOUT_CODE = timeout(lambda: None, 1).__code__


def _closure(func: Callable[..., Any]) -> dict[str, Any]:
    cells = getattr(func, "__closure__", None) or ()
    return dict(zip(func.__code__.co_freevars, (c.cell_contents for c in cells), strict=True))


def unwrap(func: Callable[..., Any]) -> tuple[Callable[..., Any], float | None]:
    """The app's own function under Parsl's wrappers, and the walltime one of them carried (None without)."""
    walltime = None
    for _ in range(4):  # a wrapper inside a wrapper at most, in practice
        code = getattr(func, "__code__", None)
        if code is _TIMEOUT_CODE:
            cells = _closure(func)
            walltime = float(cells["seconds"])
            func = cells["f"]
        elif code is _WRAP_ERROR_CODE:
            func = func.__wrapped__  # type: ignore[attr-defined]
        else:
            break
    return func, walltime


class XwhepExecutor(ParslExecutor, RepresentationMixin):
    """Run a Parsl workflow's python apps as works on an xwhep grid.

    ``config``: an xwhep client config path (None: ``XW_CONFIG`` or the default); ``client``: an
    :class:`xwhep.Client` instead. ``app``, ``keep``, ``fetchers`` and the work options (``wallclock``,
    ``requirements``, ``min_memory``, ``max_retries``, …) are :class:`xwhep.Executor`'s.
    """

    def __init__(self, label: str = "xwhep", config: str | None = None, client: Client | None = None,
                 app: str | None = None, keep: bool = False, fetchers: int = 4,
                 work_options: dict[str, Any] | None = None, storage_access: list[Any] | None = None,
                 working_dir: str | None = None) -> None:
        super().__init__()
        self.label = label
        self.config = config
        self.client = client
        self.app = app
        self.keep = keep
        self.fetchers = fetchers
        self.work_options = dict(work_options or {})
        unknown = set(self.work_options) - WORK_OPTIONS
        if unknown:
            raise InvalidResourceSpecification(unknown, f"known work options: {', '.join(sorted(WORK_OPTIONS))}")
        self.storage_access = storage_access
        self.working_dir = working_dir
        self.executor: Executor | None = None

    def start(self) -> None:
        """Connect: the runner app is found or published, a session opened for the workflow's works."""
        self.executor = Executor(self.client if self.client is not None else self.config, app=self.app,
                                 keep=self.keep, fetchers=self.fetchers, label=f"parsl-{self.label}-{self.run_id}",
                                 **self.work_options)

    def submit(self, func: Callable[..., Any], resource_specification: dict[str, Any], *args: Any,
               **kwargs: Any) -> Future[Any]:
        """One task → one work; ``resource_specification`` holds work options for this task."""
        if self.executor is None:
            raise RuntimeError(f"executor {self.label} is not started")
        spec = dict(resource_specification or {})
        unknown = set(spec) - WORK_OPTIONS
        if unknown:
            raise InvalidResourceSpecification(unknown, f"known work options: {', '.join(sorted(WORK_OPTIONS))}")
        fn, walltime = unwrap(func)
        if walltime is not None:
            spec.setdefault("wallclock", max(1, math.ceil(walltime)))
        return self.executor.submit_with(spec, fn, *args, **kwargs)

    def shutdown(self) -> None:
        """Cancel what has not started, wait for the rest, leave the server clean (unless ``keep``)."""
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
        super().shutdown()

    def monitor_resources(self) -> bool:
        return False  # a job has no network to report to Parsl's monitoring
