"""Model files users actually train: Linear -> BatchNorm1d -> activation -> Dropout blocks, folded when loaded."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import read_output, write_files
from safetensors.torch import save as save_safetensors

import pipelines
from basis.errors import ModelError
from workers.cpu_forward import NumpyForward
from workers.model import MLP, parse_layers
from workers.modelfile import inspect_model, read_weights


def tabular_network(width: int, seed: int = 0) -> torch.nn.Sequential:
    """The most common tabular block twice, with running statistics far from (0, 1), in eval mode."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(width, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Dropout(0.3),
        torch.nn.Linear(16, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Dropout(0.3),
        torch.nn.Linear(8, 1), torch.nn.Sigmoid(),
    )
    with torch.no_grad():
        for norm in (model[1], model[5]):
            n = norm.num_features
            norm.running_mean.copy_(torch.empty(n).uniform_(-40, 40))
            norm.running_var.copy_(torch.empty(n).uniform_(0.01, 300))
            norm.weight.copy_(torch.empty(n).uniform_(-3, 3))
            norm.bias.copy_(torch.empty(n).uniform_(-5, 5))
            norm.num_batches_tracked.fill_(1234)
    return model.eval()


def _saved(state: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _features(rows: int, width: int, seed: int = 1) -> np.ndarray:
    # on the scale the running statistics describe, so the BatchNorm's shift matters
    return (np.random.default_rng(seed).standard_normal((rows, width)) * 20).astype(np.float32)


@pytest.mark.parametrize("name", ["m.pt", "m.safetensors"])
def test_batchnorm_is_folded_into_its_linear_to_float32_rounding(name: str) -> None:
    model = tabular_network(6)
    state = model.state_dict()
    data = _saved(state) if name.endswith(".pt") else save_safetensors({k: v.contiguous() for k, v in state.items()})
    x = _features(5000, 6)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()[:, 0]
        hidden = model[:3](torch.from_numpy(x)).numpy()  # after the first Linear -> BatchNorm1d -> ReLU

    layers = parse_layers(data, name)
    assert [tuple(w.shape) for w, _ in layers] == [(16, 6), (8, 16), (1, 8)]  # 3 Linear layers, no extra pass
    torch_out = MLP(layers, "relu", "sigmoid", torch.device("cpu"), "fp32")(torch.from_numpy(x)).numpy()[:, 0]
    weights = read_weights(data, name)  # the torch-free reader folds the same way, bit for bit
    assert weights is not None
    for (w, b), (tw, tb) in zip(weights, layers):
        np.testing.assert_array_equal(w, tw.numpy())
        np.testing.assert_array_equal(b, tb.numpy())
    numpy_out = NumpyForward(weights, "relu", "sigmoid").submit(x)()[:, 0]

    # The first block folded against torch's BatchNorm: float32 rounding of terms of size |W||x|.
    w0, b0 = layers[0]
    folded_hidden = np.maximum(x.astype(np.float64) @ w0.numpy().T.astype(np.float64) + b0.numpy(), 0)
    scale = np.abs(x).astype(np.float64) @ np.abs(w0.numpy().T).astype(np.float64) + np.abs(b0.numpy())
    assert np.all(np.abs(folded_hidden - hidden) <= 1e-5 * (scale + 1))
    for out in (torch_out, numpy_out):
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(expected, expected.mean(), atol=1e-2)  # the outputs are not saturated: a real check


def test_dropout_holds_no_weights_and_changes_nothing_in_eval() -> None:
    with_dropout = tabular_network(4)
    without = torch.nn.Sequential(*[m for m in with_dropout if not isinstance(m, torch.nn.Dropout)])
    a = parse_layers(_saved(with_dropout.state_dict()), "a.pt")
    b = parse_layers(_saved(without.state_dict()), "b.pt")  # renumbered: BatchNorm still right after its Linear
    for (wa, ba), (wb, bb) in zip(a, b):
        assert torch.equal(wa, wb) and torch.equal(ba, bb)


def test_batchnorm_without_affine_and_linear_without_bias() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4, bias=False), torch.nn.BatchNorm1d(4, affine=False)).eval()
    with torch.no_grad():
        model[1].running_mean.copy_(torch.tensor([1.0, -2.0, 3.0, 0.5]))
        model[1].running_var.copy_(torch.tensor([4.0, 0.25, 9.0, 1.0]))
    x = _features(100, 3)
    (w, b), = parse_layers(_saved(model.state_dict()), "m.pt")
    with torch.no_grad():
        np.testing.assert_allclose(torch.nn.functional.linear(torch.from_numpy(x), w, b).numpy(),
                                   model(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("state", "message"), [
    ({"0.weight": torch.ones(4, 3), **{f"2.{k}": v for k, v in torch.nn.BatchNorm1d(4).state_dict().items()}},
     "BatchNorm1d '2' does not directly follow a Linear"),  # Linear -> ReLU -> BatchNorm1d: not foldable into it
    ({**{f"0.{k}": v for k, v in torch.nn.BatchNorm1d(3).state_dict().items()}, "1.weight": torch.ones(2, 3)},
     "BatchNorm1d '0' does not directly follow a Linear"),
    ({"0.weight": torch.ones(4, 3), "1.weight": torch.ones(4), "1.bias": torch.ones(4)},  # LayerNorm(4)
     r"layer 1 \('1'\) needs a 2-D 'weight'.*found shape \(4,\).*LayerNorm"),
    ({"0.weight": torch.ones(4, 3), "1.running_mean": torch.zeros(3), "1.running_var": torch.ones(3)},
     r"BatchNorm1d '1' running_mean has shape \(3,\), expected \(4,\)"),
    ({"0.weight": torch.ones(4, 3), "1.scale": torch.ones(4)}, "holds tensor '1.scale'"),
])
def test_state_dicts_that_are_not_linear_batchnorm_stacks_are_refused_naming_the_tensor(
        state: dict[str, torch.Tensor], message: str, tmp_path: Path) -> None:
    data = _saved(state)
    with pytest.raises(ModelError, match=message):
        parse_layers(data, "m.pt")
    assert read_weights(data, "m.pt") is None  # the torch-free reader leaves the verdict to torch
    (tmp_path / "m.pt").write_bytes(data)
    with pytest.raises(ModelError, match=message):
        inspect_model(str(tmp_path / "m.pt"))  # the driver's check names it too


def test_a_batchnorm_network_scores_a_table_like_torch_in_eval_mode(tmp_path: Path) -> None:
    model = tabular_network(5, seed=3)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    write_files(tmp_path / "in", [700, 300], 5, row_group_size=128)
    report = pipelines.run(model=str(tmp_path / "m.pt"), input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                           activation="relu", progress=False)
    assert report.status == "succeeded" and report.rows_out == 1000
    table = read_output(tmp_path / "out")
    inputs = pa.concat_tables([pq.read_table(p) for p in sorted((tmp_path / "in").glob("*.parquet"))])
    features = np.column_stack([inputs[f"f{j:02d}"].to_numpy() for j in range(5)])
    with torch.no_grad():
        expected = model(torch.from_numpy(features)).numpy()[:, 0]
    assert table["id"].to_pylist() == list(range(1000))
    np.testing.assert_allclose(table["prediction"].to_numpy(), expected, rtol=1e-4, atol=1e-6)
