"""A model file's spec (identity and layer shapes) and weights without importing torch.

The driver only needs the spec to plan, and importing torch costs it ~1.3 s
(the largest part of a small job's start); the driver lane's numpy forward pass
(`workers.cpu_forward`) needs the weights. `read_weights` reads both straight
from the file: a `.safetensors` file's JSON header and data, or the pickle of a
`torch.save` zip archive, unpickled with a loader that knows only an ordered
dict, tensors and float storages (nothing else can be built, so no code in the
file runs). Anything it does not recognise, or a file that does not check out,
goes to `workers.model.read_model`, the torch loader, which either accepts it
or raises the precise `ModelError`; so the result and the errors are always
the torch loader's.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from basis.errors import ConfigError, ModelError
from basis.storage import read_bytes, resolve
from workers.programfile import ProgramSpec, inspect_program, is_program

@dataclass(frozen=True)
class ModelSpec:
    """What the driver needs to know about a model: identity and shapes."""

    uri: str
    sha256: str
    layers: tuple[tuple[int, int, bool], ...]  # (in_features, out_features, has_bias) per Linear

    @property
    def in_features(self) -> int:
        return self.layers[0][0]

    @property
    def out_features(self) -> int:
        return self.layers[-1][1]

    format = "state_dict"
    categories = 0  # an MLP takes only the features

    def to_dict(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "layers": [[n_in, n_out] for n_in, n_out, _ in self.layers],
            "bias": [bias for _, _, bias in self.layers],
        }

    def check_categorical(self, columns: Sequence[str]) -> None:
        """`categorical` feeds embeddings, which only a `.pt2` program has (exit 2)."""
        if columns:
            raise ConfigError(
                f"'categorical' ({', '.join(columns)}) needs a torch.export program (.pt2) with embeddings; "
                f"model {self.uri!r} is a state_dict of Linear layers, which takes only the float features")


# What one row costs on one core of the benchmark machine (benchmarks/stages.py): decoding a
# float feature column, and one multiply-add of the CPU forward pass.
_DECODE_SECONDS_PER_VALUE = 6e-9
_FORWARD_SECONDS_PER_MAC = 25e-12


def forward_share(layers: tuple[tuple[int, int, bool], ...]) -> float:
    """The CPU forward pass's estimated share of a CPU replica's work per row (the rest: decode and write).

    Example:
        >>> round(forward_share(((64, 16, True), (16, 1, True))), 2)
        0.06
        >>> round(forward_share(((64, 256, True), (256, 256, True), (256, 1, True))), 2)
        0.84
    """
    forward = sum(n_in * n_out for n_in, n_out, _ in layers) * _FORWARD_SECONDS_PER_MAC
    return forward / (forward + layers[0][0] * _DECODE_SECONDS_PER_VALUE)


def inspect_model(uri: str) -> ModelSpec | ProgramSpec:
    """The spec of a model file (what the driver validates against); torch only when needed.

    The format is chosen here, once, from the file's bytes: a `torch.export`
    archive is a `ProgramSpec` (`workers.programfile`, read without torch),
    anything else a state_dict or safetensors file of Linear layers.

    Example:
        >>> inspect_model("model.pt").layers  # doctest: +SKIP
        ((64, 16, True), (16, 1, True))
    """
    data = read_model_bytes(uri)
    if is_program(data):
        return inspect_program(data, uri, hashlib.sha256(data).hexdigest())
    shapes = layer_shapes(data, uri)
    if shapes is None:  # the torch loader accepts it, or raises the precise ModelError
        from workers.model import parse_layers, shapes_of

        shapes = shapes_of(parse_layers(data, uri))
    return ModelSpec(uri, hashlib.sha256(data).hexdigest(), shapes)


def read_model_bytes(uri: str) -> bytes:
    """A model file's bytes; `ModelError` naming it when it cannot be read or does not exist."""
    location = resolve(uri)
    try:
        data = read_bytes(location.fs, location.path)
    except OSError as exc:
        raise ModelError(f"cannot read model {uri!r}: {exc}") from exc
    if data is None:
        raise ModelError(f"model file {uri!r} does not exist")
    return data


def layer_shapes(data: bytes, name: str) -> tuple[tuple[int, int, bool], ...] | None:
    """(in_features, out_features, has_bias) per Linear layer, or None when only torch can tell."""
    layers = read_weights(data, name)
    if layers is None:
        return None
    return tuple((int(weight.shape[1]), int(weight.shape[0]), bias is not None) for weight, bias in layers)


def read_weights(data: bytes, name: str) -> list[tuple[np.ndarray, np.ndarray | None]] | None:
    """The (weight, bias) float32 arrays per Linear layer, read without torch; None when only torch can tell.

    Float storages of any width (fp64, fp16, bf16) become float32, as torch's
    ``.to(float32)`` makes them; a BatchNorm1d after a Linear is folded into it
    (`linear_stack`). Used by the driver lane's torch-free forward pass
    (`workers.cpu_forward`); same files, same layers as `workers.model.read_model`.
    """
    try:
        arrays = _safetensors_arrays(data) if name.endswith(".safetensors") or looks_like_safetensors(data) \
            else _state_dict_arrays(data)
        return None if arrays is None else linear_stack(arrays, name)
    except Exception:  # anything unexpected, or a refusal: the torch loader decides and says why
        return None


BATCHNORM_EPS = 1e-5  # nn.BatchNorm1d's default; a state_dict does not store eps
_BATCHNORM_STATS = ("running_mean", "running_var")


def linear_stack(arrays: Mapping[str, np.ndarray], name: str) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """(weight, bias) float32 per Linear layer, in state-dict order, each BatchNorm1d folded into its Linear.

    The one parser of a state_dict's layers: the torch loader (`workers.model`)
    and the torch-free readers both call it, so both accept the same files and
    give the same weights. `arrays` maps state-dict keys to arrays (floats as
    float32, `num_batches_tracked` as an integer). A BatchNorm1d group
    (`running_mean`, `running_var`, optional affine `weight`/`bias`) must
    directly follow a Linear (`Linear -> BatchNorm1d -> activation -> Dropout`
    is the usual tabular block): in eval mode it is the affine map
    ``s * (y - mean) + beta`` with ``s = gamma / sqrt(var + eps)``, folded in
    float64 as ``W' = s[:, None] * W`` and ``b' = s * (b - mean) + beta``, then
    rounded once to float32. Raises `ModelError` naming the tensor otherwise.

    Example:
        >>> one = np.ones(1, np.float32)
        >>> arrays = {"0.weight": np.array([[2.0, 0.0]], np.float32), "1.running_mean": one, "1.running_var": 4 * one}
        >>> [np.round(a, 4).tolist() for a in linear_stack(arrays, "m.pt")[0]]  # 2x/2 and (0 - 1)/2
        [[[1.0, 0.0]], [-0.5]]
    """
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, array in arrays.items():
        prefix, _, kind = key.rpartition(".")
        if kind not in ("weight", "bias", *_BATCHNORM_STATS, "num_batches_tracked"):
            raise ModelError(
                f"model {name!r} holds tensor {key!r}: only nn.Linear layers (weight, bias), each optionally "
                f"followed by nn.BatchNorm1d, are supported in a state_dict"
            )
        groups.setdefault(prefix, {})[kind] = array
    if not groups:
        raise ModelError(f"model {name!r} holds no layers")
    layers: list[tuple[np.ndarray, np.ndarray | None]] = []
    previous = None  # the prefix of the Linear the next BatchNorm1d may follow
    for prefix, group in groups.items():
        if any(stat in group for stat in _BATCHNORM_STATS):
            if previous is None or not _adjacent(previous, prefix):
                raise ModelError(
                    f"model {name!r}: BatchNorm1d {prefix!r} does not directly follow a Linear layer; only "
                    f"Linear -> BatchNorm1d is folded (a BatchNorm1d after an activation changes the result)"
                )
            layers[-1] = _fold_batchnorm(*layers[-1], group, f"model {name!r}: BatchNorm1d {prefix!r}")
            previous = None
            continue
        layers.append(_linear(group, layers, f"model {name!r}: layer {len(layers)} ({prefix or 'root'!r})"))
        previous = prefix
    return layers


def _linear(group: Mapping[str, np.ndarray], before: list[tuple[np.ndarray, np.ndarray | None]],
            label: str) -> tuple[np.ndarray, np.ndarray | None]:
    weight, bias = group.get("weight"), group.get("bias")
    if weight is None or weight.ndim != 2:
        found = "none" if weight is None else f"shape {tuple(weight.shape)}"
        raise ModelError(f"{label} needs a 2-D 'weight' (out_features, in_features), found {found} "
                         f"(LayerNorm, or a BatchNorm1d without running statistics, is not supported)")
    if not np.issubdtype(weight.dtype, np.floating):
        raise ModelError(f"{label} weight has dtype {weight.dtype}, expected a float type")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ModelError(f"{label} bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    if before and before[-1][0].shape[0] != weight.shape[1]:
        raise ModelError(f"{label} takes {weight.shape[1]} inputs but the layer before it gives "
                         f"{before[-1][0].shape[0]} outputs; layer shapes must chain")
    return (np.ascontiguousarray(weight, np.float32),
            None if bias is None else np.ascontiguousarray(bias, np.float32))


def _fold_batchnorm(weight: np.ndarray, bias: np.ndarray | None, group: Mapping[str, np.ndarray],
                    label: str) -> tuple[np.ndarray, np.ndarray]:
    n = weight.shape[0]
    parts = {}
    for kind in ("running_mean", "running_var", "weight", "bias"):
        value = group.get(kind)
        if value is None and kind in _BATCHNORM_STATS:
            raise ModelError(f"{label} has no {kind!r}: a BatchNorm1d is folded from its running statistics")
        if value is not None and value.shape != (n,):
            raise ModelError(f"{label} {kind} has shape {tuple(value.shape)}, expected ({n},) "
                             f"(the Linear before it gives {n} outputs)")
        parts[kind] = None if value is None else value.astype(np.float64)
    scale = 1.0 / np.sqrt(parts["running_var"] + BATCHNORM_EPS)  # (n,) float64
    if parts["weight"] is not None:
        scale = scale * parts["weight"]
    shift = -parts["running_mean"] if bias is None else bias.astype(np.float64) - parts["running_mean"]
    folded_bias = scale * shift + (0.0 if parts["bias"] is None else parts["bias"])
    return ((weight.astype(np.float64) * scale[:, None]).astype(np.float32),
            folded_bias.astype(np.float32))


def _adjacent(linear: str, norm: str) -> bool:
    """Whether `norm` can directly follow `linear`: consecutive nn.Sequential indices where both are numbered."""
    parent_a, _, index_a = linear.rpartition(".")
    parent_b, _, index_b = norm.rpartition(".")
    if index_a.isdigit() and index_b.isdigit():
        return parent_a == parent_b and int(index_b) == int(index_a) + 1
    return True  # named layers ("fc", "bn"): their order in the state_dict is all there is


def looks_like_safetensors(data: bytes) -> bool:
    if len(data) < 9:
        return False
    (header_len,) = struct.unpack("<Q", data[:8])
    return 0 < header_len <= len(data) - 8 and data[8:9] == b"{"


def safetensors_header(data: bytes) -> dict[str, dict[str, Any]]:
    """A safetensors file's tensor entries (dtype, shape, offsets), in layer order.

    safetensors does not keep insertion order; nn.Sequential keys ("0.weight",
    "2.weight", "10.weight") are put back in order by their numeric parts.
    """
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    keys = [key for key in header if key != "__metadata__"]
    keys.sort(key=lambda key: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key.rpartition(".")[0])])
    return {key: header[key] for key in keys}


class _Unsure(Exception):
    """The pickle holds something this reader does not know: the torch loader decides."""


class _Storage:
    def __init__(self, name: str) -> None:
        self.name = name


# numpy dtypes of the storages and safetensors dtypes ("bf16": upper halves of float32s); integers are
# BatchNorm1d's `num_batches_tracked` (and weights of the wrong type, which `linear_stack` names)
_STORAGE_DTYPES = {"FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", "BFloat16Storage": "bf16",
                   "LongStorage": "<i8"}
_SAFETENSORS_DTYPES = {"F32": "<f4", "F64": "<f8", "F16": "<f2", "BF16": "bf16", "I64": "<i8"}


def _array(raw: bytes, dtype: str) -> np.ndarray:
    """Floats of any width as float32 (as torch's `.float()`), integers as they are."""
    if dtype == "bf16":
        return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    array = np.frombuffer(raw, dtype=dtype)
    return array.astype(np.float32) if array.dtype.kind == "f" else array.copy()


def _safetensors_arrays(data: bytes) -> dict[str, np.ndarray] | None:
    (header_len,) = struct.unpack("<Q", data[:8])
    body = memoryview(data)[8 + header_len:]
    arrays = {}
    for key, entry in safetensors_header(data).items():
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            return None
        start, stop = entry["data_offsets"]
        shape = tuple(int(n) for n in entry["shape"])
        arrays[key] = _array(bytes(body[start:stop]), dtype).reshape(shape)
    return arrays


class _ArrayUnpickler(pickle.Unpickler):
    """Builds only ordered dicts and float32 arrays from the archive's float storages; refuses every other global."""

    def __init__(self, file: io.BytesIO, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(file)
        self.archive, self.prefix = archive, prefix
        self.storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_array
        if module == "torch" and name in _STORAGE_DTYPES:
            return _Storage(name)
        raise _Unsure(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage" and isinstance(pid[1], _Storage)):
            raise _Unsure(repr(pid))
        key = str(pid[2])
        if key not in self.storages:
            self.storages[key] = _array(self.archive.read(f"{self.prefix}/data/{key}"),
                                          _STORAGE_DTYPES[pid[1].name])
        return self.storages[key]


def _rebuild_array(storage: np.ndarray, offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                   *args: Any) -> np.ndarray:
    shape, steps = tuple(int(n) for n in size), tuple(int(n) for n in stride)
    if not isinstance(storage, np.ndarray) or len(shape) != len(steps) or min(steps, default=0) < 0:
        raise _Unsure("tensor layout")
    if 0 in shape:
        return np.zeros(shape, dtype=storage.dtype)
    last = offset + sum((n - 1) * step for n, step in zip(shape, steps))
    if offset < 0 or last >= len(storage):
        raise _Unsure("tensor out of its storage")
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=shape,
                                           strides=tuple(step * storage.itemsize for step in steps))
    return np.array(view, dtype=storage.dtype, order="C")  # a copy: contiguous, and no view of the whole storage


def _state_dict_arrays(data: bytes) -> dict[str, np.ndarray] | None:
    if not data.startswith(b"PK"):
        return None
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            return None
        prefix = pickles[0].split("/")[0]
        if f"{prefix}/byteorder" in archive.namelist() and archive.read(f"{prefix}/byteorder").strip() != b"little":
            return None
        obj = _ArrayUnpickler(io.BytesIO(archive.read(pickles[0])), archive, prefix).load()
    if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        return None
    return dict(obj)
