"""Bridges into xwhep: other programming models whose work runs on an xwhep grid.

:class:`Executor` (``xwhep.Executor``) is a :class:`concurrent.futures.Executor` whose calls run as works;
:mod:`xwhep.bridges.parsl` makes it a Parsl executor. Both need the ``executor`` extra (cloudpickle).
"""

from xwhep.bridges.executor import Executor, RemoteError, RemoteTraceback, WorkFailed

__all__ = ["Executor", "RemoteError", "RemoteTraceback", "WorkFailed"]
