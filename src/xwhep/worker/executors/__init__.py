"""Job executors: one small interface (:mod:`.base`), several ways to run a job (native bubblewrap sandbox, ...)."""

from xwhep.worker.executors.base import Executor, ExecutorError, JobOutcome, JobSpec, RunningJob

__all__ = ["Executor", "ExecutorError", "JobOutcome", "JobSpec", "RunningJob"]
