"""The benchmark's one table (issue 8): per workload, batch-infer, the peers, the plain loop and the limit.

Pure functions of the measured rows (no Ray, no processes), so they are tested
on their own. Seconds are medians; the data- and compute-bound rows are
in-process times (Ray already started, as a user's driver has it), the small
job's row is whole-process times (interpreter start to exit), which is what a
user waits for. Ratios are throughput ratios of batch-infer:

- ``vs limit`` = limit seconds / batch-infer seconds (1.0 = at the machine's limit);
- ``vs best peer`` = the faster peer's seconds / batch-infer seconds (> 1 = ahead).

Peers are Ray Data and Daft; the plain loop and the limit are references, not peers.

Example:
    >>> row = summarise_row("data-bound 64->16->1", {"batch-infer": 10.0, "ray-data": 40.0, "limit": 8.0}, 1000)
    >>> row["vs_limit"], row["best_peer"], row["vs_best_peer"]
    (0.8, 'ray-data', 4.0)
"""

from __future__ import annotations

import statistics

from typing import Any

COLUMNS = ("batch-infer", "ray-data", "daft", "floor", "limit")
LABELS = {"batch-infer": "batch-infer", "ray-data": "Ray Data", "daft": "Daft", "floor": "plain loop", "limit": "limit"}
PEERS = ("ray-data", "daft")


def workload_label(description: str, widths: tuple[int, ...], rows: int, files: int, *, whole: bool) -> str:
    """``data-bound 64->16->1, 32M rows, 16 files`` (``whole``: ``..., whole process``).

    Example:
        >>> workload_label("small job, ...", (64, 16, 1), 100_000, 1, whole=True)
        'small job 64->16->1, 100k rows, 1 file, whole process'
    """
    kind = description.split(",")[0]
    text = f"{kind} {'->'.join(map(str, widths))}, {_count(rows)} rows, {files} file{'s' if files != 1 else ''}"
    return text + (", whole process" if whole else "")


def summarise_row(label: str, seconds: dict[str, float], rows: int,
                  steady: dict[str, float] | None = None, *, parallel_limit: float | None = None,
                  paired: float | None = None) -> dict[str, Any]:
    """One table row from the median seconds per system (systems not run are absent).

    ``steady``: batch-infer's median steady-state rows/s and start-up seconds
    (`steady_state`); with the limit it gives ``steady_vs_limit``, the steady
    rate as a fraction of the limit's, and with ``parallel_limit`` (the limit's
    seconds with every core running a copy of its loop: `benchmarks.limit.concurrent`)
    ``steady_vs_parallel_limit``. ``paired``: the median over repetitions of each one's steady rate
    against the limit measured right after it (`paired_ratio`), given as ``steady_vs_limit_paired``.
    """
    ours = seconds.get("batch-infer")
    peers = {name: seconds[name] for name in PEERS if name in seconds}
    best = min(peers, key=peers.__getitem__) if peers else None
    if steady is not None and "limit" in seconds:
        steady = {**steady, "steady_vs_limit": round(steady["rows_per_second"] * seconds["limit"] / rows, 3)}
        if parallel_limit:
            steady["steady_vs_parallel_limit"] = round(steady["rows_per_second"] * parallel_limit / rows, 3)
            steady["limit_scaling"] = round(seconds["limit"] / parallel_limit, 3)
        if paired is not None:
            steady["steady_vs_limit_paired"] = round(paired, 3)
    return {
        "metric": "summary",
        "workload": label,
        "rows": rows,
        "seconds": {name: round(seconds[name], 3) for name in COLUMNS if name in seconds},
        "batch_infer_rows_per_second": round(rows / ours) if ours else None,
        "vs_limit": round(seconds["limit"] / ours, 3) if ours and "limit" in seconds else None,
        "best_peer": best,
        "vs_best_peer": round(peers[best] / ours, 3) if ours and best else None,
        "steady": steady,
    }


def paired_ratio(steadies: list[dict[str, Any] | None], limits: list[float], rows: int) -> float | None:
    """The median of each repetition's steady rate against its own limit (``limits``: the limit's seconds
    measured right after that repetition's batch-infer run): this machine's speed drifts by 10-20% within
    minutes, and medians taken per arm compare runs made minutes apart. None without a pair.

    Example:
        >>> steadies = [{"rows_per_second": 4.0e6}, None, {"rows_per_second": 4.4e6}, {"rows_per_second": 4.2e6}]
        >>> paired_ratio(steadies, [6.4, 6.0, 6.0, 6.4], 32_000_000)  # 0.8, 0.825, 0.84
        0.825
    """
    ratios = [s["rows_per_second"] * limit / rows for s, limit in zip(steadies, limits) if s]
    return round(statistics.median(ratios), 3) if ratios else None


def steady_state(spans: list[dict[str, Any]], seconds: float) -> dict[str, Any] | None:
    """batch-infer's run split into start-up and steady state, from its shard spans (the run's timeline).

    ``spans``: one per shard, ``{"replica", "start", "end", "rows"}`` in seconds from the
    first shard's start. The steady state begins when every replica has committed its
    first shard (each has started, loaded its model and decoded a shard by then) and
    ends with the last shard; rows of a shard running across that moment count in
    proportion to the time inside. ``start_up_seconds`` is what the run took beyond
    doing all its rows at the steady rate: actor start, torch import, the first shards.

    Example:
        >>> spans = [{"replica": 0, "start": 0.0, "end": 2.0, "rows": 100},
        ...          {"replica": 0, "start": 2.0, "end": 3.0, "rows": 100},
        ...          {"replica": 0, "start": 3.0, "end": 4.0, "rows": 100}]
        >>> steady_state(spans, 4.5)
        {'rows_per_second': 100.0, 'start_up_seconds': 1.5, 'steady_from_seconds': 2.0}
    """
    if not spans:
        return None
    firsts = {}
    for span in sorted(spans, key=lambda s: s["end"]):
        firsts.setdefault(span["replica"], span["end"])
    begin, end = max(firsts.values()), max(s["end"] for s in spans)
    if end <= begin:
        return None
    inside = sum(s["rows"] * max(0.0, min(s["end"], end) - max(s["start"], begin)) / (s["end"] - s["start"])
                 for s in spans if s["end"] > s["start"])
    rate = inside / (end - begin)
    total = sum(s["rows"] for s in spans)
    return {"rows_per_second": round(rate, 1), "start_up_seconds": round(seconds - total / rate, 3),
            "steady_from_seconds": round(begin, 3)}


def render(rows: list[dict[str, Any]], notes: dict[str, str]) -> str:
    """A Markdown table (readable on a terminal, pastes into README) and its notes.

    ``notes``: ``{system: text}`` shown under the table, e.g. why Daft did not run
    (its cells then say ``n/a``) or which configuration was best.
    """
    head = [f"{LABELS[name]}" for name in COLUMNS]
    lines = [
        "| workload | " + " | ".join(head) + " | batch-infer vs limit | vs best peer |",
        "|---" * (len(COLUMNS) + 3) + "|",
    ]
    for row in rows:
        cells = []
        for name in COLUMNS:
            value = row["seconds"].get(name)
            if value is None:
                cells.append("n/a" if name in notes and name != "limit" else "-")
            elif name == "batch-infer" and row["batch_infer_rows_per_second"]:
                cells.append(f"{value:.2f} s ({_count(row['batch_infer_rows_per_second'], 2)} rows/s)")
            else:
                cells.append(f"{value:.2f} s")
        vs_limit = "-" if row["vs_limit"] is None else f"{row['vs_limit']:.2f}x"
        vs_peer = "-" if row["vs_best_peer"] is None else f"{row['vs_best_peer']:.2f}x ({LABELS[row['best_peer']]})"
        lines.append(f"| {row['workload']} | " + " | ".join(cells) + f" | {vs_limit} | {vs_peer} |")
    lines.append(
        "(medians; ratios are throughput ratios of batch-infer: limit s / batch-infer s, best peer s / batch-infer s;"
        " > 1 = batch-infer faster)"
    )
    for row in rows:
        steady = row.get("steady")
        if steady:
            share = f" = {steady['steady_vs_limit']:.2f}x the limit's rate" if "steady_vs_limit" in steady else ""
            if "steady_vs_parallel_limit" in steady:
                share += (f" ({steady['steady_vs_parallel_limit']:.2f}x the rate of the limit's loop run on every core"
                          f" at once, which reaches {steady['limit_scaling']:.2f}x of the limit)")
            if "steady_vs_limit_paired" in steady:
                share += (f"; {steady['steady_vs_limit_paired']:.2f}x as the median of each repetition against the"
                          f" limit measured right after it")
            lines.append(f"batch-infer, {row['workload']}: steady state {_count(steady['rows_per_second'], 2)} rows/s"
                         f"{share}; start-up (actor start, torch import, first shards) {steady['start_up_seconds']:.2f} s")
    lines += [f"{LABELS.get(name, name)}: {text}" for name, text in notes.items()]
    return "\n".join(lines)


def _count(n: float, digits: int = 0) -> str:
    """32_000_000 -> '32M', 100_000 -> '100k', 2_470_000 (digits=2) -> '2.47M'."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            text = f"{n / size:.{digits}f}" if digits else f"{n / size:.3g}"
            return text + suffix
    return f"{n:.0f}"
