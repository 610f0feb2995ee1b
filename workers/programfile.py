"""`torch.export` programs (`.pt2`): what the driver checks without torch, and the archive torch may load.

A `.pt2` written by `torch.export.save` (torch 2.13) is a zip under one
folder: `archive_format` ("pt2"), `models/model.json` (the graph, its
signature, tensor shapes and symbolic sizes, as JSON), raw weight and
constant files with JSON configs (`data/weights/`, `data/constants/`), and
`data/sample_inputs/model.pt`, a `torch.save` pickle of the example inputs.

What `torch.export.load` in torch 2.13 would execute from such a file
(read in `torch/export/pt2_archive/_package.py` and
`torch/_export/serde/serialize.py`):

- the sample inputs pickle: `deserialize_torch_artifact` tries
  `torch.load(weights_only=True)` and, when that fails, falls back to
  `weights_only=False`, so a pickle with a `__reduce__` (say `os.system`)
  runs at load time (the tests build one and watch it run);
- weights or constants flagged `use_pickle` (`torch.load(weights_only=False)`),
  `custom_obj_*` constants (TorchScript's unpickler), `opaque_obj_*`
  constants (`pickle.loads`) and the legacy `data/weights/model.pt`;
- `data/aotinductor/` (compiled shared libraries that `load_pt2` opens:
  native code);
- every symbolic size (`expr_str`) goes through `sympy.sympify`, which is
  Python `eval` (`"__import__('os').system(...)"` runs);
- `guards_code` strings are compiled into Python that `ep.module()` runs on
  every call;
- a node's `target` is resolved by `getattr` from `torch`, `operator` or
  `math` (`torch.os.system` resolves), and called when the program runs.

So batch-infer never hands the user's file to torch. `check_program`
reads the JSON without torch and refuses, naming what it found: any
pickled payload, AOTInductor or other compiled code, a symbolic size that
is not a plain sympy expression of integers and size symbols, a call other
than an ATen operator (or the few `operator`/`math`/`torch.sym_*`
functions symbolic sizes use), names that are not identifiers.
`safe_archive` then builds the archive torch loads from the checked parts
only: graph JSON without guards code or node metadata (stack traces and
type names are never needed to run), raw weights and constants, and an
empty sample inputs file (so nothing is unpickled at all). The shapes the
guards would check are checked here instead, on the driver, before any
replica starts: one float32 `[batch, features]` input and optionally one
int64 `[batch, k]` input, output `[batch]` or `[batch, k]`, and a dynamic
batch dimension. Reading them needs no torch (`import torch` costs the
driver 1.3-1.7 s).
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from basis.errors import ConfigError, ModelError
from workers.programcheck import check_fqn, check_program

_FLOAT, _LONG = 7, 5  # torch._export.serde.schema.ScalarType
_FLOATS = {6: "float16", 7: "float32", 8: "float64", 13: "bfloat16"}
_DTYPE_NAMES = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 12: "bool", **_FLOATS}

DYNAMIC_FIX = 'dynamic_shapes={%s}'  # filled with the program's input names


@dataclass(frozen=True)
class ProgramSpec:
    """What the driver needs to know about a `.pt2` program: identity, inputs and outputs.

    `layers` are the program's Linear layers (in, out, has_bias), only to
    estimate its forward pass's cost (`workers.modelfile.forward_share`);
    `category_limits` holds, per categorical input column, the size of the
    smallest embedding table it indexes (None where none was found).
    """

    uri: str
    sha256: str
    input_names: tuple[str, ...]
    features: int
    categories: int  # width of the int64 [batch, k] input; 0 when the program takes only features
    outputs: int
    output_rank: int
    layers: tuple[tuple[int, int, bool], ...]
    widest: int  # the widest activation per row (values), to size CPU chunks
    max_batch: int | None
    category_limits: tuple[int | None, ...]

    format = "pt2"

    @property
    def in_features(self) -> int:
        return self.features

    @property
    def out_features(self) -> int:
        return self.outputs

    def to_dict(self) -> dict[str, Any]:
        inputs = [["batch", self.features]] + ([["batch", self.categories]] if self.categories else [])
        return {"sha256": self.sha256, "format": "pt2", "inputs": inputs,
                "outputs": ["batch"] + ([self.outputs] if self.output_rank == 2 else []),
                "category_limits": list(self.category_limits)}

    def check_categorical(self, columns: Sequence[str]) -> None:
        """Refuse (exit 2) a `categorical` config that does not match the program's second input."""
        if self.categories and not columns:
            raise ConfigError(
                f"model {self.uri!r} takes a second input {self.input_names[1]!r} (int64 [batch, "
                f"{self.categories}]): name its {self.categories} integer column(s) with 'categorical'")
        if columns and not self.categories:
            raise ConfigError(
                f"'categorical' lists {len(columns)} column(s), but model {self.uri!r} takes only the features "
                f"({self.input_names[0]!r}, float32 [batch, {self.features}])")
        if columns and len(columns) != self.categories:
            raise ConfigError(
                f"model {self.uri!r} expects {self.categories} categorical column(s) in "
                f"{self.input_names[1]!r} (int64 [batch, {self.categories}]), but 'categorical' lists "
                f"{len(columns)}: {list(columns)}")


def is_program(data: bytes) -> bool:
    """Whether `data` is a `torch.export.save` archive (a zip with `<folder>/archive_format` = pt2)."""
    if not data.startswith(b"PK"):
        return False
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/archive_format")]
            return len(names) == 1 and archive.read(names[0]).strip() == b"pt2"
    except zipfile.BadZipFile:
        return False


def inspect_program(data: bytes, uri: str, sha256: str) -> ProgramSpec:
    """The spec of a `.pt2` file, checked as `check_program` does (raises `ModelError`/`ConfigError`).

    Example:
        >>> inspect_program(open("m.pt2", "rb").read(), "m.pt2", "ab12").features  # doctest: +SKIP
        64
    """
    return _spec(_Archive(data, uri), uri, sha256)


def safe_archive(data: bytes, uri: str) -> bytes:
    """The archive `torch.export.load` may read: the checked parts of `data` only (see the module docstring)."""
    archive = _Archive(data, uri)
    model = archive.model
    model["guards_code"] = []
    for node in _nodes(model):
        node["metadata"] = {}
    model["graph_module"]["metadata"] = {}
    out = io.BytesIO()
    p = archive.prefix
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{p}/archive_format", b"pt2")
        for name in ("archive_version", ".data/version", "byteorder"):
            if archive.has(name):
                z.writestr(f"{p}/{name}", archive.read(name))
        z.writestr(f"{p}/models/model.json", json.dumps(model))
        z.writestr(f"{p}/data/sample_inputs/model.pt", b"")  # empty: torch unpickles nothing
        for folder, config_name, config in (("weights", "model_weights_config.json", archive.weights),
                                            ("constants", "model_constants_config.json", archive.constants)):
            z.writestr(f"{p}/data/{folder}/{config_name}", json.dumps(config))
            for path_name in sorted({entry["path_name"] for entry in config["config"].values()}):
                z.writestr(f"{p}/data/{folder}/{path_name}", archive.read(f"data/{folder}/{path_name}"))
    return out.getvalue()


class _Archive:
    """A `.pt2` zip whose parts have been checked (`check_program`); refuses with `ModelError` naming the part."""

    def __init__(self, data: bytes, uri: str) -> None:
        self.uri = uri
        try:
            self.zip = zipfile.ZipFile(io.BytesIO(data))
        except zipfile.BadZipFile as exc:
            raise ModelError(f"model {uri!r} is not a readable .pt2 archive: {exc}") from exc
        names = self.zip.namelist()
        prefixes = {n.split("/", 1)[0] for n in names}
        if len(prefixes) != 1 or not all("/" in n for n in names):
            raise ModelError(f"model {uri!r} is not a torch.export.save archive (expected one top folder)")
        self.prefix = prefixes.pop()
        self.names = {n[len(self.prefix) + 1:] for n in names}
        for rel in sorted(self.names):
            unsafe = _unsafe_part(rel)
            if unsafe:
                raise ModelError(f"model {uri!r} holds {rel!r}: {unsafe}, which batch-infer never loads (it "
                                 f"never executes code from a model file); save with torch.export.save(ep, path)")
        if self.read("archive_format").strip() != b"pt2":
            raise ModelError(f"model {uri!r} is not a torch.export.save archive (archive_format is not pt2)")
        if self.has("byteorder") and self.read("byteorder").strip() != b"little":
            raise ModelError(f"model {uri!r} was saved on a big-endian machine, which is not supported")
        models = sorted(n for n in self.names if n.startswith("models/"))
        if models != ["models/model.json"]:
            raise ModelError(f"model {uri!r} holds {len(models)} program(s) ({models}); expected one, "
                             f"models/model.json, as torch.export.save writes")
        try:
            self.model = json.loads(self.read("models/model.json"))
            self.weights = json.loads(self.read("data/weights/model_weights_config.json"))
            self.constants = json.loads(self.read("data/constants/model_constants_config.json"))
        except (KeyError, ValueError) as exc:
            raise ModelError(f"model {uri!r}: cannot read the program's JSON ({exc}); was it written by "
                             f"torch.export.save in torch 2.6 or later?") from exc
        check_program(self.model, uri)
        for folder, config, prefix in (("weights", self.weights, "weight_"), ("constants", self.constants, "tensor_")):
            for fqn, entry in (config.get("config") or {}).items():
                _check_payload(folder, fqn, entry, prefix, uri)
                if f"data/{folder}/{entry['path_name']}" not in self.names:
                    raise ModelError(f"model {uri!r}: {folder[:-1]} {fqn!r} has no data file {entry['path_name']!r}")

    def has(self, rel: str) -> bool:
        return rel in self.names

    def read(self, rel: str) -> bytes:
        if rel not in self.names:
            raise ModelError(f"model {self.uri!r} is not a torch.export.save archive: it has no {rel!r}")
        return self.zip.read(f"{self.prefix}/{rel}")


def _unsafe_part(rel: str) -> str:
    if rel.startswith(("data/aotinductor/", "data/executorch/", "data/mtia", "xl_model_weights/")):
        return "compiled code or an external weights loader"
    if rel in ("data/weights/model.pt", "data/constants/model.pt") or rel.startswith(("data/constants/custom_obj_",
                                                                                       "data/constants/opaque_obj_")):
        return "a pickled payload"
    return ""


def _check_payload(folder: str, fqn: str, entry: Any, prefix: str, uri: str) -> None:
    what = f"model {uri!r}: {folder[:-1]} {fqn!r}"
    if not isinstance(entry, Mapping):
        raise ModelError(f"{what} has no payload description")
    if entry.get("use_pickle"):
        raise ModelError(f"{what} is pickled (a tensor subclass), which batch-infer never loads (it never "
                         f"executes code from a model file); export plain tensors")
    path_name = str(entry.get("path_name", ""))
    if not re.fullmatch(re.escape(prefix) + r"[A-Za-z0-9_]+", path_name) or not entry.get("tensor_meta"):
        raise ModelError(f"{what} is stored as {path_name!r}, not as a raw tensor ({prefix}N)")
    check_fqn(fqn, uri)


def _nodes(model: Mapping[str, Any]) -> list[dict[str, Any]]:
    return list(model["graph_module"]["graph"]["nodes"])


def _size(value: Mapping[str, Any]) -> int | str:
    """A size as an int, or its sympy expression string when symbolic."""
    if "as_int" in value:
        return int(value["as_int"])
    return str(value["as_expr"]["expr_str"])


def _shape(meta: Mapping[str, Any]) -> list[int | str]:
    return [_size(s) for s in meta["sizes"]]


def _show(shape: Sequence[int | str], dtype: int) -> str:
    dims = ", ".join(str(d) if isinstance(d, int) else "batch" for d in shape)
    return f"{_DTYPE_NAMES.get(dtype, f'dtype {dtype}')} [{dims}]"


def _spec(archive: _Archive, uri: str, sha256: str) -> ProgramSpec:
    model = archive.model
    graph, signature = model["graph_module"]["graph"], model["graph_module"]["signature"]
    values = graph["tensor_values"]
    inputs = []
    for spec in signature.get("input_specs", []):
        if "user_input" in spec:
            arg = spec["user_input"]["arg"]
            if "as_tensor" not in arg:
                raise ModelError(f"model {uri!r} takes a non-tensor input ({sorted(arg)[0]}); batch-infer feeds a "
                                 f"float32 [batch, features] tensor and optionally an int64 [batch, k] one")
            inputs.append(arg["as_tensor"]["name"])
    outputs = [spec["user_output"]["arg"] for spec in signature.get("output_specs", [])]
    if not 1 <= len(inputs) <= 2:
        raise ModelError(f"model {uri!r} takes {len(inputs)} inputs ({', '.join(inputs)}); expected a float32 "
                         f"[batch, features] tensor, optionally followed by an int64 [batch, k] categorical tensor")
    if len(outputs) != 1 or "as_tensor" not in outputs[0]:
        raise ModelError(f"model {uri!r} returns {len(outputs)} value(s); expected one [batch] or [batch, k] tensor")
    shapes = [_shape(values[name]) for name in inputs]
    dtypes = [int(values[name]["dtype"]) for name in inputs]
    out_name = outputs[0]["as_tensor"]["name"]
    out_shape, out_dtype = _shape(values[out_name]), int(values[out_name]["dtype"])
    batch = shapes[0][0] if shapes[0] else None
    if any(shape and isinstance(shape[0], int) for shape in shapes) or (out_shape and isinstance(out_shape[0], int)):
        if len(inputs) == 1:
            fix = DYNAMIC_FIX % f'"{inputs[0]}": {{0: torch.export.Dim("batch")}}'
        else:  # one Dim object for both: their batch sizes are the same
            fix = 'batch = torch.export.Dim("batch"); ' + DYNAMIC_FIX % ", ".join(f'"{n}": {{0: batch}}' for n in inputs)
        raise ModelError(
            f"model {uri!r} was exported with a fixed batch size ({_show(shapes[0], dtypes[0])} for input "
            f"{inputs[0]!r}); batch-infer feeds batches of any size. Export it with a dynamic batch: {fix} "
            f"in torch.export.export(model, args, dynamic_shapes=...)")
    expected = [("float32", _FLOAT, "features"), ("int64", _LONG, "k")]
    for (kind, code, what), name, shape, dtype in zip(expected, inputs, shapes, dtypes):
        if dtype != code or len(shape) != 2 or not isinstance(shape[1], int) or shape[0] != batch:
            raise ModelError(f"model {uri!r} input {name!r} is {_show(shape, dtype)}; expected {kind} "
                             f"[batch, {what}] (batch the same dynamic size for every input)")
    if out_dtype not in _FLOATS or len(out_shape) not in (1, 2) or out_shape[0] != batch \
            or (len(out_shape) == 2 and not isinstance(out_shape[1], int)):
        raise ModelError(f"model {uri!r} returns {_show(out_shape, out_dtype)}; expected a float [batch] or "
                         f"[batch, k] tensor")
    symbol = re.search(r"[a-z]+[0-9]+", str(batch))
    bounds = (model.get("range_constraints") or {}).get(symbol.group(0) if symbol else "", {})
    low, high = bounds.get("min_val"), bounds.get("max_val")
    if isinstance(low, int) and low > 1:
        raise ModelError(f"model {uri!r} accepts batches of at least {low} rows; batch-infer's last batch may hold "
                         f"one row: export with torch.export.Dim(\"batch\") without a min")
    features = int(shapes[0][1])  # type: ignore[arg-type]
    categories = int(shapes[1][1]) if len(inputs) == 2 else 0  # type: ignore[arg-type]
    nodes = _nodes(model)
    return ProgramSpec(
        uri=uri, sha256=sha256, input_names=tuple(inputs), features=features, categories=categories,
        outputs=int(out_shape[1]) if len(out_shape) == 2 else 1, output_rank=len(out_shape),  # type: ignore[arg-type]
        layers=_linear_layers(nodes, values) or ((features, 1, True),),
        widest=_widest(values, batch),
        max_batch=int(high) if isinstance(high, int) and high > 0 else None,
        category_limits=_category_limits(nodes, values, inputs[1], categories) if categories else (),
    )


def _arguments(node: Mapping[str, Any]) -> dict[str, Any]:
    return {i.get("name"): i.get("arg", {}) for i in node.get("inputs", [])}


def _tensor(arg: Mapping[str, Any]) -> str | None:
    tensor = arg.get("as_tensor")
    return tensor.get("name") if isinstance(tensor, Mapping) else None


def _linear_layers(nodes: Sequence[Mapping[str, Any]], values: Mapping[str, Any]) -> tuple[tuple[int, int, bool], ...]:
    layers = []
    for node in nodes:
        if node.get("target") == "torch.ops.aten.linear.default":
            args = _arguments(node)
            shape = _shape(values[_tensor(args["weight"]) or ""]) if _tensor(args.get("weight", {})) else []
            if len(shape) == 2 and all(isinstance(n, int) for n in shape):
                layers.append((int(shape[1]), int(shape[0]), _tensor(args.get("bias", {})) is not None))
    return tuple(layers)


def _widest(values: Mapping[str, Any], batch: Any) -> int:
    """The most values per row of any activation (a tensor whose first size is the batch)."""
    widest = 1
    for meta in values.values():
        shape = _shape(meta)
        if shape and shape[0] == batch and all(isinstance(n, int) for n in shape[1:]):
            per_row = 1
            for n in shape[1:]:
                per_row *= int(n)  # type: ignore[arg-type]
            widest = max(widest, per_row)
    return widest


# Operators that keep values and shape semantics of their first tensor (columns along dim 1 stay put),
# and those that keep values but not the layout (the result is a bag of the same columns' values).
_SAME_LAYOUT = {"clone", "alias", "contiguous", "_to_copy", "to", "detach", "lift_fresh_copy", "_assert_tensor_metadata"}
_SAME_VALUES = {"view", "reshape", "flatten", "unsqueeze", "squeeze", "permute", "transpose", "t", "expand",
                "_unsafe_view", "clone", "contiguous", "_to_copy", "to", "alias", "detach"}


def _category_limits(nodes: Sequence[Mapping[str, Any]], values: Mapping[str, Any], name: str,
                     k: int) -> tuple[int | None, ...]:
    """Per categorical column, the rows of the smallest embedding table indexed by its values (None: not found).

    Follows the [batch, k] input through the operators that select its
    columns (`cat[:, 0]`, `cat[:, 1:3]`, `cat.unbind(1)`) or only reshape
    them, to `aten.embedding` (what `nn.Embedding` exports to). Values that
    pass through arithmetic first (hashing, offsets) are not followed: such a
    column gets no upper bound, only negatives and nulls are refused.
    """
    layouts: dict[str, tuple[int, ...]] = {name: tuple(range(k))}  # tensor -> the column at each dim-1 position
    bags: dict[str, frozenset[int]] = {}  # tensor -> the columns its values come from (layout lost)
    limits: list[int | None] = [None] * k
    for node in nodes:
        target = str(node.get("target", ""))
        op = target.split(".")[3] if target.startswith("torch.ops.aten.") else ""
        args = _arguments(node)
        first = next((_tensor(a) for a in args.values() if _tensor(a)), None)
        outs = [o.get("as_tensor", {}).get("name") for o in node.get("outputs", []) if "as_tensor" in o]
        many = [t.get("name") for o in node.get("outputs", []) for t in o.get("as_tensors", [])]
        if op == "embedding":
            indices = _tensor(args.get("indices", {}))
            columns = set(layouts.get(indices, ())) | set(bags.get(indices, ())) if indices else set()
            table = _shape(values[_tensor(args.get("weight", {})) or ""])[0] if _tensor(args.get("weight", {})) \
                else None
            for column in columns:
                if isinstance(table, int):
                    limits[column] = table if limits[column] is None else min(limits[column], table)  # type: ignore
            continue
        dim = args.get("dim", {}).get("as_int")
        if first in layouts:
            layout = layouts[first]
            if op == "select" and dim in (1, -1):
                index = int(args.get("index", {}).get("as_int", 0))
                if -len(layout) <= index < len(layout):
                    bags.update({out: frozenset({layout[index]}) for out in outs})
            elif op in ("slice", "narrow") and dim == 0 or op in _SAME_LAYOUT:
                layouts.update({out: layout for out in outs})
            elif op == "slice" and dim in (1, -1):
                start = args.get("start", {}).get("as_int") or 0
                end = args.get("end", {}).get("as_int")
                step = args.get("step", {}).get("as_int") or 1
                layouts.update({out: layout[slice(start, end, step)] for out in outs})
            elif op == "unbind" and dim in (1, -1):
                bags.update({out: frozenset({column}) for out, column in zip(many, layout)})
            elif op in _SAME_VALUES:
                bags.update({out: frozenset(layout) for out in outs})
        elif first in bags and op in _SAME_VALUES:
            bags.update({out: bags[first] for out in outs})
    return tuple(limits)
