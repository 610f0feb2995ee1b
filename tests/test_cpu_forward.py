"""Issue 15, item 4: the numpy forward's tiny-batch path. Its sigmoid is torch's CPU formula, 1 / (1 + e^-x),
with torch's results at the extremes (0 where e^-x overflows, NaN kept, +-inf to 1 / 0); a thread that set
numpy's error state for good (`quiet_thread`, a lane child's main thread) runs `submit` without a context,
with the same results and no warning, and any other thread still runs it under its own `errstate`."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
import torch

import workers.cpu_forward
from workers.cpu_forward import NumpyForward, quiet_thread

EXTREMES = np.array([-1e30, -200.0, -104.0, -100.0, -95.0, -89.0, -88.7, -88.0, -80.0, -20.0, -1e-3, 0.0, 1e-3, 5.0,
                     20.0, 88.8, 100.0, 1e30, np.nan, np.inf, -np.inf], np.float32)


def _forward(activation: str) -> NumpyForward:
    return NumpyForward([(np.eye(1, dtype=np.float32), None)], "none", activation)


@pytest.mark.parametrize("activation, function", [("sigmoid", torch.sigmoid), ("tanh", torch.tanh),
                                                  ("relu", torch.relu)])
def test_the_activations_at_the_extremes_are_torchs(activation: str, function: object) -> None:
    x = np.concatenate([EXTREMES, np.random.default_rng(3).standard_normal(2_000).astype(np.float32) * 30])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow in e^-x is expected and silenced, never a warning
        got = _forward(activation).submit(x[:, None])()[:, 0]
    want = function(torch.from_numpy(x)).numpy()  # type: ignore[operator]
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(got == 0, want == 0)  # 0 exactly where torch's float32 gives 0
    np.testing.assert_allclose(got, want, rtol=4e-7, atol=0)  # a few ulps of float32, no more


def test_a_quiet_thread_submits_without_a_context_and_others_keep_theirs() -> None:
    x = np.ascontiguousarray(np.tile(EXTREMES, 5)[:, None])
    forward = _forward("sigmoid")
    want = forward.submit(x)()
    seen: dict[str, object] = {}

    def quiet() -> None:
        quiet_thread()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            seen["quiet"] = forward.submit(x)()
            seen["quiet_thread"] = workers.cpu_forward._here.quiet

    def other() -> None:  # numpy's error state is per thread: this one's is the default, `submit` sets its own
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            seen["other"] = forward.submit(x)()
            seen["other_state"] = np.geterr()["over"]

    for target in (quiet, other):  # one after the other: the second may get the first's thread id
        thread = threading.Thread(target=target)
        thread.start()
        thread.join()
    assert seen["quiet_thread"] is True
    assert seen["other_state"] == "warn"
    np.testing.assert_array_equal(seen["quiet"], want)
    np.testing.assert_array_equal(seen["other"], want)


@pytest.mark.parametrize("rows", [100, 3_000])  # one chunk; several (max_rows 1,024 for these widths)
def test_a_model_sets_columns_are_each_models_own_forward(rows: int) -> None:
    """A set's first layers run as one stacked product (with sigmoid layers kept negated): each model's
    columns are that model's forward alone, bit for bit, and a tiny batch's view equals the chunked copy."""
    rng = np.random.default_rng(8)

    def layers(widths: list[int]) -> list[tuple[np.ndarray, np.ndarray | None]]:
        return [(rng.standard_normal((b, a)).astype(np.float32), rng.standard_normal(b).astype(np.float32))
                for a, b in zip(widths, widths[1:])]

    a, b = layers([6, 9, 1]), layers([6, 4, 3])
    x = rng.standard_normal((rows, 6)).astype(np.float32) * 40
    x[3, 2] = np.nan
    both = NumpyForward(a, "sigmoid", "sigmoid", more=[b]).submit(x)()
    alone = [NumpyForward(m, "sigmoid", "sigmoid").submit(x)() for m in (a, b)]
    assert both.shape == (rows, 4)
    np.testing.assert_array_equal(both[:, :1], alone[0])
    np.testing.assert_array_equal(both[:, 1:], alone[1])
    forward = NumpyForward(a, "sigmoid", "sigmoid")
    forward.max_rows = 64  # the same rows in chunks of 64, through the chunked copy into `out`
    np.testing.assert_array_equal(forward.submit(x)(), alone[0])
