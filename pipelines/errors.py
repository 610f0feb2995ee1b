"""The exceptions users catch (`pipelines.ConfigError`, ...), importable here as before.

They are defined in `basis.errors`, the floor the actor side shares with the driver.
"""

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
    ShardDataError,
    StorageError,
)

__all__ = ["BatchInferError", "ClusterConnectError", "ConfigError", "InputError", "LockHeldError", "ModelError",
           "OutputAccessError", "OutputConflictError", "ResourceError", "ShardDataError", "StorageError"]
