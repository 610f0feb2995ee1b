"""A small input file the driver planned without opening it (`pipelines.plan.settle_lazy`): its replica,
which reads the file whole anyway, checks it and plans its shards, with the driver's own rules
(`workers.fit`), so the manifest cannot tell it from a file the driver planned from its footer.

The task stands for the whole file: row groups (0, 0), rows_in 0, the first span's output name, and
`lazy`, the run's shard_rows. A file that does not fit (or whose footer cannot be read) is that
task's failed shard, with the message and record the driver's plan would have given it. A file that
fits is split by `split_row_groups`; each span is read, predicted and committed as a shard of its own
(its journal record, then its files), the first under the task's output name, the others under
`output_name(rel, first)`: no other input claims that stem (`settle_lazy`).

    >>> spans_of([100], shard_rows=1_000_000, rel="d/a.parquet", output="d/a-00000.parquet")
    [(0, 1, 100, 'd/a-00000.parquet')]
    >>> spans_of([600, 600], shard_rows=1000, rel="a.pq", output="a-00000.parquet")
    [(0, 2, 1200, 'a-00000.parquet')]
    >>> spans_of([600, 600, 5], shard_rows=1000, rel="a.pq", output="a-00000.parquet")
    [(0, 2, 1200, 'a-00000.parquet'), (2, 3, 5, 'a-00002.parquet')]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyarrow.parquet as pq

from workers.fit import misfit, output_name, split_row_groups


def spans_of(rows: Sequence[int], *, shard_rows: int, rel: str, output: str) -> list[tuple[int, int, int, str]]:
    """(first, stop, rows, output name) of each shard of a file of row groups of `rows` rows."""
    return [(first, stop, sum(rows[first:stop]), output if first == 0 else output_name(rel, first))
            for first, stop in split_row_groups(rows, shard_rows)]


def plan_file(parquet: pq.ParquetFile, task: dict[str, Any], job: Any, *,
              fits: bool = False) -> list[dict[str, Any]] | str:
    """The shards (tasks) of a lazy task's file, or why the file does not fit the job (`workers.fit.misfit`).

    `job`: the run's `ReplicaJob` (its columns). `fits`: the caller knows the file's schema fits the job
    (the same as a file's before that fit: many tiny files, one schema), so it is not checked again."""
    if not fits:
        read = list(dict.fromkeys([*job.passthrough, *job.features, *job.categorical]))
        error = misfit(parquet.schema_arrow, task["input"], read, job.features, job.list_column, job.width,
                       job.categorical)
        if error is not None:
            return error
    meta = parquet.metadata
    rows = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    tasks = []
    for first, stop, count, output in spans_of(rows, shard_rows=task["lazy"], rel=task["rel"], output=task["output"]):
        shard = {**task, "id": f"{task['rel']}:{first}-{stop}", "row_groups": (first, stop), "rows_in": count,
                 "output": output, "file_row_groups": len(rows)}
        del shard["lazy"]
        tasks.append(shard)
    return tasks
