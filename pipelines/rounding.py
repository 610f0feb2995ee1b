"""How far floating-point rounding can move an MLP's outputs: the tolerance of a recomputed prediction.

Two correct forwards of the same model differ by the order in which their BLAS
kernels add terms up (tile sizes, threads, FMA, another CPU or a GPU). A sum of
float terms is exact to within a few unit roundoffs of the sum of its terms'
magnitudes, whatever the order; when large terms cancel to a small result (an
un-normalised feature, a saturated row) that can be far more than the result
itself. So the tolerance has to scale with the magnitudes the computation went
through, not with the output alone.

`rounding_scale` propagates them through the layers in float64: at each layer
the sum of |w|*|x| of every term (plus |b|), the error carried from the layers
before through |W|, damped by the activation's steepest slope, plus the
output's own size (the activation's rounding). A correct forward in a
precision with unit roundoff u stays within a few u * scale of the exact
result; `within_rounding` allows `ROUNDING_FACTOR` of them (measured: the
worst of 240 comparisons of numpy's and torch's forwards, 1-2 threads, was 1.6).

    >>> w = np.array([[1.0, -1.0]], np.float32)
    >>> rounding_scale([(w, None)], np.array([[1000.0, 999.0]], np.float32), "none", "none").tolist()
    [[2000.0]]
    >>> within_rounding(np.array([[1.0001]]), np.array([[1.0]]), np.array([[2000.0]]), "fp32").tolist()
    [[True]]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# The unit roundoff of each precision's arithmetic (tf32 multiplies with a 10-bit mantissa, like fp16).
UNIT_ROUNDOFF = {"fp32": 2.0**-24, "tf32": 2.0**-11, "bf16": 2.0**-8, "fp16": 2.0**-11}
# Rounding errors allowed per unit of scale: two forwards may each be off by a few, in opposite directions.
ROUNDING_FACTOR = 8.0
# The steepest slope of each activation: how much an error in its input can grow through it.
_SLOPE = {"sigmoid": 0.25, "relu": 1.0, "tanh": 1.0, "none": 1.0, "softmax": 1.0}


def _activate(name: str, z: np.ndarray) -> np.ndarray:
    if name == "sigmoid":
        return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow for large |z|
    if name == "relu":
        return np.maximum(z, 0.0)
    if name == "tanh":
        return np.tanh(z)
    if name == "softmax":
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    return z


def rounding_scale(layers: Sequence[tuple[Any, Any]], x: np.ndarray, activation: str,
                   output_activation: str) -> np.ndarray:
    """(rows, outputs) float64: the magnitude rounding errors of each output are proportional to.

    `layers` are (weight (out, in), bias (out,) or None) as numpy arrays or CPU tensors; `x` is
    (rows, in). A NaN in a row gives NaN for that row.
    """
    h = np.asarray(x, dtype=np.float64)
    err = np.zeros_like(h)
    for i, (w, b) in enumerate(layers):
        w = np.asarray(w, dtype=np.float64)
        w_abs = np.abs(w).T  # (in, out)
        terms = np.abs(h) @ w_abs
        z = h @ w.T
        if b is not None:
            b = np.asarray(b, dtype=np.float64)
            terms += np.abs(b)
            z += b
        name = output_activation if i == len(layers) - 1 else activation
        err = _SLOPE[name] * (err @ w_abs + terms)  # earlier errors carried, plus this layer's sums
        if name == "softmax":  # every output moves with the largest change of its inputs
            err = np.repeat(err.max(axis=1, keepdims=True), err.shape[1], axis=1)
        h = _activate(name, z)
        err += np.abs(h)
    return err


def tolerance(scale: np.ndarray, precision: str) -> np.ndarray:
    """The largest difference two correct forwards in `precision` may show, given `rounding_scale`."""
    return ROUNDING_FACTOR * UNIT_ROUNDOFF[precision] * scale


def within_rounding(got: np.ndarray, want: np.ndarray, scale: np.ndarray, precision: str) -> np.ndarray:
    """Elementwise: `got` equals `want` within rounding (NaN where both are NaN counts as equal)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    with np.errstate(invalid="ignore"):
        close = np.abs(got - want) <= tolerance(scale, precision)
    return close | (np.isnan(got) & np.isnan(want))
