"""The README's "Config reference" table, generated from `KEY_DOCS` so it cannot drift from `--help`.

    python -m pipelines.reference            # rewrite the table in ./README.md, between its markers
    python -m pipelines.reference --check    # exit 1 when the table there is stale
    python -m pipelines.reference --print    # print the table
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pipelines.config import KEY_DOCS

START = "<!-- config-reference:start -->"
END = "<!-- config-reference:end -->"
REGENERATE = "python -m pipelines.reference"


def markdown() -> str:
    """The table, one row per config key in SPEC order.

    Example:
        >>> markdown().splitlines()[2]
        '| `model` | required | path/URI of the model file: a `state_dict` (`.pt`/`.pth`) or `.safetensors` of Linear layers (BatchNorm1d folded), or a `torch.export` program (`.pt2`, dynamic batch) |'
    """
    rows = ["| key | default | meaning |", "|---|---|---|"]
    rows += [f"| `{doc.key}` | {doc.default} | {doc.meaning} |" for doc in KEY_DOCS]
    return "\n".join(rows) + "\n"


def section(text: str) -> str:
    """What `text` (a README) holds between the markers, without the marker lines."""
    start, end = _markers(text)
    return text[start:end]


def update(text: str) -> str:
    """`text` with the generated table between the markers."""
    start, end = _markers(text)
    return text[:start] + markdown() + text[end:]


def _markers(text: str) -> tuple[int, int]:
    start, end = text.find(START + "\n"), text.find(END)
    if start < 0 or end < start or text.count(START) != 1 or text.count(END) != 1:
        raise ValueError(f"the README needs exactly one {START} line and, after it, one {END} line")
    return start + len(START) + 1, end


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=REGENERATE, description="Regenerate the README's config reference table.")
    parser.add_argument("readme", nargs="?", default="README.md", help="the README to update (default README.md)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 when the README's table is stale")
    mode.add_argument("--print", action="store_true", help="print the table and write nothing")
    args = parser.parse_args(argv)
    if args.print:
        sys.stdout.write(markdown())
        return 0
    path = Path(args.readme)
    text = path.read_text()
    fresh = update(text)
    if args.check:
        if fresh != text:
            print(f"{path}: the config reference is stale; run `{REGENERATE}`", file=sys.stderr)
            return 1
        return 0
    if fresh != text:
        path.write_text(fresh)
        print(f"{path}: config reference updated")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
