"""The run's timeline (`--timeline`): written a chunk at a time, read back whole."""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.report import RunResults, write_timeline


def test_a_timeline_larger_than_a_chunk_is_written_whole_with_every_span(tmp_path: Path) -> None:
    done = RunResults(timeline=True)
    for i in range(12_000):  # ~2.5 MB of JSON: several chunks
        done.add({"id": f"d{i // 100:04d}/part-{i:06d}.parquet:0-1", "status": "committed", "replica": i % 2,
                  "started": 100.0 + i, "finished": 100.5 + i, "rows_in": 100, "rows_out": 100, "rows_rejected": 0,
                  "error": None, "call": i // 64}, "")
    done.add({"id": "bad:0-1", "status": "failed", "replica": 1, "started": 1.0, "finished": 2.0, "rows_in": 100, "rows_out": 0,
              "rows_rejected": 0, "error": "boom"}, "bad")
    path = tmp_path / "timeline.json"
    write_timeline(str(path), done.spans or [])
    events = json.loads(path.read_text())["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    assert len(spans) == 12_001
    assert spans[11_999]["name"] == "d0119/part-011999.parquet:0-1" and spans[11_999]["args"]["call"] == 187
    assert spans[-1]["cat"] == "failed" and spans[-1]["args"]["error"] == "boom" and spans[-1]["ts"] == 0
    assert sorted(e["tid"] for e in events if e["ph"] == "M") == [0, 1]
    assert [p.name for p in tmp_path.iterdir()] == ["timeline.json"]  # no temporary file left


def test_spans_read_back_as_added_non_ascii_ids_errors_and_odd_counts_included() -> None:
    """The spans are kept as columns (ids' bytes in one buffer, statuses as codes, errors only where
    there are some): each reads back as the tuple of what was added, in order."""
    from pipelines.report import Spans

    added = [
        {"id": "caf\u00e9/\u4e2d.parquet:0-1", "status": "committed", "replica": -1, "started": 1.5, "finished": 2.5,
         "rows_in": 3, "rows_out": 3, "error": None, "call": 0},
        {"id": "a:0-1", "status": "failed", "replica": -2, "started": 3.0, "finished": 4.0, "rows_in": 5,
         "rows_out": 0, "error": "storage: \U0001f600", "call": 1},
        {"id": "b:1-2", "status": "failed", "replica": 0, "started": 5.0, "finished": 6.0, "rows_in": 7,
         "rows_out": 0, "error": "no call"},  # no call: kept whole
        {"id": "", "status": "committed", "replica": 1, "started": 7.0, "finished": 8.0, "rows_in": 0,
         "rows_out": 0, "error": None, "call": 2},
    ]
    spans = Spans()
    for result in added:
        spans.append(result)
    assert len(spans) == 4
    assert list(spans) == [tuple(r.get(k) for k in RunResults._SPAN) for r in added]
