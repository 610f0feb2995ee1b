"""The job configuration: one frozen dataclass, validated once, passed down.

The YAML file, the CLI flags and the Python API all build a `JobConfig` through
`JobConfig.from_dict`, which refuses unknown keys (with a did-you-mean hint).
`KEY_DOCS` describes every key once (meaning, default, choices); `batch-infer
run --help` and the README's "Config reference" (`python -m pipelines.reference`)
are both generated from it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from basis.errors import ConfigError

ACTIVATIONS = ("sigmoid", "relu", "tanh", "none")
OUTPUT_ACTIVATIONS = (*ACTIVATIONS, "softmax")
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
INVALID_ROWS = ("quarantine", "fail", "keep")
INPUT_FORMATS = ("auto", "parquet", "delta", "iceberg")
OUTPUT_FORMATS = ("auto", "parquet", "delta", "iceberg")
BOOL_KEYS = ("keep_features", "shared_storage", "overwrite", "prune")  # CLI: --KEY / --no-KEY switches
LIST_KEYS = ("features", "passthrough", "categorical")  # CLI: comma-separated values


@dataclasses.dataclass(frozen=True)
class JobConfig:
    """Everything one batch-infer job needs; see SPEC "Config keys".

    Example:
        >>> cfg = JobConfig.from_dict({"model": "m.pt", "input": "in/", "output": "out/"})
        >>> cfg.invalid_rows
        'quarantine'
    """

    model: str | dict[str, str]  # one model file, or a model set: {column name: model file}
    input: str
    output: str
    features: tuple[str, ...] | None = None
    passthrough: tuple[str, ...] | None = None
    categorical: tuple[str, ...] | None = None
    keep_features: bool = False
    prediction_column: str | None = None  # None: "prediction" for one model; a set names its columns by its keys
    activation: str = "sigmoid"
    output_activation: str = "sigmoid"
    batch_size: int | None = None
    replicas: int | None = None  # None means "auto"
    gpus_per_replica: float | None = None  # None means "1 when the cluster has GPUs"
    cpus_per_replica: float | None = None  # None means "auto": chosen from the nodes (see cluster.plan_replicas)
    precision: str = "fp32"
    shard_rows: int | None = None
    max_replicas: int | None = None  # None means "as many as the cluster can hold"
    max_attempts: int = 3
    shard_timeout: float | None = None  # seconds; None means "chosen by the system"
    shared_storage: bool = False
    start_timeout: float | None = None  # seconds; None means "chosen by the system"
    invalid_rows: str = "quarantine"
    overwrite: bool = False
    prune: bool = False
    input_format: str = "auto"
    output_format: str = "auto"
    catalog: Mapping[str, Any] | None = None  # PyIceberg catalog properties; None: PyIceberg's own config
    address: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.model, Mapping):
            object.__setattr__(self, "model", _model_set(self.model))
            if self.prediction_column is not None:
                raise ConfigError(
                    f"'prediction_column' ({self.prediction_column!r}) does not apply to a model set: each model's "
                    f"predictions go to the column named by its key ({', '.join(self.model)}); rename the keys "
                    f"instead")
        elif self.prediction_column is None:
            object.__setattr__(self, "prediction_column", "prediction")
        for key in ("model", "input", "output"):
            value = getattr(self, key)
            if key == "model" and isinstance(value, dict):
                continue
            if not isinstance(value, (str, Path)) or not str(value).strip():
                raise ConfigError(f"config key {key!r} is required: give a path or URI")
            object.__setattr__(self, key, str(value).strip())
        object.__setattr__(self, "features", _names("features", self.features))
        object.__setattr__(self, "passthrough", _names("passthrough", self.passthrough))
        object.__setattr__(self, "categorical", _names("categorical", self.categorical))
        both = sorted(set(self.categorical or ()) & set(self.features or ()))
        if both:
            raise ConfigError(f"columns {both} are listed in both 'features' and 'categorical': a categorical "
                              f"column goes to the program's embeddings as an integer, not as a float feature")
        if self.passthrough is not None and self.features is not None:
            both = sorted(set(self.passthrough) & set(self.features))
            if both:
                raise ConfigError(f"columns {both} are listed in both 'features' and 'passthrough'")
        for key in BOOL_KEYS:
            object.__setattr__(self, key, _bool(key, getattr(self, key)))
        if self.model_set is None and (not isinstance(self.prediction_column, str) or not self.prediction_column):
            raise ConfigError("'prediction_column' must be a non-empty column name")
        _choice("activation", self.activation, ACTIVATIONS)
        _choice("output_activation", self.output_activation, OUTPUT_ACTIVATIONS)
        _choice("precision", self.precision, PRECISIONS)
        _choice("invalid_rows", self.invalid_rows, INVALID_ROWS)
        _choice("input_format", self.input_format, INPUT_FORMATS)
        _choice("output_format", self.output_format, OUTPUT_FORMATS)
        object.__setattr__(self, "catalog", _catalog(self.catalog))
        object.__setattr__(self, "batch_size", _positive_int("batch_size", self.batch_size, auto=True))
        object.__setattr__(self, "replicas", _positive_int("replicas", self.replicas, auto=True))
        object.__setattr__(self, "shard_rows", _positive_int("shard_rows", self.shard_rows, auto=True))
        object.__setattr__(self, "max_replicas", _positive_int("max_replicas", self.max_replicas, auto=True))
        if self.replicas is not None and self.max_replicas is not None and self.replicas > self.max_replicas:
            raise ConfigError(
                f"'replicas' ({self.replicas}) is more than 'max_replicas' ({self.max_replicas}): 'replicas' is an "
                f"exact count; lower it, raise 'max_replicas', or set 'replicas: auto' to grow up to 'max_replicas'"
            )
        object.__setattr__(self, "max_attempts", _positive_int("max_attempts", self.max_attempts))
        for key in ("shard_timeout", "start_timeout"):
            object.__setattr__(self, key, _seconds(key, getattr(self, key)))
        gpus = self.gpus_per_replica
        if not (gpus is None or (isinstance(gpus, str) and gpus == "auto")):
            gpus = _positive_float("gpus_per_replica", gpus, allow_zero=True)
            if gpus > 1 and gpus != int(gpus):
                raise ConfigError(f"'gpus_per_replica' above 1 must be a whole number, got {gpus}")
        else:
            gpus = None
        object.__setattr__(self, "gpus_per_replica", gpus)
        cpus = self.cpus_per_replica
        if cpus is not None and not (isinstance(cpus, str) and cpus == "auto"):
            cpus = _positive_float("cpus_per_replica", cpus)
        else:
            cpus = None
        object.__setattr__(self, "cpus_per_replica", cpus)
        if self.address is not None:
            if not isinstance(self.address, str) or not self.address.strip():
                raise ConfigError("'address' must be 'auto', 'host:port' or 'ray://host:10001'")
            object.__setattr__(self, "address", self.address.strip())

    @property
    def model_set(self) -> dict[str, str] | None:
        """The model set's {column: model file}, or None for one model."""
        return self.model if isinstance(self.model, dict) else None

    @property
    def models(self) -> dict[str, str]:
        """{prediction column: model file}: a set's keys, or `prediction_column` for one model.

        Example:
            >>> JobConfig.from_dict({"model": {"a": "a.pt", "b": "b.pt2"}, "input": "i", "output": "o"}).models
            {'a': 'a.pt', 'b': 'b.pt2'}
        """
        return dict(self.model) if isinstance(self.model, dict) else {str(self.prediction_column): self.model}

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The config keys, in SPEC order."""
        return tuple(field.name for field in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "config") -> JobConfig:
        """Build a config from a mapping, refusing unknown keys.

        Example:
            >>> JobConfig.from_dict({"model": "m.pt", "input": "i", "output": "o", "batch_size": 4096}).batch_size
            4096
        """
        known = set(cls.keys())
        unknown = [key for key in values if key not in known]
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(str(key).replace("-", "_"), known, n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(
                f"unknown config key(s) in {source}: {', '.join(hints)}; valid keys are {', '.join(cls.keys())}"
            )
        missing = [key for key in ("model", "input", "output") if values.get(key) in (None, "")]
        if missing:
            raise ConfigError(f"missing required config key(s) in {source}: {', '.join(missing)}")
        try:
            return cls(**dict(values))
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: Mapping[str, Any] | None = None) -> JobConfig:
        """Read a YAML job file; `overrides` (flags, --set) win over the file.

        Example:
            >>> cfg = JobConfig.from_yaml("job.yaml", {"overwrite": True})  # doctest: +SKIP
        """
        return cls.from_dict({**read_yaml(path), **(overrides or {})}, source=str(path))

    def replace(self, **changes: Any) -> JobConfig:
        """A copy with some keys changed (validated again)."""
        values = {**self.to_dict(), **changes}
        if isinstance(changes.get("model"), Mapping) and "prediction_column" not in changes \
                and self.prediction_column == "prediction":  # the default of one model, not a choice
            values["prediction_column"] = None
        return JobConfig.from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values, as they would be written in YAML."""
        out = dataclasses.asdict(self)
        for key in LIST_KEYS:
            if out[key] is not None:
                out[key] = list(out[key])
        return out


@dataclasses.dataclass(frozen=True)
class KeyDoc:
    """What a user needs to know about one config key (the `--help` text and the README row).

    `meaning` and `default` are Markdown (backticks for literals); `choices` lists the
    values a key accepts when it accepts only a few; `metavar` names the flag's value
    (switches and keys with `choices` need none).

    Example:
        >>> KeyDoc("batch_size", "chosen by the system", "rows per forward pass", metavar="N").plain("`4096`")
        '4096'
    """

    key: str
    default: str
    meaning: str
    choices: tuple[str, ...] = ()
    metavar: str = ""

    @staticmethod
    def plain(markdown: str) -> str:
        """The text as a terminal shows it: literals without their backticks."""
        return markdown.replace("`", "")


_SYSTEM = "chosen by the system"

# One row per `JobConfig` field, in the same (SPEC) order; tests hold the two together.
KEY_DOCS: tuple[KeyDoc, ...] = (
    KeyDoc("model", "required",
           "path/URI of the model file: a `state_dict` (`.pt`/`.pth`) or `.safetensors` of Linear layers "
           "(BatchNorm1d folded), or a `torch.export` program (`.pt2`, dynamic batch). A model set maps output "
           "column names to model files (`{champion: a.pt, challenger: b.pt2}`; CLI: "
           "`--set model={champion: a.pt, challenger: b.pt2}`): every model takes the same features, each batch "
           "is read, decoded and copied to the device once, and each model's predictions go to the column "
           "named by its key", metavar="PATH"),
    KeyDoc("input", "required",
           "a Parquet file, a directory (recursive) or a glob; local path or URI (`s3://`, `gs://`, `hdfs://`, "
           "`file://`). In a glob `*` and `?` stay within one directory, `**` recurses, and a directory the "
           "glob matches gives every file below it (as Spark: `in/date=2024-*`); a path that exists is taken "
           "literally even if it holds glob characters. Local symlinks are followed, each real directory and "
           "file once (a loop adds nothing); an input that leads into the output is refused. Relative paths "
           "are resolved where you run the command", metavar="PATH"),
    KeyDoc("output", "required", "output directory or URI; must not overlap `input`", metavar="PATH"),
    KeyDoc("features", "all floating-point columns not in `passthrough` (from the first readable input file)",
           "list of column names, a glob such as `f*`, or one fixed-size-list column", metavar="A,B,..."),
    KeyDoc("passthrough", "every non-feature column", "columns copied to the output next to the prediction",
           metavar="A,B,..."),
    KeyDoc("categorical", "none",
           "integer columns handed to a `.pt2` program as one int64 `[batch, k]` tensor, its second input "
           "(embeddings); null, negative or out-of-range values (beyond the embedding table read from the "
           "program) are invalid rows (`invalid_rows`; with `keep` the shard fails). They stay in the output "
           "as passthrough columns unless `passthrough` leaves them out", metavar="A,B,..."),
    KeyDoc("keep_features", "`false`", "also copy the feature columns"),
    KeyDoc("prediction_column", "`prediction`",
           "name of the output column; not with a model set, whose keys name its columns", metavar="NAME"),
    KeyDoc("activation", "`sigmoid`", "activation between layers: `sigmoid`, `relu`, `tanh`, `none`",
           choices=ACTIVATIONS),
    KeyDoc("output_activation", "`sigmoid`",
           "activation after the last layer: `sigmoid`, `relu`, `tanh`, `none`, `softmax`",
           choices=OUTPUT_ACTIVATIONS),
    KeyDoc("batch_size", f"{_SYSTEM} (about 16 MiB of features per pass on CPU)", "rows per forward pass",
           metavar="N"),
    KeyDoc("replicas", "`auto`",
           "number of model replicas, an exact count; `auto` = cluster GPUs / `gpus_per_replica` when the "
           "cluster has GPUs, else cluster CPUs / `cpus_per_replica`, growing as nodes join (up to "
           "`max_replicas`); never more than the shards to run", metavar="N|auto"),
    KeyDoc("gpus_per_replica", "1 when the cluster has GPUs",
           "GPUs per replica; fractions pack several replicas on one GPU; `0` forces CPU replicas. On a cluster "
           "scaling from zero GPU nodes, set it (Ray 2.60 often cannot tell a run which node types have GPUs)",
           metavar="N"),
    KeyDoc("cpus_per_replica", "`auto`",
           "CPUs reserved per replica (also its decode and torch threads); `auto` = GPU replicas share their "
           "node's CPUs less one left to Ray (nodes of 4+ CPUs); CPU replicas get 1 CPU each when the forward pass is "
           "most of the model's work, else each node's CPUs split into replicas of at most 4. The report says what "
           "was chosen", metavar="N|auto"),
    KeyDoc("precision", "`fp32`", "forward-pass precision: `fp32`, `tf32`, `bf16`, `fp16` (tf32 only changes "
           "anything on GPUs)", choices=PRECISIONS),
    KeyDoc("shard_rows", "1,000,000", "target rows per shard; shards are whole row groups of one file. Smaller shards "
           "(tiny files) go to a replica several per call, up to this many rows",
           metavar="N"),
    KeyDoc("max_replicas", "unset (as many as the cluster can hold)",
           "caps the elastic pool that `replicas: auto` grows as nodes join; `replicas` stays an exact count "
           "and may not exceed it", metavar="N"),
    KeyDoc("max_attempts", "3",
           "attempts per shard on infrastructure failure: its replica (actor, worker or node) dies or stalls, "
           "or storage keeps failing with transient errors", metavar="N"),
    KeyDoc("shard_timeout", f"{_SYSTEM}: max(600 s, 10 x the slowest seconds-per-row seen x the shard's rows)",
           "seconds a replica may hold a shard without finishing it; then the replica is killed and replaced "
           "and the shard retried (the attempt counts)", metavar="SECONDS"),
    KeyDoc("shared_storage", "`false`",
           "declares local paths readable from every node (a shared mount); without it, local paths on a "
           "cluster spanning several hosts are refused (exit 2): use object-store URIs there"),
    KeyDoc("start_timeout", f"{_SYSTEM}: 10 min on an autoscaling cluster, 5 min otherwise",
           "seconds to wait for capacity (from the autoscaler) before the first replica runs", metavar="SECONDS"),
    KeyDoc("invalid_rows", "`quarantine`",
           "rows with null/NaN/inf features: `quarantine` (to `_rejected/`, with a `reason` column: an input "
           "column named `reason` among those read is refused, exit 2), `fail` (the shard fails), `keep` "
           "(predict anyway)", choices=INVALID_ROWS),
    KeyDoc("overwrite", "`false`",
           "recompute everything, replacing earlier output (predictions of inputs that vanished go too: no "
           "input is left to recompute them from)"),
    KeyDoc("prune", "`false`",
           "when a run completes, delete the predictions of input files that no longer exist; without it they "
           "are kept (and still listed in the manifest). Predictions of a changed file are replaced either way"),
    KeyDoc("input_format", "`auto`",
           "what `input` is: `parquet` (files, a directory or a glob), `delta` (a Delta Lake table's path or URI: "
           "the rows of its latest version), `iceberg` (`input: namespace.table` through `catalog`: the rows of "
           "its current snapshot); `auto` = `delta` when the path holds `_delta_log/`, else `parquet`. Files "
           "a table has removed are never read; rows deleted by Delta deletion vectors or Iceberg position "
           "deletes are masked, never scored; deletes that cannot be masked (Iceberg equality deletes) are "
           "refused before any work (exit 2)", choices=INPUT_FORMATS),
    KeyDoc("output_format", "`auto`",
           "`parquet` (`auto` is the same; a Delta table there is refused): Parquet files, a manifest and "
           "`_SUCCESS`; `delta` (`output`: the table's path or URI) or `iceberg` (`output: namespace.table` through "
           "`catalog`): the files are committed into the table, created when missing with the passthrough and "
           "prediction columns, in one transaction per run that carries the run's generation (Delta `txn`, "
           "Iceberg snapshot summary), never twice; a run with nothing new makes no commit; an existing table "
           "with other columns is refused (exit 2). The manifest, journal, `_LOCK` and `_SUCCESS` are in the "
           "table's root (Iceberg: its location; data files under `data/`)", choices=OUTPUT_FORMATS),
    KeyDoc("catalog", "unset: PyIceberg's own configuration (`.pyiceberg.yaml`, `PYICEBERG_CATALOG__*`), "
           "catalog `default`",
           "PyIceberg catalog properties for `iceberg` input or output, a mapping (on the command line as YAML), e.g. "
           "`{type: sql, uri: \"sqlite:///cat.db\", warehouse: \"file:///wh\"}`; `name` picks the catalog's "
           "name (default `default`)", metavar="MAPPING"),
    KeyDoc("address", "`RAY_ADDRESS` if set, else a new embedded local Ray",
           "the Ray cluster to join: `auto`, `host:port` or `ray://host:10001`; a `ray start` cluster on this "
           "machine is never joined implicitly", metavar="ADDRESS"),
)  # fmt: skip


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Load a YAML mapping, with errors that name the file."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys, got {type(data).__name__}")
    return data


def _model_set(value: Mapping[Any, Any]) -> dict[str, str]:
    """A model set's {column name: model file}, checked: names and paths non-empty, at least one model."""
    if not value:
        raise ConfigError("'model' is an empty mapping: give a model file, or map column names to model files")
    models = {}
    for name, path in value.items():
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"model set: key {name!r} must be a non-empty column name")
        if not isinstance(path, (str, Path)) or not str(path).strip():
            raise ConfigError(f"model set: {name!r} must map to a model file path or URI, got {path!r}")
        models[name.strip()] = str(path).strip()
    if len(models) != len(value):
        raise ConfigError(f"model set: two keys name the same column: {list(value)}")
    return models


def _names(key: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{key!r} must be a list of column names (or a glob such as 'f*'), got {value!r}")
    if not value:
        raise ConfigError(f"{key!r} is empty; leave it out to use the default")
    if len(set(value)) != len(value):
        raise ConfigError(f"{key!r} lists a column twice: {list(value)}")
    return tuple(value)


def parse_catalog(value: Any) -> dict[str, str] | None:
    """The `catalog` key's value as `JobConfig` holds it (`batch-infer verify --catalog`)."""
    return _catalog(value)


def _catalog(value: Any) -> dict[str, str] | None:
    """The `catalog` key as a mapping of string properties (a string is read as YAML: the CLI's form)."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"'catalog' is not a valid YAML mapping: {exc}") from None
    if not isinstance(value, Mapping) or not value or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"'catalog' must be a mapping of PyIceberg catalog properties, e.g. "
                          f"{{type: sql, uri: 'sqlite:///cat.db', warehouse: 'file:///wh'}}; got {value!r}")
    if any(isinstance(v, (Mapping, list, tuple)) or v is None for v in value.values()):
        raise ConfigError("'catalog' properties must be plain values (strings, numbers, booleans)")
    return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in value.items()}


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
        return value.lower() in ("true", "yes", "1")
    raise ConfigError(f"{key!r} must be true or false, got {value!r}")


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key!r} must be one of {', '.join(choices)}; got {value!r}")


def _positive_int(key: str, value: Any, *, auto: bool = False) -> int | None:
    if auto and (value is None or value == "auto"):
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        extra = " or 'auto'" if auto else ""
        raise ConfigError(f"{key!r} must be a positive whole number{extra}, got {value!r}")
    return value


def _seconds(key: str, value: Any) -> float | None:
    if value is None or value == "auto":
        return None
    try:
        return _positive_float(key, value)
    except ConfigError:
        raise ConfigError(
            f"{key!r} must be a positive number of seconds (leave it out to let the system choose), got {value!r}"
        ) from None


def _positive_float(key: str, value: Any, *, allow_zero: bool = False) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        raise ConfigError(f"{key!r} must be a positive number, got {value!r}")
    return number
