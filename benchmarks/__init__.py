"""Issue 3's benchmark: batch-infer vs Ray Data vs a single-process floor.

Run it with ``make bench`` or ``python -m benchmarks.run --help``.
"""
