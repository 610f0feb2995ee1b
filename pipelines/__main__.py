"""`python -m pipelines` is the `batch-infer` CLI."""

import sys

from pipelines.cli import main

sys.exit(main())
