"""`python -m pipelines` is the `batch-infer` CLI."""

from pipelines.cli import entry

entry()
