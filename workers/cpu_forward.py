"""The CPU forward pass without torch, for the driver lane (`pipelines.lane`).

A small job is mostly `import torch` (1.3-1.7 s of a 2 s run on the benchmark
machine). In the driver lane, a model whose weights `workers.modelfile.read_weights`
can read (every fp32-computable `state_dict` or safetensors file of Linear
layers) runs here on numpy's BLAS instead: the same layers, activations and
cache-sized row chunks as `workers.device.Forward` on CPU, with results equal to
torch's within float32 rounding (a few ulps; the tests compare the two). bf16
and fp16 precision, and anything `read_weights` leaves to torch, use torch.

Example:
    >>> forward = NumpyForward([(np.ones((1, 2), np.float32), None)], "sigmoid", "none")
    >>> forward.submit(np.zeros((3, 2), np.float32))().ravel().tolist()
    [0.0, 0.0, 0.0]
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import numpy as np

_ACTIVATION_BYTES = 4 << 20  # the widest activation of a chunk stays in cache (as workers.device)
_here = threading.local()  # `quiet`: this thread's numpy error state was set by `quiet_thread`


def quiet_thread() -> None:
    """Ignore float overflow and invalid-value errors in numpy for good in the calling thread (numpy's error
    state is per thread), so `NumpyForward.submit` there runs without an `errstate` context per call (a lane
    child's main thread: its own process, a tiny batch a call, ~2 us a call). Other threads keep their own."""
    np.seterr(over="ignore", invalid="ignore")
    _here.quiet = True  # per thread object (a thread's id may be reused by a later thread; this may not)


def _sigmoid_of_negated(h: np.ndarray) -> None:
    """The sigmoid of -h, in place, as torch computes the sigmoid of x on the CPU: 1 / (1 + e^-x). Its layer
    keeps its weights and bias negated (`_NEGATED`, `NumpyForward._model`), so the layer's product is already
    -x, bit for bit (negation is exact, and a sum of negated terms is the negated sum in any order): one
    ufunc call less a layer. e^-x overflows to inf below x = -88.7 (ignored: `submit` runs with numpy's
    overflow errors off), giving 0 there, as torch's float32 kernel does; NaN stays NaN, -inf gives 0 and
    inf 1. Whole-array ufuncs only (masked writes, `h[x < 0] *= ...`, cost 3-10x the arithmetic; on a tiny
    batch each ufunc call is most of its cost)."""
    np.exp(h, out=h)
    h += 1.0
    np.reciprocal(h, out=h)


def _softmax(h: np.ndarray) -> None:
    """In place over the outputs (axis 0 of the (outputs, rows) chunk)."""
    h -= h.max(axis=0, keepdims=True)
    np.exp(h, out=h)
    h /= h.sum(axis=0, keepdims=True)


_ACTIVATIONS: dict[str, Callable[[np.ndarray], None]] = {
    "sigmoid": _sigmoid_of_negated,
    "relu": lambda h: np.maximum(h, 0, out=h),  # NaN stays NaN, as torch.relu
    "tanh": lambda h: np.tanh(h, out=h),
    "none": lambda h: None,
    "softmax": _softmax,
}
_NEGATED = frozenset({"sigmoid"})  # activations applied to their layer's negated product


class NumpyForward:
    """`workers.device.Forward`'s CPU interface (`outputs`, `each`, `submit`) on numpy.

    `more`: the layers of a model set's other models; each chunk of rows goes through every model while it
    is in cache, and the result holds their outputs side by side, in order.
    """

    concurrent = False  # numpy's BLAS has its own threads: one caller at a time

    def side_by_side(self) -> bool:
        """Never: one caller at a time (`workers.device.Forward.side_by_side`)."""
        return False

    def __init__(self, layers: list[tuple[np.ndarray, np.ndarray | None]], activation: str,
                 output_activation: str, *, more: Sequence[list[tuple[np.ndarray, np.ndarray | None]]] = ()) -> None:
        self.models = [self._model(stack, activation, output_activation) for stack in (layers, *more)]
        self.layers, self.activations = self.models[0]
        # one model with layers: its last activation is a fresh array, never the caller's (reused) matrix
        self._alone = len(self.models) == 1 and len(self.layers) > 0
        self.each = [int(stack[-1][0].shape[0]) for stack, _ in self.models]
        self.outputs = sum(self.each)
        widest = max(int(w.shape[0]) for stack, _ in self.models for w, _ in stack)
        self.max_rows = min(65_536, max(1_024, _ACTIVATION_BYTES // (4 * widest)))
        # A set's first layers all read the same features: stacked into one (sum of outputs, width) product,
        # the chunk is read from memory once, not once per model (a set of 4 64-16-1 MLPs: 1.74x one model's
        # run time unstacked).
        self._first: tuple[np.ndarray, np.ndarray | None] | None = None
        if len(self.models) > 1:
            firsts = [stack[0] for stack, _ in self.models]
            biases = [b if b is not None else np.zeros((w.shape[0], 1), np.float32) for w, b in firsts]
            self._first = (np.ascontiguousarray(np.concatenate([w for w, _ in firsts])),
                           None if all(b is None for _, b in firsts) else np.concatenate(biases))

    @staticmethod
    def _model(layers: list[tuple[np.ndarray, np.ndarray | None]], activation: str, output_activation: str
               ) -> tuple[list[tuple[np.ndarray, np.ndarray | None]], list[Callable[[np.ndarray], None]]]:
        """A model's layers as used (float32, biases as columns) and each one's activation; a layer followed
        by an activation in `_NEGATED` (the sigmoid) is kept negated (the same values, one ufunc call less)."""
        names = [activation] * (len(layers) - 1) + [output_activation]
        stack = []
        for (w, b), name in zip(layers, names):
            sign = np.float32(-1.0 if name in _NEGATED else 1.0)
            stack.append((np.ascontiguousarray(np.asarray(w, dtype=np.float32) * sign),
                          None if b is None else np.asarray(b, dtype=np.float32)[:, None] * sign))
        return stack, [_ACTIVATIONS[name] for name in names]

    def submit(self, matrix: np.ndarray) -> Callable[[], np.ndarray]:
        """The (rows, outputs) float32 predictions of a (rows, width) batch (computed now; call to collect)."""
        features = matrix.T  # (width, rows): C-contiguous when matrix is a stacked buffer's transpose
        if getattr(_here, "quiet", False):  # `quiet_thread` set numpy's error state for good here
            out = self._pass(features)
        else:
            with np.errstate(over="ignore", invalid="ignore"):
                out = self._pass(features)
        return lambda: out

    def _pass(self, features: np.ndarray) -> np.ndarray:
        """(rows, outputs) predictions of (width, rows) `features`, every model over each cache-sized chunk."""
        rows = features.shape[1]
        if rows <= self.max_rows and self._alone:  # one chunk of one model (a tiny batch): its last
            stack, activations = self.models[0]  # activation's (outputs, rows), handed out transposed
            return self._through(stack, activations, features).T
        out = np.empty((rows, self.outputs), dtype=np.float32)
        for start in range(0, rows, self.max_rows):
            chunk = features[:, start : start + self.max_rows]
            first = None
            if self._first is not None:  # every model's first layer in one product
                first = self._first[0] @ chunk
                if self._first[1] is not None:
                    first += self._first[1]
            column = row = 0
            for stack, activations in self.models:
                mine = None
                if first is not None:  # this model's rows: a contiguous view
                    mine = first[row : row + stack[0][0].shape[0]]
                    row += mine.shape[0]
                h = self._through(stack, activations, chunk, mine)
                out[start : start + h.shape[1], column : column + h.shape[0]] = h.T
                column += h.shape[0]
        return out

    @staticmethod
    def _through(stack: list[tuple[np.ndarray, np.ndarray | None]], activations: list[Callable[[np.ndarray], None]],
                 h: np.ndarray, first: np.ndarray | None = None) -> np.ndarray:
        """(width, rows) `h` through one model's layers: its (outputs, rows) last activation, never `h` itself
        when the model has a layer; `first`: its first layer's product (with bias), already computed."""
        for index, ((weight, bias), activate) in enumerate(zip(stack, activations)):
            if index == 0 and first is not None:
                h = first
            else:
                h = weight @ h  # (out, in) @ (in, chunk) -> (out, chunk)
                if bias is not None:
                    h += bias
            activate(h)
        return h
