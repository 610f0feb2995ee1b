"""The output's committed state: `_manifest.json` + `_journal/`, resume decisions and `_SUCCESS`.

The truth about an output is its manifest with its journal applied (`State`):
every data file under the output is described by exactly one shard entry
(with its rows, size and sha256) or is on the way out (`retiring`). Replicas
record their commits in the journal before they publish; the driver records
the run's header when it begins, then confirmations and failures as they
arrive, and rewrites the manifest at the end of a run (compaction) and every
so many records during it (a mid-run checkpoint, never complete). Every entry
belongs to the job in the state's header (model sha256, prediction settings,
input): a commit record of another job is never committed, and a run that
begins with `overwrite` demotes every earlier entry. `_SUCCESS` is written
last, only when the output mirrors the current input: every planned shard
committed, rows reconciled, and every file of an older input version deleted.

    state.py        State: the manifest (+ segments) with the journal applied; a job's identity
    reconcile.py    which planned shards the output holds; stale and foreign files
    recorder.py     Recorder: one run's journal records, the manifest (checkpoint) and _SUCCESS
    journal.py      the journal's records          manifest.py   the root's format and checks
    entries.py      the columnar entry table       segments.py   Parquet segments of entries
    checkpoint.py   writing the root and changed segments

    >>> state = State.load(resolve("preds/"))  # doctest: +SKIP
    >>> sorted(state.files)[:1]
    ['part-0000-00000.parquet']
"""

from pipelines.commit.manifest import COMMITTED, FAILED, MANIFEST, PENDING, SUPERSEDED
from pipelines.commit.reconcile import (
    Listing,
    Reconciled,
    described_files,
    foreign_files,
    is_data_file,
    output_files,
    reconcile,
)
from pipelines.commit.recorder import Recorder, output_listing, remove_success
from pipelines.commit.state import (
    REJECTED_DIR,
    SOURCE_IDENTITY,
    SUCCESS,
    State,
    file_sha256,
    job_digest,
    prediction_settings,
    published_as_recorded,
    shard_entry,
)

__all__ = [
    "COMMITTED", "FAILED", "MANIFEST", "PENDING", "REJECTED_DIR", "SOURCE_IDENTITY", "SUCCESS", "SUPERSEDED",
    "Listing", "Reconciled", "Recorder", "State", "described_files", "file_sha256", "foreign_files",
    "is_data_file", "job_digest", "output_files", "output_listing", "prediction_settings", "published_as_recorded", "reconcile",
    "remove_success", "shard_entry",
]
