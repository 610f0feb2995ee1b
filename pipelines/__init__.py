"""batch-infer's driver side: config, planning, scheduling, commit, the API and the CLI.

    >>> import pipelines
    >>> report = pipelines.run(model="m.pt", input="features/", output="preds/")  # doctest: +SKIP
"""

from pipelines.config import JobConfig
from basis.errors import (
    BatchInferError,
    ClusterConnectError,
    ConfigError,
    InputError,
    LockHeldError,
    ModelError,
    OutputAccessError,
    OutputConflictError,
    ResourceError,
)
from pipelines.job import plan, run
from pipelines.prepare import Plan
from pipelines.report import RunReport
from pipelines.verifier import VerifyReport, verify

__all__ = [
    "BatchInferError",
    "ClusterConnectError",
    "ConfigError",
    "InputError",
    "JobConfig",
    "LockHeldError",
    "ModelError",
    "OutputAccessError",
    "OutputConflictError",
    "Plan",
    "ResourceError",
    "RunReport",
    "VerifyReport",
    "plan",
    "run",
    "verify",
]
