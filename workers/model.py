"""Model files: safe loading, shape checks, and the MLP forward pass.

A model is a `state_dict` (`.pt`/`.pth`, loaded with `weights_only=True`) or a
`.safetensors` file of an `nn.Sequential` whose weighted layers are
`nn.Linear`, each optionally followed by an `nn.BatchNorm1d` (folded into it).
Activations and Dropout hold no weights; activations come from the job config.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch

from basis.errors import ModelError
from workers.modelfile import ModelSpec, linear_stack, looks_like_safetensors, read_model_bytes, safetensors_header
from workers.programfile import ProgramSpec, inspect_program, is_program

if TYPE_CHECKING:
    from workers.program import Program

_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def read_model(uri: str) -> tuple[bytes, ModelSpec, list[tuple[torch.Tensor, torch.Tensor | None]]]:
    """Read, check and hash a model file.

    Returns the raw bytes, the spec and the (weight, bias) pairs in layer order.

    Example:
        >>> _, spec, _ = read_model("model.pt")  # doctest: +SKIP
        >>> spec.layers  # doctest: +SKIP
        ((2, 3, False), (3, 1, False))
    """
    data = read_model_bytes(uri)
    layers = parse_layers(data, uri)
    return data, ModelSpec(uri, hashlib.sha256(data).hexdigest(), shapes_of(layers)), layers


def shapes_of(layers: list[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[tuple[int, int, bool], ...]:
    """(in_features, out_features, has_bias) per layer, as `ModelSpec.layers` holds them."""
    return tuple((int(w.shape[1]), int(w.shape[0]), b is not None) for w, b in layers)


def load_model(uri: str, *, activation: str, output_activation: str, device: torch.device,
               precision: str) -> tuple[ModelSpec | ProgramSpec, MLP | Program]:
    """A model file's spec and its forward pass on `device`, the format chosen once from the bytes.

    A `torch.export` archive becomes a `Program` (`workers.program`), anything
    else an `MLP` of its Linear layers with the configured activations. Both
    are called as `model(features)` or `model(features, codes)` and return
    (rows, outputs) float32.

    Example:
        >>> spec, model = load_model("m.pt2", activation="relu", output_activation="none",
        ...                          device=torch.device("cpu"), precision="fp32")  # doctest: +SKIP
    """
    data = read_model_bytes(uri)
    if is_program(data):
        from workers.program import Program

        spec = inspect_program(data, uri, hashlib.sha256(data).hexdigest())
        return spec, Program(data, spec, device, precision)
    layers = parse_layers(data, uri)
    return (ModelSpec(uri, hashlib.sha256(data).hexdigest(), shapes_of(layers)),
            MLP(layers, activation, output_activation, device, precision))


def inspect_model(uri: str) -> ModelSpec | ProgramSpec:
    """The spec of a model file (what the driver validates against); see `workers.modelfile`."""
    from workers.modelfile import inspect_model as inspect

    return inspect(uri)


def parse_layers(data: bytes, name: str) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """(weight, bias) per Linear layer, in order, shapes checked to chain, BatchNorm1d folded
    (`workers.modelfile.linear_stack`, the parser the torch-free readers share)."""
    if name.endswith(".safetensors") or looks_like_safetensors(data):
        tensors, keys = _load_safetensors(data, name)
    else:
        tensors = _load_state_dict(data, name)
        keys = list(tensors)
    arrays = {key: (tensors[key].float() if tensors[key].is_floating_point() else tensors[key]).numpy()
              for key in keys}
    return [(torch.from_numpy(w), None if b is None else torch.from_numpy(b)) for w, b in linear_stack(arrays, name)]


def _load_state_dict(data: bytes, name: str) -> Mapping[str, torch.Tensor]:
    if not data.startswith((b"PK", b"\x80")):  # neither a torch zip archive nor a legacy pickle stream
        raise ModelError(f"model {name!r} is not a readable PyTorch state_dict or safetensors file")
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelError(
            f"model {name!r} needs pickle code to load, which batch-infer refuses (it never executes "
            f"code from a model file). Save the weights instead: torch.save(model.state_dict(), path). "
            f"Detail: {_unsupported_global(exc)}"
        ) from exc
    except Exception as exc:  # torch raises many types for a file that isn't a checkpoint
        raise ModelError(f"model {name!r} is not a readable PyTorch state_dict or safetensors file: {exc}") from exc
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(
            f"model {name!r} holds a {type(obj).__name__}, not a state_dict of tensors; "
            f"save it with torch.save(model.state_dict(), path)"
        )
    return obj


def _unsupported_global(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return next((line for line in lines if "Unsupported global" in line), lines[0] if lines else "")


def _load_safetensors(data: bytes, name: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    from safetensors.torch import load as load_safetensors

    try:
        tensors = load_safetensors(data)
    except Exception as exc:
        raise ModelError(f"model {name!r} is not a readable safetensors file: {exc}") from exc
    return tensors, list(safetensors_header(data))


# In place: each layer's output is a fresh tensor, so no extra allocation per activation.
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sigmoid": torch.sigmoid_,
    "relu": torch.relu_,
    "tanh": torch.tanh_,
    "none": lambda x: x,
    "softmax": lambda x: torch.softmax(x, dim=-1),
}
_SOFTMAX = _ACTIVATIONS["softmax"]


class MLP:
    """The forward pass: Linear layers with the configured activations.

    Example:
        >>> mlp = MLP([(torch.ones(1, 2), None)], "sigmoid", "none", torch.device("cpu"), "fp32")
        >>> mlp(torch.zeros(4, 2)).shape
        torch.Size([4, 1])
    """

    def __init__(
        self,
        layers: list[tuple[torch.Tensor, torch.Tensor | None]],
        activation: str,
        output_activation: str,
        device: torch.device,
        precision: str,
    ) -> None:
        self.dtype = _DTYPES[precision]
        self.device = device
        self.layers = [
            (w.to(device, self.dtype).contiguous(), None if b is None else b.to(device, self.dtype))
            for w, b in layers
        ]
        self.activations = [_ACTIVATIONS[activation]] * (len(layers) - 1) + [_ACTIVATIONS[output_activation]]

    def __call__(self, x: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
        """(rows, in_features) -> (rows, out_features) float32 (an MLP takes no categorical codes)."""
        x = x.to(self.device, self.dtype, non_blocking=True)
        for (weight, bias), act in zip(self.layers, self.activations):
            x = act(torch.nn.functional.linear(x, weight, bias))
        return x.float()

    def columns(self, x: torch.Tensor) -> torch.Tensor:
        """The same pass on the CPU in fp32 with rows as columns: (in_features, rows) -> (out_features, rows).

        `weight @ x` (+ bias) on the stacked (features, rows) buffer as it lies, where `__call__`
        multiplies its transpose: measured on one core, 64->256->256->1 took 1.52 against 1.67 s per
        million rows (medians of 21; 64->16->1 within noise). The activation runs on the features'
        axis (softmax over dim 0).
        """
        for (weight, bias), act in zip(self.layers, self.activations):
            x = torch.addmm(bias[:, None], weight, x) if bias is not None else weight @ x
            x = torch.softmax(x, dim=0) if act is _SOFTMAX else act(x)
        return x

    @property
    def by_columns(self) -> bool:
        """Whether `columns` runs it (fp32 on the CPU)."""
        return self.device.type == "cpu" and self.dtype == torch.float32

    max_batch = None  # any number of rows per pass
    reentrant = True  # no state between calls: threads may run it at once (`Forward.concurrent`)

    @property
    def outputs(self) -> int:
        return int(self.layers[-1][0].shape[0])

    @property
    def widest(self) -> int:
        """The widest layer output (sizes the CPU chunk that keeps activations in cache)."""
        return max(int(weight.shape[0]) for weight, _ in self.layers)
