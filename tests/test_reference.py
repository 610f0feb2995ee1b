"""The key table (`KEY_DOCS`) against the config, `--help` and the README's "Config reference".

Pure tests: no Ray, no data.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipelines import cli, reference
from pipelines.config import BOOL_KEYS, KEY_DOCS, LIST_KEYS, JobConfig, KeyDoc

ROOT = Path(__file__).resolve().parents[1]
BASE = {"model": "m.pt", "input": "in/", "output": "out/"}


def squeeze(text: str) -> str:
    """Text without whitespace: argparse re-wraps help (and breaks lines after hyphens)."""
    return re.sub(r"\s+", "", text)


def test_key_docs_cover_exactly_the_config_keys_in_order() -> None:
    assert [doc.key for doc in KEY_DOCS] == list(JobConfig.keys())
    assert set(BOOL_KEYS) | set(LIST_KEYS) <= set(JobConfig.keys())


@pytest.mark.parametrize("doc", KEY_DOCS, ids=lambda doc: doc.key)
def test_key_doc_is_complete_and_true_to_the_validation(doc: KeyDoc) -> None:
    assert doc.meaning and doc.default and not doc.meaning.endswith(".")
    assert "|" not in doc.meaning + doc.default, "a pipe would split the README's table row"
    if doc.key in BOOL_KEYS:
        assert not doc.metavar and not doc.choices
    else:
        assert doc.metavar or doc.choices, f"--{doc.key} would show a bare VALUE"
    for choice in doc.choices:  # each accepted value is named in the text, and accepted
        assert f"`{choice}`" in doc.meaning
        JobConfig.from_dict({**BASE, doc.key: choice})
    if doc.choices:
        with pytest.raises(Exception, match=doc.key):
            JobConfig.from_dict({**BASE, doc.key: "no-such-choice"})


def test_readme_config_reference_is_generated_from_the_key_table() -> None:
    readme = (ROOT / "README.md").read_text()

    assert reference.section(readme) == reference.markdown(), (
        "README.md's config reference differs from KEY_DOCS in pipelines/config.py; regenerate it with "
        f"`{reference.REGENERATE}` (from the repository root) and commit README.md"
    )


def test_reference_update_replaces_only_the_table(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{reference.START}\n| old |\n{reference.END}\n\ntail\n")

    assert reference.main([str(readme), "--check"]) == 1
    assert reference.main([str(readme)]) == 0
    assert readme.read_text() == f"# x\n\n{reference.START}\n{reference.markdown()}{reference.END}\n\ntail\n"
    assert reference.main([str(readme), "--check"]) == 0
    with pytest.raises(ValueError, match="config-reference:start"):
        reference.update("# no markers\n")


@pytest.mark.parametrize("command", ["run", "plan"])
def test_help_gives_every_key_its_meaning_and_default_in_80_columns(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "80")

    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    text = capsys.readouterr().out

    assert exit_info.value.code == 0
    long_lines = [line for line in text.splitlines() if len(line) > 80]
    assert not long_lines, long_lines
    assert not re.search(r"--[a-z-]+ VALUE\b", text), "a config flag still shows a bare VALUE"
    flat = squeeze(text)
    for doc in KEY_DOCS:
        flag = "--" + doc.key.replace("_", "-")
        assert flag in text
        assert squeeze(doc.plain(doc.meaning)) in flat, doc.key
        if doc.default == "required":
            assert squeeze(f"{doc.plain(doc.meaning)}. Required") in flat, doc.key
        else:
            assert squeeze(f"{doc.plain(doc.meaning)}. Default: {doc.plain(doc.default)}.") in flat, doc.key
    for choices in ("{sigmoid,relu,tanh,none}", "{fp32,tf32,bf16,fp16}", "{quarantine,fail,keep}"):
        assert choices in text


def test_new_keys_are_flags() -> None:
    args = cli._parser().parse_args([
        "run", "--model", "m.pt", "--input", "in/", "--output", "out/", "--max-replicas", "4",
        "--start-timeout", "90", "--shared-storage",
    ])  # fmt: skip
    cfg = cli.build_config(args)

    assert (cfg.max_replicas, cfg.start_timeout, cfg.shared_storage) == (4, 90.0, True)
    args = cli._parser().parse_args(["plan", "--model", "m", "--input", "i", "--output", "o", "--no-shared-storage"])
    assert cli.build_config(args).shared_storage is False
