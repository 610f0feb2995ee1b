"""The forward pass of a `torch.export` program (`.pt2`), the sibling of `workers.model.MLP`.

The program is loaded from `workers.programfile.safe_archive` (the checked
parts of the file: no pickle, no compiled code, no guard code; see that
module), never from the user's file as it is. It runs as `MLP` does inside
`workers.device.Forward` (pinned staging, copy stream, chunks): features
(rows, features) float32 and, when the program takes them, categorical codes
(rows, k) int64 in; (rows, outputs) float32 out. `precision` bf16/fp16 runs
it under `torch.autocast`; `activation`/`output_activation` do not apply.

Example:
    >>> program = Program(data, spec, torch.device("cpu"), "fp32")  # doctest: +SKIP
    >>> program(torch.zeros(4, spec.features)).shape  # doctest: +SKIP
    torch.Size([4, 1])
"""

from __future__ import annotations

import io

import torch

from basis.errors import ModelError
from workers.programfile import ProgramSpec, safe_archive

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Program:
    """A loaded `.pt2` program on one device."""

    def __init__(self, data: bytes, spec: ProgramSpec, device: torch.device, precision: str) -> None:
        self.spec = spec
        self.device = device
        self.autocast = _AUTOCAST.get(precision)
        try:
            program = torch.export.load(io.BytesIO(safe_archive(data, spec.uri)))
            if device.type != "cpu":  # constants the graph creates (torch.zeros(..., device="cpu")) move too
                from torch.export.passes import move_to_device_pass

                program = move_to_device_pass(program, device)
            self.module = program.module().to(device)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"model {spec.uri!r}: torch cannot load the program: {exc}") from exc
        self.outputs = spec.outputs
        self.widest = spec.widest
        self.max_batch = spec.max_batch

    def __call__(self, x: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
        """(rows, features) [+ (rows, k) int64] -> (rows, outputs) float32."""
        rows = x.shape[0]
        args = [x.to(self.device, torch.float32, non_blocking=True)]
        if codes is not None:
            args.append(codes.to(self.device, torch.int64, non_blocking=True))
        if self.autocast is None:
            out = self.module(*args)
        else:
            with torch.autocast(self.device.type, dtype=self.autocast):
                out = self.module(*args)
        return out.float().reshape(rows, self.outputs)
