"""`batch-infer` (also `python -m pipelines`): run, plan, status, verify, demo.

The CLI only builds a `JobConfig` and calls the Python API. Exit codes:
0 success (also "nothing to do"), 1 some shards failed, 2 invalid config,
input or model, 3 the output is locked by another run, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import logging
import signal
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import yaml

from pipelines import interrupts
from pipelines.config import BOOL_KEYS, KEY_DOCS, LIST_KEYS, JobConfig, KeyDoc, read_yaml
from basis.errors import BatchInferError, ConfigError, StorageError
from basis.storage import redact

EXIT_OK, EXIT_FAILED_SHARDS, EXIT_INVALID, EXIT_LOCKED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _configure_logging(args.command, getattr(args, "verbose", False))
    # SIGTERM (cron timeouts, Kubernetes, `ray job stop`) unwinds like Ctrl-C: the manifest is
    # flushed, replicas are stopped and the lock is released before exiting 130.
    signal.signal(signal.SIGTERM, interrupts.terminate)
    try:
        return int(args.handler(args))
    except BatchInferError as exc:
        print(redact(f"batch-infer: error: {exc}"), file=sys.stderr)
        return exc.exit_code
    except StorageError as exc:  # the output's storage kept failing: nothing committed is lost; rerun
        print(redact(f"batch-infer: error: storage kept failing, rerun the same command: {exc}"), file=sys.stderr)
        return EXIT_FAILED_SHARDS
    except KeyboardInterrupt:
        print("batch-infer: interrupted; committed shards are kept, rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED


def entry() -> None:
    """The `batch-infer` command and `python -m pipelines`: `main`, then exit without tearing down.

    Everything the run owns is closed by then (Ray shut down, lock released, manifest
    and report written); what is left is the interpreter's teardown of torch and
    pyarrow, about half a second of a small job's wall time. Output streams and
    logging are flushed first.
    """
    code = main()
    for sig in (signal.SIGINT, signal.SIGTERM):  # the run is over: a signal now would only lose its exit code
        signal.signal(sig, signal.SIG_IGN)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batch-infer", description="Run PyTorch MLPs over Parquet on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a job (resumes: committed shards are skipped)")
    _add_job_arguments(run)
    run.add_argument("--report", metavar="PATH", help="write the run report as JSON to PATH")
    run.add_argument("--json", action="store_true", help="print the run report as JSON on stdout, and nothing else")
    run.add_argument("--timeline", metavar="PATH", help="write a Chrome-trace JSON of shard spans per replica")
    run.set_defaults(handler=_run)

    plan = commands.add_parser("plan", help="validate and print the shard plan; writes nothing")
    _add_job_arguments(plan)
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(handler=_plan)

    status = commands.add_parser("status", help="summarise an output's manifest")
    status.add_argument("output", help="output directory or URI")
    status.add_argument("--json", action="store_true", help="print the summary as JSON")
    status.set_defaults(handler=_status)

    verify = commands.add_parser("verify", help="check an output against its manifest (exit 1 listing what does not hold)")
    verify.add_argument("output", help="output directory or URI (a table's path or location; with --catalog, an "
                                       "Iceberg table's namespace.table)")
    verify.add_argument("--catalog", default=None, metavar="MAPPING",
                        help="PyIceberg catalog properties (YAML) to find an Iceberg output table by name")
    verify.add_argument("--sample", type=int, default=0, metavar="N",
                        help="also re-read N random input rows, recompute them with the recorded model and compare")
    verify.add_argument("--checksums", action="store_true",
                        help="also compare every file's sha256 with the recorded one (reads whole files)")
    verify.add_argument("--seed", type=int, default=None, help="random seed for --sample")
    verify.add_argument("--json", action="store_true", help="print the result as JSON on stdout, and nothing else")
    verify.set_defaults(handler=_verify)

    demo = commands.add_parser("demo", help="make demo data and a model, run, print a summary")
    demo.add_argument("--rows", type=int, default=1_000_000, help="rows of demo features (default 1000000)")
    demo.add_argument("--dir", default=".batch-infer-demo", help="where to put data, model and predictions")
    demo.set_defaults(handler=_demo)
    return parser


def _add_job_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="job YAML file (flags and --set override its keys)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="set a config key; VALUE is parsed as YAML (--set features=[a, b])")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    keys = parser.add_argument_group(
        "config keys",
        "The keys of the YAML file, as flags (batch_size: --batch-size); flags win over --set, which wins over "
        "the file. The README's \"Config reference\" lists the same.")
    for doc in KEY_DOCS:
        flag, dest, text = "--" + doc.key.replace("_", "-"), f"key_{doc.key}", key_help(doc)
        if doc.key in BOOL_KEYS:
            keys.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif doc.key in LIST_KEYS:
            keys.add_argument(flag, dest=dest, metavar=doc.metavar, default=None, help=text,
                              type=lambda v: [p.strip() for p in v.split(",") if p.strip()])
        else:
            metavar = doc.metavar or "{" + ",".join(doc.choices) + "}"
            keys.add_argument(flag, dest=dest, metavar=metavar, default=None, help=text)


def key_help(doc: KeyDoc) -> str:
    """One config flag's help: its meaning, then its default (argparse wraps it to the terminal)."""
    if doc.default == "required":
        text = f"{doc.plain(doc.meaning)}. Required (here or in the config file)."
    else:
        text = f"{doc.plain(doc.meaning)}. Default: {doc.plain(doc.default)}."
    return text.replace("%", "%%")  # argparse %-formats help strings


def build_config(args: argparse.Namespace) -> JobConfig:
    """File < --set < flags, then one validation."""
    values: dict[str, Any] = read_yaml(args.config) if args.config else {}
    for item in args.overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            values[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: VALUE is not valid YAML ({exc})") from exc
    for key in JobConfig.keys():
        value = getattr(args, f"key_{key}")
        if value is not None:
            values[key] = value
    return JobConfig.from_dict(values, source=args.config or "flags")


def _run(args: argparse.Namespace) -> int:
    from pipelines.job import run

    cfg = build_config(args)
    with _stdout_to_stderr(args.json):
        report = run(cfg, timeline=args.timeline, progress=not args.json)
    if args.report:
        with open(args.report, "w") as handle:
            handle.write(report.to_json() + "\n")
    if args.json:
        print(report.to_json())
    else:
        print(report.summary())
    return EXIT_OK if report.succeeded else EXIT_FAILED_SHARDS


@contextlib.contextmanager
def _stdout_to_stderr(enabled: bool) -> Iterator[None]:
    """With --json, stdout holds the report and nothing else: whatever Ray, its daemons or a replica
    print while the job runs (they write to file descriptor 1 too) goes to stderr instead."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _plan(args: argparse.Namespace) -> int:
    from pipelines.job import plan

    p = plan(build_config(args))
    if args.json:
        print(json.dumps(p.to_dict(), indent=2))
        return EXIT_OK
    info = p.to_dict()
    if p.config.model_set is None:
        print(f"model: {p.config.model} (sha256 {p.model.sha256[:12]}..., {_model_shape(info['model'])})")
    else:
        print(f"model set of {len(p.config.model_set)}, one prediction column each:")
        for name, record in info["model"]["models"].items():
            print(f"  {name}: {record['uri']} (sha256 {record['sha256'][:12]}..., {_model_shape(record)})")
    print(f"features ({len(p.columns.features)}): {', '.join(p.columns.features)}")
    print(f"passthrough: {', '.join(p.columns.passthrough) or '(none)'}")
    print(f"{info['files']} file(s), {info['shards_total']} shard(s): {info['shards_todo']} to run "
          f"({info['rows_todo']:,} rows), {info['shards_skipped']} already committed")
    for shard in info["shards"]:
        line = f"  [{shard['status']}] {shard['id']}  rows={shard['rows_in']}  -> {shard['output']}"
        print(line + (f"  ({shard['error']})" if shard["error"] else ""))
    return EXIT_OK


def _model_shape(record: dict[str, Any]) -> str:
    """A model's manifest record in a few words: an MLP's layers, or a program's inputs and outputs."""
    if record.get("format") == "pt2":
        return f"pt2 program, inputs {record.get('inputs')} -> outputs {record.get('outputs')}"
    return f"layers {record.get('layers', [])}"


def _status(args: argparse.Namespace) -> int:
    from pipelines.commit import COMMITTED, MANIFEST, SUCCESS, State
    from basis.storage import resolve

    output = resolve(args.output)
    state = State.load(output)  # the manifest with the journal of a running or killed run applied
    if not state.found:
        raise ConfigError(f"no batch-infer manifest at {output.uri!r} (nothing has been committed there)")
    # Committed entries are counted as columns (a million of them need no dict each); the others are few.
    counts: dict[str, int] = {COMMITTED: len(state.files)} if len(state.files) else {}
    for shard in state.others.values():
        counts[shard["status"]] = counts.get(shard["status"], 0) + 1
    success = output.fs.get_file_info(output.join(SUCCESS)).type.name == "File"
    model = state.header.get("model") or {"sha256": "?", "layers": []}
    updated = output.fs.get_file_info(output.join(MANIFEST)).mtime
    summary = {
        "output": redact(args.output), "complete": success, "updated_at": updated.isoformat() if updated else None,
        "model_sha256": model["sha256"], "layers": model.get("layers"), "format": model.get("format", "state_dict"),
        **({"models": {name: {"uri": m.get("uri"), "sha256": m["sha256"], "format": m.get("format", "state_dict")}
                       for name, m in model["models"].items()}} if model.get("format") == "set" else {}),
        "shards": sum(counts.values()), "by_status": counts, "journal_records": not state.journal.empty,
        **{key: state.files.column_sum(key) for key in ("rows_in", "rows_out", "rows_rejected")},
        "errors": [{"shard": s["id"], "error": s["error"]} for s in state.others.values() if s["status"] == "failed"],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return EXIT_OK
    label = "complete (_SUCCESS present)" if success else "incomplete (no _SUCCESS)"
    print(f"{summary['output']}: {label}, last updated {summary['updated_at']}")
    if model.get("format") == "set":
        print(f"model set of {len(model['models'])}, one prediction column each:")
        for name, member in model["models"].items():
            print(f"  {name}: {member.get('uri')} (sha256 {member['sha256'][:12]}..., {_model_shape(member)})")
    else:
        print(f"model sha256 {summary['model_sha256'][:12]}..., {_model_shape(model)}")
    print(f"shards: {summary['shards']} ({', '.join(f'{v} {k}' for k, v in sorted(counts.items()))})")
    print(f"rows: {summary['rows_in']:,} in, {summary['rows_out']:,} out, {summary['rows_rejected']:,} rejected")
    for error in summary["errors"][:10]:
        print(f"  failed {error['shard']}: {error['error']}")
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    from pipelines.verifier import verify

    from pipelines.config import parse_catalog

    report = verify(args.output, sample=args.sample, checksums=args.checksums, seed=args.seed,
                    catalog=parse_catalog(args.catalog))
    print(report.to_json() if args.json else report.summary())
    return EXIT_OK if report.ok else EXIT_FAILED_SHARDS


def _demo(args: argparse.Namespace) -> int:
    from pipelines.demo import run_demo

    return run_demo(rows=args.rows, directory=args.dir)


class _Redacting(logging.Formatter):
    """Log lines with the secrets of any URI in them redacted (`basis.storage.redact`)."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def _configure_logging(command: str, verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Redacting("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    for name in ("pipelines", "workers"):
        log = logging.getLogger(name)
        log.addHandler(handler)
        log.setLevel(logging.DEBUG if verbose else logging.INFO)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
