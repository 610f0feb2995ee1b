"""`torch.export` programs (`.pt2`) and categorical columns: loaded without running code from the file,
shapes checked on the driver, the same data path as MLPs (issue 14, items 2, 3, 5)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REPO, TEST_REPLICA, cli, read_output, save_mlp

import pipelines
from basis.errors import ConfigError, ModelError
from pipelines.verifier import verify
from workers.programfile import inspect_program

FEATURES = 6


class Residual(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.block = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, width))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.block(h)


class Tabular(torch.nn.Module):
    """Embeddings of the categorical columns, then Linear -> LayerNorm -> a residual block -> head."""

    def __init__(self, features: int, tables: tuple[int, ...] = (), outputs: int = 1, *, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embeddings = torch.nn.ModuleList(torch.nn.Embedding(n, 3) for n in tables)
        self.inp = torch.nn.Linear(features + 3 * len(tables), 16)
        self.norm = torch.nn.LayerNorm(16)
        self.residual = Residual(16)
        self.head = torch.nn.Linear(16, outputs)
        self.outputs = outputs

    def forward(self, x: torch.Tensor, codes: torch.Tensor | None = None) -> torch.Tensor:
        parts = [x] + [table(codes[:, i]) for i, table in enumerate(self.embeddings)]
        h = self.residual(self.norm(self.inp(torch.cat(parts, dim=1))))
        out = self.head(h)
        return torch.softmax(out, dim=-1) if self.outputs > 1 else torch.sigmoid(out).squeeze(-1)


def export(model: torch.nn.Module, path: Path, features: int, categories: int = 0, *, dynamic: bool = True) -> Path:
    model.eval()
    rows = 4 if dynamic else 1
    args: tuple[torch.Tensor, ...] = (torch.randn(rows, features),)
    if categories:
        args += (torch.zeros(rows, categories, dtype=torch.int64),)
    batch = torch.export.Dim("batch")
    shapes = {"x": {0: batch}, "codes": {0: batch}} if categories else {"x": {0: batch}}
    program = torch.export.export(model, args, dynamic_shapes=shapes if dynamic else None)
    torch.export.save(program, path)
    return path


def table(rows: int, *, seed: int = 0) -> pa.Table:
    """id, f00..f05 float32, country int32 (0..9), device int16 (0..4)."""
    rng = np.random.default_rng(seed)
    columns: dict[str, pa.Array] = {"id": pa.array(np.arange(rows, dtype=np.int64))}
    for j in range(FEATURES):
        columns[f"f{j:02d}"] = pa.array(rng.standard_normal(rows).astype(np.float32))
    columns["country"] = pa.array(rng.integers(0, 10, rows).astype(np.int32))
    columns["device"] = pa.array(rng.integers(0, 5, rows).astype(np.int16))
    return pa.table(columns)


def write(root: Path, data: pa.Table, files: int = 2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    step = -(-data.num_rows // files)
    for i in range(files):
        pq.write_table(data.slice(i * step, step), root / f"part-{i}.parquet", row_group_size=700)
    return root


def expected(model: torch.nn.Module, data: pa.Table, categorical: tuple[str, ...] = ()) -> np.ndarray:
    x = torch.from_numpy(np.stack([data[f"f{j:02d}"].to_numpy() for j in range(FEATURES)], axis=1))
    with torch.no_grad():
        if not categorical:
            return model.eval()(x).numpy()
        codes = torch.from_numpy(np.stack([data[c].to_numpy().astype(np.int64) for c in categorical], axis=1))
        return model.eval()(x, codes).numpy()


def predictions(out: pa.Table) -> np.ndarray:
    return np.asarray(out.column("prediction").to_pylist(), dtype=np.float32)


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """Each program exported once per module (an export takes about a second)."""
    root = tmp_path_factory.mktemp("programs")
    made = {}
    for name, model, categories in [("plain", Tabular(FEATURES), 0), ("softmax", Tabular(FEATURES, outputs=3), 0),
                                    ("embeddings", Tabular(FEATURES, (10, 5), seed=1), 2)]:
        made[name] = (export(model, root / f"{name}.pt2", FEATURES, categories), model)
    return made


def test_a_layernorm_residual_program_runs_on_the_driver_lane_as_torch_does(
        tmp_path: Path, programs: dict[str, tuple[Path, torch.nn.Module]]) -> None:
    path, model = programs["plain"]
    data = table(3000)
    report = pipelines.run(model=str(path), input=str(write(tmp_path / "in", data)), output=str(tmp_path / "out"),
                           progress=False)
    assert report.status == "succeeded" and report.rows_out == 3000
    assert [r["node"] for r in report.replicas] == ["driver"]  # in-process, no Ray
    out = read_output(tmp_path / "out")
    assert out.column("id").to_pylist() == list(range(3000))
    np.testing.assert_allclose(predictions(out), expected(model, data), rtol=1e-5, atol=1e-6)
    assert out.schema.field("prediction").type == pa.float32()
    record = json.loads((tmp_path / "out" / "_manifest.json").read_text())["model"]
    assert record["format"] == "pt2" and record["inputs"] == [["batch", FEATURES]] and record["outputs"] == ["batch"]
    assert len(record["sha256"]) == 64
    checked = verify(str(tmp_path / "out"), sample=40, seed=1)
    assert checked.ok and checked.sampled > 0


def test_a_softmax_program_on_ray_replicas_and_verify_sample(
        tmp_path: Path, ray_shared: None, programs: dict[str, tuple[Path, torch.nn.Module]]) -> None:
    path, model = programs["softmax"]
    data = table(2800, seed=3)
    report = pipelines.run(model=str(path), input=str(write(tmp_path / "in", data)), output=str(tmp_path / "out"),
                           progress=False, **TEST_REPLICA)
    assert report.status == "succeeded" and report.rows_out == 2800
    assert all(r["node"] != "driver" for r in report.replicas)
    out = read_output(tmp_path / "out")
    assert out.schema.field("prediction").type == pa.list_(pa.float32(), 3)
    got = predictions(out)
    np.testing.assert_allclose(got, expected(model, data), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)
    result = cli("verify", str(tmp_path / "out"), "--sample", "50", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    checked = json.loads(result.stdout)
    assert checked["ok"] and checked["sampled"] > 0  # rows recomputed with the program, in another process


def test_a_static_batch_program_is_refused_with_the_fix_and_nothing_is_written(tmp_path: Path) -> None:
    path = export(Tabular(FEATURES), tmp_path / "static.pt2", FEATURES, dynamic=False)
    write(tmp_path / "in", table(100), files=1)
    result = cli("run", "--model", str(path), "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    assert "fixed batch size" in result.stderr and "float32 [1, 6]" in result.stderr
    assert 'dynamic_shapes={"x": {0: torch.export.Dim("batch")}}' in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_program_whose_input_width_differs_from_the_features_is_refused(
        tmp_path: Path, programs: dict[str, tuple[Path, torch.nn.Module]]) -> None:
    narrow = tmp_path / "in"
    write(narrow, table(100).drop_columns(["f05"]), files=1)
    with pytest.raises(pipelines.InputError, match=r"expects 6 input features, but .* gives 5 feature columns"):
        pipelines.run(model=str(programs["plain"][0]), input=str(narrow), output=str(tmp_path / "out"),
                      progress=False)
    assert not (tmp_path / "out").exists()


def test_embeddings_over_two_integer_columns_of_different_types(
        tmp_path: Path, programs: dict[str, tuple[Path, torch.nn.Module]]) -> None:
    path, model = programs["embeddings"]
    spec = inspect_program(path.read_bytes(), str(path), "-")
    assert (spec.categories, spec.category_limits) == (2, (10, 5))  # read from the program's embedding tables
    data = table(2500, seed=5)
    report = pipelines.run(model=str(path), input=str(write(tmp_path / "in", data)), output=str(tmp_path / "out"),
                           categorical=["country", "device"], progress=False)
    assert report.status == "succeeded" and report.rows_out == 2500
    out = read_output(tmp_path / "out")
    # categorical columns are not features; by default they stay in the output as passthrough columns
    assert out.schema.names == ["id", "country", "device", "prediction"]
    assert out.schema.field("country").type == pa.int32() and out.schema.field("device").type == pa.int16()
    np.testing.assert_allclose(predictions(out), expected(model, data, ("country", "device")), rtol=1e-5, atol=1e-6)
    assert verify(str(tmp_path / "out"), sample=30, seed=2).ok


def test_an_out_of_range_a_negative_and_a_null_category_are_quarantined_with_a_reason(
        tmp_path: Path, programs: dict[str, tuple[Path, torch.nn.Module]]) -> None:
    path, model = programs["embeddings"]
    data = table(1000, seed=7)
    country = data["country"].to_pylist()
    device = data["device"].to_pylist()
    country[10], device[20], country[30] = 10, None, -1  # the country table has 10 rows: 0..9
    data = data.set_column(data.schema.get_field_index("country"), "country", pa.array(country, pa.int32()))
    data = data.set_column(data.schema.get_field_index("device"), "device", pa.array(device, pa.int16()))
    report = pipelines.run(model=str(path), input=str(write(tmp_path / "in", data, files=1)),
                           output=str(tmp_path / "out"), categorical=["country", "device"], progress=False)
    assert report.status == "succeeded" and (report.rows_out, report.rows_rejected) == (997, 3)
    rejected = pq.read_table(tmp_path / "out" / "_rejected").to_pylist()
    assert [(r["id"], r["reason"]) for r in rejected] == [
        (10, "categorical column 'country' value 10 is outside its embedding table (10 rows: 0 to 9)"),
        (20, "null in categorical column 'device'"),
        (30, "categorical column 'country' value -1 is negative"),
    ]
    out = read_output(tmp_path / "out")
    good = data.filter(pa.array(~np.isin(np.arange(1000), [10, 20, 30])))
    np.testing.assert_allclose(predictions(out), expected(model, good, ("country", "device")), rtol=1e-5, atol=1e-6)
    assert verify(str(tmp_path / "out"), sample=30, seed=3).ok


def test_categorical_needs_a_program_and_the_programs_width(
        tmp_path: Path, programs: dict[str, tuple[Path, torch.nn.Module]]) -> None:
    write(tmp_path / "in", table(100), files=1)
    mlp = save_mlp(tmp_path / "m.pt", [FEATURES, 4, 1])
    assert mlp is not None
    with pytest.raises(ConfigError, match="needs a torch.export program"):
        pipelines.plan(model=str(tmp_path / "m.pt"), input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                       categorical=["country"])
    with pytest.raises(ConfigError, match=r"expects 2 categorical column\(s\)"):
        pipelines.plan(model=str(programs["embeddings"][0]), input=str(tmp_path / "in"),
                       output=str(tmp_path / "out"), categorical=["country"])
    with pytest.raises(ConfigError, match="name its 2 integer column"):
        pipelines.plan(model=str(programs["embeddings"][0]), input=str(tmp_path / "in"),
                       output=str(tmp_path / "out"))


def test_planning_a_program_does_not_import_torch(
        tmp_path: Path, programs: dict[str, tuple[Path, torch.nn.Module]]) -> None:
    write(tmp_path / "in", table(100), files=1)
    code = ("import sys, pipelines; p = pipelines.plan(model=sys.argv[1], input=sys.argv[2], output=sys.argv[3], "
            "categorical=['country', 'device']); print(p.model.category_limits, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, str(programs["embeddings"][0]), str(tmp_path / "in"),
                             str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["(10,", "5)", "False"]


def _rewrite(source: Path, target: Path, change: dict[str, bytes | None]) -> Path:
    """A copy of a .pt2 with some of its parts (relative to the archive's folder) replaced or added."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        prefix = old.namelist()[0].split("/")[0]
        for name in old.namelist():
            rel = name[len(prefix) + 1:]
            if rel not in change:
                new.writestr(name, old.read(name))
        for rel, data in change.items():
            if data is not None:
                new.writestr(f"{prefix}/{rel}", data)
    return target


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_a_program_crafted_to_run_code_when_loaded_is_refused(
        tmp_path: Path, programs: dict[str, tuple[Path, torch.nn.Module]]) -> None:
    marker = tmp_path / "marker"
    pickled = io.BytesIO()
    torch.save(_Payload(marker), pickled)
    crafted = _rewrite(programs["plain"][0], tmp_path / "crafted.pt2",
                       {"data/sample_inputs/model.pt": pickled.getvalue()})
    write(tmp_path / "in", table(100), files=1)
    for check in (lambda: pipelines.plan(model=str(crafted), input=str(tmp_path / "in"), output=str(tmp_path / "o")),
                  lambda: pipelines.run(model=str(crafted), input=str(tmp_path / "in"), output=str(tmp_path / "o"),
                                        progress=False)):
        check()  # planned and run: the sample inputs are never unpickled
    assert not marker.exists()
    assert read_output(tmp_path / "o").num_rows == 100
    # What batch-infer avoids: torch 2.13 retries the sample inputs with weights_only=False, which runs the
    # payload (then fails on its result, an int, not a tuple of inputs).
    with pytest.raises(Exception):
        torch.export.load(crafted)
    assert marker.exists()


@pytest.mark.parametrize("where", ["expr_str", "guards_code", "target"])
def test_code_hidden_in_the_program_json_never_runs(
        tmp_path: Path, programs: dict[str, tuple[Path, torch.nn.Module]], where: str) -> None:
    marker = tmp_path / "marker"
    code = f"__import__('os').system('touch {marker}')"
    with zipfile.ZipFile(programs["plain"][0]) as archive:
        name = next(n for n in archive.namelist() if n.endswith("models/model.json"))
        model = json.loads(archive.read(name))
    if where == "expr_str":  # torch passes symbolic sizes to sympy.sympify, which is eval
        model["graph_module"]["graph"]["tensor_values"]["x"]["sizes"][0]["as_expr"]["expr_str"] = code
    elif where == "guards_code":  # torch compiles these into the module's forward
        model["guards_code"] = [code]
    else:  # a call resolved with getattr from torch: torch.os.system
        model["graph_module"]["graph"]["nodes"][0]["target"] = "torch.os.system"
    crafted = _rewrite(programs["plain"][0], tmp_path / "crafted.pt2", {"models/model.json": json.dumps(model).encode()})
    write(tmp_path / "in", table(50), files=1)
    if where == "guards_code":  # guards are never loaded: shapes are checked on the driver instead
        report = pipelines.run(model=str(crafted), input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                               progress=False)
        assert report.status == "succeeded"
    else:
        with pytest.raises(ModelError, match="symbolic size|calls 'torch.os.system'"):
            pipelines.run(model=str(crafted), input=str(tmp_path / "in"), output=str(tmp_path / "out"),
                          progress=False)
        assert not (tmp_path / "out").exists()
    assert not marker.exists()


def test_a_program_exported_in_training_mode_is_refused(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(FEATURES, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 1))
    batch = torch.export.Dim("batch")
    program = torch.export.export(model.train(), (torch.randn(4, FEATURES),), dynamic_shapes={"input": {0: batch}})
    torch.export.save(program, tmp_path / "train.pt2")
    with pytest.raises(ModelError, match=r"training mode .* call model.eval\(\)"):
        inspect_program((tmp_path / "train.pt2").read_bytes(), "train.pt2", "-")


@pytest.mark.parametrize("schedule", ["lazy", "random"])
def test_the_stream_path_stages_features_and_codes_per_slot(
        schedule: str, programs: dict[str, tuple[Path, torch.nn.Module]]) -> None:
    """The CUDA path's code with fake streams (tests/test_device.py): codes ride in a second pinned buffer per
    slot; results collected after the last submit still match, however late each queued copy ran."""
    from test_device import FakeStreams

    from workers.device import Forward
    from workers.model import load_model

    path, model = programs["embeddings"]
    _, program = load_model(str(path), activation="none", output_activation="none", device=torch.device("cpu"),
                            precision="fp32")
    streams = FakeStreams(schedule, seed=4)
    forward = Forward(program, FEATURES, 300, torch.device("cpu"), categories=2, streams=streams)  # type: ignore[arg-type]
    rng = np.random.default_rng(9)
    batches, handles = [], []
    for _ in range(30):
        rows = int(rng.integers(1, 301))
        x = rng.standard_normal((rows, FEATURES)).astype(np.float32)
        codes = np.stack([rng.integers(0, 10, rows), rng.integers(0, 5, rows)], axis=1)
        batches.append((x, codes))
        handles.append(forward.submit(x, codes))
    assert streams.uploads == 60 and streams.computes == 30  # features and codes per batch, one forward
    for (x, codes), handle in zip(batches, handles):
        with torch.no_grad():
            want = model(torch.from_numpy(x), torch.from_numpy(codes)).numpy()
        np.testing.assert_allclose(handle()[:, 0], want, rtol=1e-5, atol=1e-6)
