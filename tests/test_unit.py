"""Pure unit tests: config, planning, naming, reconcile, model loading. No Ray."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import golden_model, mlp, save_mlp

import pipelines
import workers
from pipelines.cluster import ClusterView, Node, plan_replicas
from pipelines.commit import COMMITTED, State, reconcile, shard_entry
from pipelines.config import JobConfig
from basis.errors import ConfigError, InputError, ModelError
from pipelines.plan import (
    InputFile,
    Span,
    distinct_output_name,
    make_shards,
    output_name,
    resolve_columns,
    split_row_groups,
)
from basis.storage import resolve
from basis.listing import list_files, static_prefix
from workers.model import MLP, parse_layers, read_model
from workers.reader import feature_matrix, invalid_rows

BASE = {"model": "m.pt", "input": "in/", "output": "out/"}


# --- public surface -------------------------------------------------------------------------------

def test_exported_members() -> None:
    assert pipelines.__all__ == sorted(pipelines.__all__)
    assert set(pipelines.__all__) >= {"BatchInferError", "JobConfig", "plan", "run"}
    assert workers.__all__ == sorted(workers.__all__)
    for name in pipelines.__all__:
        assert hasattr(pipelines, name)
    assert issubclass(pipelines.LockHeldError, pipelines.BatchInferError)
    assert pipelines.LockHeldError.exit_code == 3 and pipelines.ConfigError.exit_code == 2


# --- config ---------------------------------------------------------------------------------------

def test_unknown_config_key_is_refused_with_a_hint() -> None:
    with pytest.raises(ConfigError, match=r"'batchsize' \(did you mean 'batch_size'\?\)"):
        JobConfig.from_dict({**BASE, "batchsize": 10})


def test_run_refuses_unknown_keyword() -> None:
    with pytest.raises(ConfigError, match="unknown config key"):
        pipelines.run(**BASE, replica=2)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model": ""}, "model"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": "many"}, "batch_size"),
        ({"replicas": -1}, "replicas"),
        ({"activation": "gelu"}, "activation"),
        ({"output_activation": "swish"}, "output_activation"),
        ({"precision": "fp8"}, "precision"),
        ({"invalid_rows": "drop"}, "invalid_rows"),
        ({"cpus_per_replica": 0}, "cpus_per_replica"),
        ({"gpus_per_replica": 1.5}, "gpus_per_replica"),
        ({"overwrite": "perhaps"}, "overwrite"),
        ({"features": ["a", "a"]}, "features"),
        ({"features": ["a"], "passthrough": ["a"]}, "both"),
        ({"max_replicas": 0}, "max_replicas"),
        ({"max_replicas": "many"}, "max_replicas"),
        ({"replicas": 5, "max_replicas": 4}, r"'replicas' \(5\) is more than 'max_replicas' \(4\)"),
        ({"start_timeout": 0}, "start_timeout.*seconds"),
        ({"start_timeout": "soon"}, "start_timeout"),
        ({"shard_timeout": -1}, "shard_timeout"),
        ({"shared_storage": "perhaps"}, "shared_storage"),
    ],
)
def test_invalid_values_name_the_key(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        JobConfig.from_dict({**BASE, **change})


def test_config_defaults_and_normalisation() -> None:
    cfg = JobConfig.from_dict({**BASE, "features": "f0, f1", "replicas": "auto", "batch_size": "4096",
                               "cpus_per_replica": "0.5", "overwrite": "true"})
    assert cfg.features == ("f0", "f1")
    assert cfg.replicas is None and cfg.batch_size == 4096 and cfg.cpus_per_replica == 0.5 and cfg.overwrite
    assert (cfg.prediction_column, cfg.activation, cfg.invalid_rows, cfg.max_attempts) == (
        "prediction", "sigmoid", "quarantine", 3)
    assert JobConfig.from_dict(cfg.to_dict()) == cfg
    assert (cfg.max_replicas, cfg.start_timeout, cfg.shared_storage) == (None, None, False)


def test_elastic_config_keys() -> None:
    cfg = JobConfig.from_dict({**BASE, "replicas": 4, "max_replicas": "4", "start_timeout": "90",
                               "shared_storage": "yes"})
    assert (cfg.replicas, cfg.max_replicas, cfg.start_timeout, cfg.shared_storage) == (4, 4, 90.0, True)
    auto = JobConfig.from_dict({**BASE, "replicas": "auto", "max_replicas": 2, "start_timeout": "auto"})
    assert (auto.replicas, auto.max_replicas, auto.start_timeout) == (None, 2, None)
    assert JobConfig.from_dict({**BASE, "max_replicas": "auto"}).max_replicas is None
    assert JobConfig.from_dict(cfg.to_dict()) == cfg


def test_from_yaml_overrides_win(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("model: m.pt\ninput: in/\noutput: out/\nbatch_size: 100\n")
    assert JobConfig.from_yaml(job, {"batch_size": 7}).batch_size == 7
    job.write_text("- not a mapping\n")
    with pytest.raises(ConfigError, match="mapping"):
        JobConfig.from_yaml(job)


# --- planning -------------------------------------------------------------------------------------

def test_split_row_groups_keeps_whole_groups() -> None:
    assert split_row_groups([400, 400, 400, 100], 800) == [(0, 2), (2, 4)]
    assert split_row_groups([10] * 5, 1) == [(i, i + 1) for i in range(5)]
    assert split_row_groups([10] * 5, 10**9) == [(0, 5)]
    assert split_row_groups([], 100) == [(0, 0)]
    spans = split_row_groups([7, 3, 9, 1, 12, 5], 10)
    assert [i for a, b in spans for i in range(a, b)] == list(range(6))  # contiguous, complete


def test_output_names_mirror_input_and_sort_in_input_order() -> None:
    assert output_name("day=2024-01-01/part-0.parquet", 3) == "day=2024-01-01/part-0-00003.parquet"
    assert output_name("data", 0) == "data-00000.parquet"
    rels = ["day=01/part-0001.parquet", "day=01/part-0002.parquet", "day=02/part-0001.parquet"]
    names = [output_name(rel, rg) for rel in rels for rg in (0, 2, 10)]
    assert names == sorted(names)


def _file(rel: str, rows: tuple[int, ...], fingerprint: str = "v1", committed: tuple[Span, ...] | None = None) -> InputFile:
    return InputFile(f"/in/{rel}", rel, f"/in/{rel}", fingerprint, rows, pa.schema([("f0", pa.float32())]),
                     committed=committed)


def test_shard_ids_derive_from_input_not_scheduling() -> None:
    shards = make_shards([_file("a.parquet", (5, 5, 5)), _file("b.parquet", (2,))], shard_rows=10)
    assert [s.id for s in shards] == ["a.parquet:0-2", "a.parquet:2-3", "b.parquet:0-1"]
    assert [s.rows_in for s in shards] == [10, 5, 2]
    assert [s.output for s in shards] == ["a-00000.parquet", "a-00002.parquet", "b-00000.parquet"]
    assert {s.file_row_groups for s in shards[:2]} == {3}
    reused = make_shards([_file("a.parquet", (5, 5, 5), committed=(Span(0, 3, 15, "a-00000.parquet"),))], shard_rows=1)
    assert [s.row_groups for s in reused] == [(0, 3)]


def test_committed_spans_are_kept_and_only_gaps_split_anew() -> None:
    spans = (Span(1, 3, 10, "a-00001.parquet"), Span(4, 5, 5, "a-00004.parquet"))
    shards = make_shards([_file("a.parquet", (5, 5, 5, 5, 5, 5), committed=spans)], shard_rows=5)
    assert [s.row_groups for s in shards] == [(0, 1), (1, 3), (3, 4), (4, 5), (5, 6)]
    # a committed span that does not fit the footer (rows differ) is ignored, never trusted
    wrong = make_shards([_file("a.parquet", (5, 5), committed=(Span(0, 2, 99, "a-00000.parquet"),))], shard_rows=5)
    assert [s.row_groups for s in wrong] == [(0, 1), (1, 2)]
    # planned from the manifest alone (no footer read): exactly the committed spans
    known = InputFile("/in/a.parquet", "a.parquet", "/in/a.parquet", "v1", committed=spans[:1] + (Span(0, 1, 5, "x"),))
    assert [s.row_groups for s in make_shards([known], shard_rows=1)] == [(0, 1), (1, 3)]


def test_a_file_that_failed_is_one_failed_shard_never_an_empty_file() -> None:
    bad = InputFile("/in/a.parquet", "a.parquet", "/in/a.parquet", "v1", error="cannot read footer")
    [shard] = make_shards([bad], shard_rows=5)
    assert shard.error == "cannot read footer" and shard.file_row_groups is None
    empty = make_shards([_file("e.parquet", ())], shard_rows=5)
    assert [(s.row_groups, s.rows_in, s.error, s.file_row_groups) for s in empty] == [((0, 0), 0, None, 0)]


def test_inputs_sharing_a_stem_get_distinct_output_names() -> None:
    files = [_file("a", (5,)), _file("a.parq", (5,)), _file("a.parquet", (5,)), _file("b.pq", (5,))]
    names = [s.output for s in make_shards(files, shard_rows=5)]
    assert names[0] == "a-00000.parquet" and names[3] == "b-00000.parquet"
    assert len(set(names)) == 4 and names[1] == distinct_output_name("a.parq", 0)
    # a name held by a listed input stays with it, whatever sorts first
    claimed = make_shards(files, shard_rows=5, claims={"a-00000.parquet": "a.parquet"})
    assert [s.output for s in claimed][2] == "a-00000.parquet" and claimed[0].output != "a-00000.parquet"


def test_resolve_columns_defaults_and_errors() -> None:
    schema = pa.schema([("id", pa.int64()), ("name", pa.string()), ("f0", pa.float32()), ("f1", pa.float64())])
    cols = resolve_columns(schema, JobConfig.from_dict(BASE), 2, "x.parquet")
    assert cols.features == ("f0", "f1") and cols.passthrough == ("id", "name")
    assert cols.written == ["id", "name", "prediction"]
    cols = resolve_columns(schema, JobConfig.from_dict({**BASE, "features": ["f*"], "passthrough": ["id"],
                                                         "keep_features": True}), 2, "x.parquet")
    assert cols.passthrough == ("id",) and cols.written == ["id", "f0", "f1", "prediction"]
    with pytest.raises(InputError, match=r"expects 3 input features, but x.parquet gives 2 feature columns \(f0, f1\)"):
        resolve_columns(schema, JobConfig.from_dict(BASE), 3, "x.parquet")
    with pytest.raises(InputError, match="'nope' not found"):
        resolve_columns(schema, JobConfig.from_dict({**BASE, "features": ["nope"]}), 1, "x.parquet")
    with pytest.raises(ConfigError, match="prediction_column 'name'"):
        resolve_columns(schema, JobConfig.from_dict({**BASE, "prediction_column": "name"}), 2, "x.parquet")


def test_resolve_columns_fixed_size_list() -> None:
    schema = pa.schema([("id", pa.int64()), ("emb", pa.list_(pa.float32(), 4))])
    cols = resolve_columns(schema, JobConfig.from_dict({**BASE, "features": ["emb"]}), 4, "x")
    assert cols.list_column and cols.features == ("emb",) and cols.passthrough == ("id",)
    assert resolve_columns(schema, JobConfig.from_dict(BASE), 4, "x").list_column  # found by default too


def _state(*entries: dict) -> State:
    state = State()
    for entry in entries:
        state.files[entry["output"]] = {**shard_entry(make_shards([_file(entry["rel"], (5, 5))], 5)[0]), **entry}
    return state


def test_reconcile_skips_only_committed_present_unchanged() -> None:
    shards = make_shards([_file("a.parquet", (5, 5)), _file("b.parquet", (5,))], shard_rows=5)
    entry = {"id": "a.parquet:0-1", "rel": "a.parquet", "fingerprint": "v1", "row_groups": [0, 1],
             "status": COMMITTED, "output": "a-00000.parquet"}
    second = {**entry, "id": "a.parquet:1-2", "row_groups": [1, 2], "output": "a-00001.parquet"}
    result = reconcile(_state(entry, second), shards, {"a-00000.parquet": 9}, overwrite=False)  # a-00001 deleted
    assert [s.id for s in result.skipped] == ["a.parquet:0-1"]
    assert [s.id for s in result.todo] == ["a.parquet:1-2", "b.parquet:0-1"]
    both = {"a-00000.parquet": 9, "a-00001.parquet": 9}
    assert reconcile(_state(entry, second), shards, both, overwrite=True).skipped == []
    changed = make_shards([_file("a.parquet", (5, 5), "v2")], shard_rows=5)
    result = reconcile(_state(entry, second), changed, both, overwrite=False)
    assert result.skipped == [] and result.stale == ["a-00000.parquet", "a-00001.parquet"]
    vanished = reconcile(_state(entry), make_shards([_file("b.parquet", (5,))], 5), both, overwrite=False)
    assert vanished.stale == ["a-00000.parquet"]  # the output mirrors the input: removed when the run completes
    altered = _state({**entry, "bytes": 8}, second)
    result = reconcile(altered, shards, both, overwrite=False)  # a-00000 is not the file that was committed
    assert [s.id for s in result.skipped] == ["a.parquet:1-2"] and altered.retiring == {"a-00000.parquet"}


def test_state_commit_retires_a_stale_quarantine_file_and_failures_keep_files() -> None:
    entry = {"id": "a.parquet:0-1", "rel": "a.parquet", "fingerprint": "v1", "row_groups": [0, 1],
             "status": COMMITTED, "output": "a-00000.parquet", "rejected_output": "_rejected/a-00000.parquet"}
    state = _state(entry)
    state.commit({**entry, "fingerprint": "v2", "rejected_output": None})
    assert state.files["a-00000.parquet"]["fingerprint"] == "v2"
    assert state.retiring == {"_rejected/a-00000.parquet"}
    state.fail({**entry, "fingerprint": "v3", "status": "failed"})
    assert state.files["a-00000.parquet"]["fingerprint"] == "v2" and state.others["a.parquet:0-1"]["status"] == "failed"
    state.retire("a-00000.parquet")
    assert "a-00000.parquet" not in state.files and "a-00000.parquet" in state.retiring


# --- storage --------------------------------------------------------------------------------------

def test_listing_recurses_sorts_and_skips_hidden(tmp_path: Path) -> None:
    for rel in ["b/2.parquet", "a/1.parquet", "a/_SUCCESS", "a/.1.parquet.crc", "_tmp/x.parquet", "c.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    base, infos = list_files(resolve(str(tmp_path)))
    assert base == str(tmp_path)
    assert [Path(i.path).relative_to(tmp_path).as_posix() for i in infos] == ["a/1.parquet", "b/2.parquet", "c.txt"]
    _, globbed = list_files(resolve(str(tmp_path / "*" / "*.parquet")))
    assert [Path(i.path).name for i in globbed] == ["1.parquet", "2.parquet"]
    assert static_prefix("/d/day=*/x.parquet") == "/d"


# --- model ----------------------------------------------------------------------------------------

def test_golden_model_forward(tmp_path: Path) -> None:
    _, spec, layers = read_model(str(golden_model(tmp_path / "g.pt")))
    assert spec.layers == ((2, 3, False), (3, 1, False))
    out = MLP(layers, "sigmoid", "sigmoid", torch.device("cpu"), "fp32")(torch.tensor([[1.0, 2.0]]))
    assert out.item() == pytest.approx(0.7757198, abs=1e-7)


def test_safetensors_model_matches_state_dict(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = save_mlp(tmp_path / "m.pt", [4, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 2], seed=3)  # 11 layers: "10.weight" sorts
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "m.safetensors")
    a = read_model(str(tmp_path / "m.pt"))
    b = read_model(str(tmp_path / "m.safetensors"))
    assert a[1].layers == b[1].layers
    for (wa, ba), (wb, bb) in zip(a[2], b[2]):
        assert torch.equal(wa, wb) and torch.equal(ba, bb)


def test_model_refusals(tmp_path: Path) -> None:
    whole = tmp_path / "whole.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 1)), whole)  # pickled module, not a state_dict
    with pytest.raises(ModelError, match="needs pickle code"):
        read_model(str(whole))
    bad = {"0.weight": torch.ones(4, 2), "2.weight": torch.ones(1, 3)}
    buf = io.BytesIO()
    torch.save(bad, buf)
    with pytest.raises(ModelError, match="takes 3 inputs but the layer before it gives 4"):
        parse_layers(buf.getvalue(), "bad.pt")
    norm = io.BytesIO()
    torch.save({"0.weight": torch.ones(2, 2), "1.running_mean": torch.ones(2)}, norm)
    with pytest.raises(ModelError, match="BatchNorm1d '1' has no 'running_var'"):
        parse_layers(norm.getvalue(), "norm.pt")
    with pytest.raises(ModelError, match="does not exist"):
        read_model(str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ModelError, match="not a readable"):
        read_model(str(tmp_path / "junk.pt"))


def _saved(tensors: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save(tensors, buf)
    return buf.getvalue()


def _accepted_models() -> dict[str, bytes]:
    """Model files both the torch loader and the torch-free readers accept."""
    from safetensors.torch import save as save_safetensors

    model = mlp([4, 8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 2], seed=3)  # 11 layers: "10.weight" after "8.weight"
    no_bias = mlp([3, 5, 1], bias=False)
    batchnorm = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.BatchNorm1d(5), torch.nn.ReLU(),
                                    torch.nn.Dropout(0.2), torch.nn.Linear(5, 1)).state_dict()
    batchnorm["1.running_mean"].uniform_(-3, 3)
    return {
        "sequential.pt": _saved(model.state_dict()),
        "sequential.safetensors": save_safetensors({k: v.contiguous() for k, v in model.state_dict().items()}),
        "no-bias.pt": _saved(no_bias.state_dict()),
        "half.pt": _saved({k: v.half() for k, v in model.state_dict().items()}),
        "double.pt": _saved({k: v.double() for k, v in no_bias.state_dict().items()}),
        "bf16.safetensors": save_safetensors({k: v.bfloat16().contiguous() for k, v in no_bias.state_dict().items()}),
        "plain-dict.pt": _saved({"w.weight": torch.ones(2, 3), "w.bias": torch.ones(2)}),
        "strided.pt": _saved({"0.weight": torch.arange(15.0).reshape(5, 3).t(),  # a transposed view
                              "0.bias": torch.arange(6.0)[::2]}),
        "batchnorm.pt": _saved(batchnorm),  # num_batches_tracked: an int64 scalar
        "batchnorm.safetensors": save_safetensors({k: v.contiguous() for k, v in batchnorm.items()}),
    }


def _refused_models() -> dict[str, bytes]:
    """Model files only torch can judge (it raises the precise ModelError for each)."""
    refused = {
        "chain.pt": _saved({"0.weight": torch.ones(4, 2), "2.weight": torch.ones(1, 3)}),
        "norm.pt": _saved({"0.weight": torch.ones(2, 2), "1.running_mean": torch.ones(2)}),
        "ints.pt": _saved({"0.weight": torch.ones(2, 2, dtype=torch.int64)}),
        "bias.pt": _saved({"0.weight": torch.ones(2, 2), "0.bias": torch.ones(3)}),
        "junk.pt": b"not a model",
    }
    whole = io.BytesIO()
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 1)), whole)  # a pickled module: code, never built here
    refused["whole.pt"] = whole.getvalue()
    return refused


def test_the_driver_reads_model_shapes_without_torch_and_agrees_with_the_torch_loader(tmp_path: Path) -> None:
    from workers.modelfile import layer_shapes

    accepted, refused = _accepted_models(), _refused_models()
    for name, data in accepted.items():
        assert layer_shapes(data, name) == tuple((int(w.shape[1]), int(w.shape[0]), b is not None)
                                                 for w, b in parse_layers(data, name)), name
    for name, data in refused.items():
        assert layer_shapes(data, name) is None, name
        with pytest.raises(ModelError):
            parse_layers(data, name)
    (tmp_path / "m.pt").write_bytes(accepted["sequential.pt"])
    probe = subprocess.run([sys.executable, "-c", "import sys, workers.modelfile as f; "
                            f"print(f.inspect_model({str(tmp_path / 'm.pt')!r}).layers, 'torch' in sys.modules)"],
                           capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], check=True)
    assert probe.stdout.split()[-1] == "False" and "(4, 8, True)" in probe.stdout  # torch never imported
    from workers.modelfile import inspect_model

    assert inspect_model(str(tmp_path / "m.pt")) == read_model(str(tmp_path / "m.pt"))[1]


def test_the_lane_reads_weights_without_torch_equal_to_the_torch_loaders() -> None:
    from workers.modelfile import read_weights

    for name, data in _accepted_models().items():
        arrays, tensors = read_weights(data, name), parse_layers(data, name)
        assert arrays is not None and len(arrays) == len(tensors), name
        for (w, b), (tw, tb) in zip(arrays, tensors):
            assert w.dtype == np.float32 and w.flags.c_contiguous, name
            np.testing.assert_array_equal(w, tw.float().numpy(), err_msg=name)  # bit for bit, fp16/bf16/fp64 too
            assert (b is None) == (tb is None), name
            if b is not None:
                np.testing.assert_array_equal(b, tb.float().numpy(), err_msg=name)
    for name, data in _refused_models().items():
        assert read_weights(data, name) is None, name


@pytest.mark.parametrize("numpy_forward", [True, False], ids=["numpy", "torch"])
def test_a_replica_refuses_a_model_changed_since_planning(tmp_path: Path, numpy_forward: bool) -> None:
    from workers.replica import Replica
    from workers.replica_job import ReplicaJob

    model = tmp_path / "m.pt"
    save_mlp(model, [4, 3, 1])
    planned = hashlib.sha256(model.read_bytes()).hexdigest()
    job = ReplicaJob(model=str(model), model_sha256=planned, input=str(tmp_path), output=str(tmp_path),
                     features=("a", "b", "c", "d"), passthrough=(), list_column=False, width=4,
                     prediction_column="prediction", keep_features=False)
    assert Replica(0, job, in_driver=True, numpy_forward=numpy_forward).forward.outputs == 1
    save_mlp(model, [4, 3, 1], seed=99)  # replaced after the plan
    with pytest.raises(ModelError, match=r"m\.pt' changed since the run was planned"):
        Replica(0, job, in_driver=True, numpy_forward=numpy_forward).forward


@pytest.mark.parametrize("activation, output_activation, widths", [
    ("sigmoid", "sigmoid", [64, 16, 1]),
    ("relu", "none", [5, 300, 3]),  # a chunk of 3495 rows: the batch spans several
    ("tanh", "softmax", [4, 8, 4]),
    ("none", "relu", [3, 2, 2]),
])
@pytest.mark.parametrize("seed", [5, 6, 7])
def test_the_lanes_numpy_forward_matches_torch(activation: str, output_activation: str, widths: list[int],
                                               seed: int) -> None:
    from pipelines.rounding import rounding_scale, within_rounding
    from workers.cpu_forward import NumpyForward

    model = mlp(widths, seed=11)
    layers = [(m.weight.detach(), m.bias.detach()) for m in model if isinstance(m, torch.nn.Linear)]
    arrays = [(w.numpy(), b.numpy()) for w, b in layers]
    rng = np.random.default_rng(seed)
    # Unit-scale features, as a model sees them, then rows far out where large terms cancel: there two
    # correct forwards differ by their kernels' summation order (one fresh-clone run on another machine:
    # 2.63522 against 2.63462 behind terms of ~1e3), so the tolerance scales with the terms' magnitudes.
    x = rng.standard_normal((10_000, widths[0])).astype(np.float32)
    x[:20] *= 1e4
    x[7, 0] = np.nan  # invalid_rows: keep lets a NaN through; it stays NaN in both
    buffer = np.ascontiguousarray(x.T)  # as the replica stacks features: (width, rows), handed over transposed
    got = NumpyForward(arrays, activation, output_activation).submit(buffer.T)()
    # The reference is torch's forward of the same layers in float64 (exact at fp32's scale). Not torch's fp32
    # MLP: in some test processes its tanh->softmax rows came out ~4e-6 off (0.23124056 against 0.23124146,
    # in 1 of ~20 runs of long test sequences, never alone), a kernel path of torch's, not ours.
    want = _torch_float64_forward(layers, x, activation, output_activation)
    fp32 = MLP(layers, activation, output_activation, torch.device("cpu"), "fp32")(torch.from_numpy(x)).numpy()
    assert got.shape == want.shape == fp32.shape == (10_000, widths[-1])
    np.testing.assert_array_equal(np.isnan(fp32), np.isnan(want))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    scale = rounding_scale(arrays, x, activation, output_activation)
    assert within_rounding(got, want, scale, "fp32").all()
    # Another machine's kernel: each sum in another order (reversed, in blocks of 8). The fixed
    # rtol=1e-5, atol=1e-6 this test had failed it (relu->none, seeds 6 and 7; none->relu, seed 6).
    other = _forward_in_another_order(arrays, x, activation, output_activation)
    assert within_rounding(other, want, scale, "fp32").all()
    # Still tight: one weight of the first layer off by one part in 10^3 is caught.
    w, b = arrays[0]
    w = w.copy()
    w[0, 0] *= 1 + 1e-3
    wrong = NumpyForward([(w, b), *arrays[1:]], activation, output_activation).submit(buffer.T)()
    assert not within_rounding(wrong, want, scale, "fp32").all()


def _torch_float64_forward(layers: list[tuple[torch.Tensor, torch.Tensor]], x: np.ndarray, activation: str,
                           output_activation: str) -> np.ndarray:
    """The MLP in float64 with torch's functions, as float32."""
    functions = {"sigmoid": torch.sigmoid, "relu": torch.relu, "tanh": torch.tanh, "none": lambda h: h,
                 "softmax": lambda h: torch.softmax(h, dim=-1)}
    h = torch.from_numpy(x.astype(np.float64))
    for i, (w, b) in enumerate(layers):
        h = torch.nn.functional.linear(h, w.double(), b.double())
        h = functions[output_activation if i == len(layers) - 1 else activation](h)
    return h.numpy().astype(np.float32)


def _forward_in_another_order(layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray, activation: str,
                              output_activation: str) -> np.ndarray:
    """A float32 forward whose sums run in reversed term order, 8 terms at a time."""
    from workers.cpu_forward import NumpyForward

    h = x
    for i, (w, b) in enumerate(layers):
        w_rev, h_rev = w[:, ::-1], h[:, ::-1]
        z = np.zeros((h.shape[0], w.shape[0]), np.float32)
        for k in range(0, w.shape[1], 8):
            z += h_rev[:, k:k + 8] @ w_rev[:, k:k + 8].T
        z += b
        identity = np.eye(w.shape[0], dtype=np.float32)  # the activation alone, through NumpyForward's own code
        name = output_activation if i == len(layers) - 1 else activation
        h = NumpyForward([(identity, None)], "none", name).submit(np.ascontiguousarray(z))()
    return h


# --- replica data path (no actor) ------------------------------------------------------------------

def test_feature_matrix_and_invalid_rows() -> None:
    batch = pa.record_batch({"a": pa.array([1.0, None, 3.0], pa.float32()),
                             "b": pa.array([4.0, 5.0, float("inf")], pa.float64())})
    matrix = feature_matrix(batch, ["a", "b"], False, 2)
    assert matrix.shape == (3, 2) and matrix.dtype == np.float32
    assert matrix[0].tolist() == [1.0, 4.0]
    assert invalid_rows(matrix).tolist() == [False, True, True]
    assert invalid_rows(matrix[:1]) is None
    lists = pa.record_batch({"e": pa.FixedSizeListArray.from_arrays(pa.array([1, 2, 3, 4, 5, 6], pa.float32()), 2)})
    assert feature_matrix(lists.slice(1), ["e"], True, 2).tolist() == [[3.0, 4.0], [5.0, 6.0]]


def test_plan_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": [1, 2], "x": pa.array([1.0, 2.0], pa.float32()),
                             "y": pa.array([0.5, 0.5], pa.float32())}), tmp_path / "in" / "p.parquet")
    golden_model(tmp_path / "g.pt")
    p = pipelines.plan(model=str(tmp_path / "g.pt"), input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    assert [s.id for s in p.todo] == ["p.parquet:0-1"] and p.columns.features == ("x", "y")
    assert not (tmp_path / "out").exists()
    assert json.loads(json.dumps(p.to_dict()))["shards"][0]["status"] == "run"


def _view(*nodes: dict[str, float], types: tuple[dict[str, float], ...] | None = None,
          autoscaling: bool | None = False) -> ClusterView:
    return ClusterView(tuple(Node(f"n{i}", "h", total) for i, total in enumerate(nodes)), autoscaling=autoscaling,
                       node_types=types)


@pytest.mark.parametrize("nodes, gpus, expected", [
    ([{"CPU": 2.0}], None, 2.0),  # CPU-only: one replica decodes on both CPUs
    ([{"CPU": 64.0}], 0, 4.0),  # forced CPU replicas on a big node: sixteen of four
    ([{"CPU": 6.0}, {"CPU": 0.5}], None, 0.5),  # 2 x 3 on the first node; the shape must fit the small one too
    ([{"CPU": 0.0}, {"CPU": 5.0}], None, 2.0),  # a head without CPUs is not counted; 5 CPUs: 2 replicas of 2
    ([{"CPU": 8.0}, {"CPU": 16.0, "GPU": 2.0}], None, 7.0),  # (16 - 1 for Ray) / 2 GPU replicas; the head ignored
    ([{"CPU": 16.0, "GPU": 2.0}, {"CPU": 8.0, "GPU": 4.0}], None, 1.0),  # the smaller share fits both kinds
    ([{"CPU": 2.0, "GPU": 1.0}], None, 2.0),  # small node: nothing held back
    ([{"CPU": 2.0, "GPU": 1.0}], 0.125, 0.25),  # eight replicas share one GPU and two CPUs
])
def test_auto_cpus_per_replica_shares_a_gpu_node_among_its_replicas(nodes: list[dict[str, float]],
                                                                   gpus: float | None, expected: float) -> None:
    cfg = JobConfig.from_dict({"model": "m", "input": "i", "output": "o", "gpus_per_replica": gpus})
    resources = plan_replicas(cfg, 100, _view(*nodes))
    assert resources.num_cpus == expected and resources.cpus_chosen
    assert resources.count >= 1  # the chosen shape fits the nodes it was chosen from


def test_auto_cpus_per_replica_gives_cpu_replicas_one_cpu_when_the_forward_pass_is_most_of_the_work() -> None:
    cfg = JobConfig.from_dict({"model": "m", "input": "i", "output": "o"})
    wide = ((64, 256, True), (256, 256, True), (256, 1, True))
    narrow = ((64, 16, True), (16, 1, True))
    shape = lambda r: (r.count, r.num_cpus, r.num_gpus)  # noqa: E731
    assert shape(plan_replicas(cfg, 10, _view({"CPU": 2.0}), wide)) == (2, 1.0, 0.0)
    assert shape(plan_replicas(cfg, 10, _view({"CPU": 2.0}), narrow)) == (1, 2.0, 0.0)
    gpu = cfg.replace(gpus_per_replica=1)  # GPU replicas share their node's CPUs whatever the model
    assert plan_replicas(gpu, 10, _view({"CPU": 8.0, "GPU": 1.0}), wide).num_cpus == 7.0


def test_auto_cpus_per_replica_uses_node_types_and_says_when_it_cannot_see_a_gpu_node() -> None:
    cfg = JobConfig.from_dict({"model": "m", "input": "i", "output": "o", "gpus_per_replica": 1})
    typed = plan_replicas(cfg, 10, _view({"CPU": 4.0}, types=({"CPU": 8.0, "GPU": 1.0},), autoscaling=True))
    assert typed.num_cpus == 7.0 and typed.count == 0 and typed.autoscaling
    blind = plan_replicas(cfg, 10, _view({"CPU": 4.0}, autoscaling=None))
    assert blind.num_cpus == 1.0 and "no node" in blind.cpus_chosen
    fixed = plan_replicas(cfg.replace(cpus_per_replica=3), 10, _view({"CPU": 8.0, "GPU": 1.0}))
    assert fixed.num_cpus == 3.0 and fixed.cpus_chosen == ""  # an explicit value is used as it is
    assert JobConfig.from_dict({"model": "m", "input": "i", "output": "o", "cpus_per_replica": "auto"}) \
        .cpus_per_replica is None


def test_the_actor_side_never_imports_the_driver():
    """One way down: `pipelines` may import `workers` and `basis`; `workers` and `basis` never import `pipelines`,
    and `basis` imports neither side."""
    import ast

    root = Path(__file__).resolve().parent.parent
    offenders = []
    for package, banned in (("workers", ("pipelines",)), ("basis", ("pipelines", "workers"))):
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                offenders += [f"{path.relative_to(root)}:{node.lineno} imports {n}"
                              for n in names if n.split(".")[0] in banned]
    assert offenders == []


@pytest.mark.parametrize("activation, output_activation, widths", [
    ("sigmoid", "sigmoid", [64, 16, 1]),
    ("relu", "none", [5, 300, 3]),  # a chunk of 3495 rows: the batch spans several
    ("tanh", "softmax", [4, 8, 4]),  # softmax over each row's outputs, whichever way the buffer lies
    ("none", "relu", [3, 2, 2]),
])
def test_the_cpu_forward_by_columns_matches_the_models_pass_by_rows(activation: str, output_activation: str,
                                                                      widths: list[int]) -> None:
    """Issue 15: on the CPU in fp32, `Forward` multiplies the stacked (features, rows) buffer as it lies
    (`MLP.columns`); a model set's models too. Its predictions are the row-wise pass's within rounding."""
    from pipelines.rounding import rounding_scale, within_rounding
    from workers.device import Forward

    rng = np.random.default_rng(3)
    x = rng.standard_normal((10_000, widths[0])).astype(np.float32)
    x[:20] *= 1e4
    x[7, 0] = np.nan  # invalid_rows: keep lets a NaN through; it stays NaN
    buffer = np.ascontiguousarray(x.T)  # (width, rows), as the replica stacks it
    models, wants, scales = [], [], []
    for seed, bias in ((11, True), (12, False)):
        model = mlp(widths, seed=seed)
        layers = [(m.weight.detach(), m.bias.detach() if bias else None) for m in model
                  if isinstance(m, torch.nn.Linear)]
        models.append(MLP(layers, activation, output_activation, torch.device("cpu"), "fp32"))
        assert models[-1].by_columns
        wants.append(models[-1](torch.from_numpy(x)).numpy())  # the pass by rows
        arrays = [(w.numpy(), np.zeros(w.shape[0], np.float32) if b is None else b.numpy()) for w, b in layers]
        scales.append(rounding_scale(arrays, x, activation, output_activation))
    for members in (models[:1], models):  # one model, and a set of two side by side
        forward = Forward(members if len(members) > 1 else members[0], widths[0], 10_000, torch.device("cpu"))
        got = forward.submit(buffer.T)()
        k = widths[-1]
        assert got.shape == (10_000, k * len(members))
        for i, (want, scale) in enumerate(zip(wants[: len(members)], scales)):
            part = got[:, i * k : (i + 1) * k]
            np.testing.assert_array_equal(np.isnan(part), np.isnan(want))
            assert within_rounding(part, want, scale, "fp32").all()
    assert not MLP([(torch.ones(1, 2), None)], "sigmoid", "none", torch.device("cpu"), "bf16").by_columns
