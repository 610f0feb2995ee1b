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


def test_each_span_is_written_as_json_dumps_would_write_its_event(tmp_path: Path) -> None:
    """The spans' events are formatted directly (not a dict each through `json.dumps`): the file reads back
    as the events' dicts would, byte for byte, whatever the values (non-ASCII, quotes, None, floats)."""
    spans = [
        ("caf\u00e9 \"x\"\\y:0-1", "committed", -1, 10.25, 10.5, 3, 3, None, 0),
        ("\U0001f600:1-2", "failed", -2, 10.0, 11.0, 5, 0, "boom\n\u00e9", None),
        ("b:0-1", "failed", 0, 12.5, 12.0000004, None, 0, "x", 7),
        ("c:0-1", "committed", 3, 13.0, 14.0, 2**40, 1.5, None, True),
    ]
    path = tmp_path / "timeline.json"
    write_timeline(str(path), spans)
    origin = 10.0
    events = [{"name": s[0], "cat": s[1], "ph": "X", "pid": 0, "tid": s[2], "ts": round((s[3] - origin) * 1e6),
               "dur": round((s[4] - s[3]) * 1e6),
               "args": {"rows_in": s[5], "rows_out": s[6], "error": s[7], "call": s[8]}} for s in spans]
    events += [{"name": "thread_name", "ph": "M", "pid": 0, "tid": t, "args": {"name": f"replica {t}"}}
               for t in (-2, -1, 0, 3)]
    assert path.read_bytes() == b'{"traceEvents":[' + ",".join(json.dumps(e) for e in events).encode() + b"]}"
