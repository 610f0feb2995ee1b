"""The errors batch-infer raises, one tree for the whole product.

    BatchInferError                 base class; never raised itself
    ├── ConfigError                 bad or unknown config key, bad value      (exit 2)
    ├── ModelError                  unreadable model, unsafe pickle, bad shapes (exit 2)
    ├── InputError                  no input, no input file that fits the model (exit 2)
    ├── OutputConflictError         output overlaps input, or holds another
    │                               model/config and `overwrite` is not set   (exit 2)
    ├── OutputAccessError           the output's storage refuses: a file where a
    │                               directory is needed, permission denied,
    │                               read-only file system, no space left, access
    │                               denied, no such bucket (exit 2 before any
    │                               shard ran, 1 after: committed shards are kept)
    ├── ResourceError               the cluster can never satisfy the replicas (exit 2)
    ├── ClusterConnectError         cannot connect to the Ray address given    (exit 2)
    └── LockHeldError               another run holds the output's lock        (exit 3)

Errors that concern one shard (a corrupt file, a schema mismatch, invalid rows
with ``invalid_rows: fail``) are not exceptions at the API surface: they are
recorded in the run report and the manifest, and the run exits 1.

`ShardDataError` is raised inside a replica for such a shard; it is not part of
the public tree, since it never escapes `run`. Neither is `StorageError`: a
storage operation that kept failing with a transient error (throttling,
timeouts, 5xx) after its retries. It is an infrastructure failure, not a data
error: the shard is retried (up to `max_attempts`), never recorded as bad data.
"""

from __future__ import annotations


class BatchInferError(Exception):
    """Base class of every error batch-infer raises to its caller."""

    exit_code = 2


class ConfigError(BatchInferError):
    """The job configuration is invalid: unknown key, bad value, missing key."""


class ModelError(BatchInferError):
    """The model file can't be loaded safely, or its layers don't chain."""


class InputError(BatchInferError):
    """The input as a whole can't be used: nothing found, or no file fits the model."""


class OutputConflictError(BatchInferError):
    """The output can't be written: it overlaps the input or holds another job's results."""


class OutputAccessError(BatchInferError):
    """The output's storage refuses to be written (or read): the message names the path and why.

    `exit_code` is 2 when no shard had run yet (nothing but the lock was written), 1 after.
    """

    def __init__(self, message: str, *, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ResourceError(BatchInferError):
    """The cluster can never provide the resources the replicas ask for."""


class ClusterConnectError(BatchInferError):
    """Connecting to the Ray cluster named by `address` (or RAY_ADDRESS) failed."""


class LockHeldError(BatchInferError):
    """Another run holds the output's lock."""

    exit_code = 3


class ShardDataError(Exception):
    """A data problem confined to one shard (not retried; the shard fails).

    The message names the input file and, where known, the column and row group.
    """


class StorageError(Exception):
    """A storage operation that kept failing with a transient error after its retries.

    Infrastructure, not data: the shard holding it is retried like one whose replica died.
    """
