"""What a `Replica` is told: the run's `ReplicaJob` (sent once, at start-up), its states, and the sizes it
picks for itself from it (rows per forward pass, torch threads)."""

from __future__ import annotations

import dataclasses
import enum

from workers.modelfile import forward_share

_CPU_BATCH_BYTES = 16 << 20  # feature bytes per forward pass on CPU
_GPU_BATCH_ROWS = 1 << 20


@dataclasses.dataclass(frozen=True)
class ReplicaJob:
    """What every replica of a run needs to know (sent once, at start-up)."""

    model: str
    model_sha256: str
    input: str  # input URI as configured (its filesystem options included)
    output: str  # output root URI
    features: tuple[str, ...]
    passthrough: tuple[str, ...]
    list_column: bool
    width: int
    prediction_column: str
    keep_features: bool
    activation: str = "sigmoid"
    output_activation: str = "sigmoid"
    precision: str = "fp32"
    batch_size: int | None = None
    invalid_rows: str = "quarantine"
    cpus: float = 1.0
    rejected_dir: str = "_rejected"
    generation: int = 1  # of the journal records this run writes
    categorical: tuple[str, ...] = ()  # integer columns fed to a .pt2 program as (rows, k) int64 codes
    job_digest: str = ""  # of the run's header (model sha256, prediction settings, input): ties commits to it
    models: tuple[tuple[str, str, str], ...] = ()  # a model set: (column, model URI, sha256) per model
    provisional: bool = False  # started before the plan was done: no shard until `Replica.configure` gives it

    def same_start(self, other: ReplicaJob) -> bool:
        """Whether a replica started with `other` serves this job once configured: the same model(s), storage,
        precision, width and CPUs (what it loads and sizes at start-up); only the plan's fields differ."""
        planned = {name: getattr(self, name) for name in _PLANNED}
        return dataclasses.replace(other, **planned) == self

    @property
    def members(self) -> tuple[tuple[str, str, str], ...]:
        """(prediction column, model URI, sha256) of each model this job scores: a set's, or the one model's."""
        return self.models or ((self.prediction_column, self.model, self.model_sha256),)


# What the plan decides (columns from the inputs' footers, the journal's generation, the job's digest): a
# replica started while the driver plans gets them later (`Replica.configure`).
_PLANNED = ("features", "passthrough", "list_column", "prediction_column", "keep_features", "rejected_dir",
            "generation", "job_digest", "provisional")


class State(enum.Enum):
    READY = "ready"
    CLOSED = "closed"


class Abandoned(RuntimeError):
    """The driver gave this replica up while it held a shard (see `Replica.abandon`): nothing is committed."""


def default_batch_size(width: int, on_gpu: bool) -> int:
    """Rows per forward pass when the config leaves it to the system."""
    if on_gpu:
        return _GPU_BATCH_ROWS
    return max(4096, min(262_144, _CPU_BATCH_BYTES // (4 * max(1, width))))


def torch_threads(cpus: float, layers: tuple[tuple[int, int, bool], ...]) -> int:
    """Threads for a CPU forward pass run in the shard's loop: the replica's CPUs in proportion to the forward's
    share of the work.

    The replica's other threads decode, stack and write; a forward that is a small part
    of the work (64->16->1) runs fastest on one thread (measured 2.99M rows/s against
    2.19M with two, on 2 CPUs), a large one (64->256->256->1) on all of them (0.69M
    against 0.52M). A model that allows it runs in the decoding threads instead, one torch
    thread each (`Forward.side_by_side`), unless a shard has fewer row groups than them.

    Example:
        >>> torch_threads(2, ((64, 16, True), (16, 1, True)))
        1
        >>> torch_threads(2, ((64, 256, True), (256, 256, True), (256, 1, True)))
        2
    """
    return max(1, min(int(cpus), round(int(cpus) * forward_share(layers))))
