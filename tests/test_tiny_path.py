"""Issue 15, item 4: a tiny file's path in a lane child made cheaper without changing what it computes or
writes: a tiny batch stacked by Arrow in one call (`workers.decode._tensor`) gives `stack_checked`'s matrix
and invalid rows or steps aside; a file whose schema differs from the last one that fit is checked again;
the writer's dictionary columns follow each file's schema; `ParquetSource` still reads nested columns by
name; a lane child starts with glibc's malloc tuned, keeping the user's own settings."""

from __future__ import annotations

import decimal
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from basis.storage import resolve
from workers.decode import _tensor
from workers.lane_child import MALLOC_TUNABLES, environment
from workers.reader import open_parquet
from workers.stacking import stack_checked
from workers.writer import ShardWriter


def _batch(columns: dict[str, pa.Array]) -> pa.RecordBatch:
    return pa.record_batch(columns)


def _spoiled(rows: int, seed: int) -> dict[str, pa.Array]:
    rng = np.random.default_rng(seed)
    f32 = rng.standard_normal(rows).astype(np.float32)
    f32[3], f32[5], f32[8] = np.nan, np.inf, -np.inf
    return {
        "a": pa.array(f32, pa.float32()),
        "b": pa.array(rng.standard_normal(rows).astype(np.float32), pa.float32(), mask=np.arange(rows) % 9 == 4),
        "big": pa.array(np.full(rows, 3e38, np.float32)),  # finite, but a row's sum overflows
        "i16": pa.array(rng.integers(-30000, 30000, rows), pa.int16(), mask=np.arange(rows) % 13 == 7),
        "u8": pa.array(rng.integers(0, 255, rows), pa.uint8()),
    }


@pytest.mark.parametrize("features", [("a", "b"), ("a", "big", "big"), ("i16", "a", "u8"), ("a",), ("u8", "b", "i16")])
@pytest.mark.parametrize("check", [True, False])
def test_a_tiny_batch_stacked_in_one_call_is_the_column_by_column_stack(features: tuple[str, ...],
                                                                         check: bool) -> None:
    batch = _batch(_spoiled(100, 1))
    got = _tensor(batch, features, check)
    assert got is not None
    want_matrix, want_bad = stack_checked(batch, features, False, len(features), check=check)
    matrix, bad = got
    assert matrix.dtype == np.float32 and matrix.shape == (100, len(features))
    np.testing.assert_array_equal(matrix, want_matrix)  # NaN where null or NaN, inf kept: the same values
    assert (bad is None) == (want_bad is None)
    if bad is not None:
        np.testing.assert_array_equal(bad, want_bad)
        assert bad.any() and not bad.all()


def test_a_tiny_batch_of_all_valid_rows_has_no_bad_mask() -> None:
    batch = _batch({"a": pa.array(np.arange(100, dtype=np.float32)), "i": pa.array(np.arange(100), pa.int8())})
    got = _tensor(batch, ("i", "a"), True)
    assert got is not None and got[1] is None
    np.testing.assert_array_equal(got[0], np.stack([np.arange(100), np.arange(100)], axis=1).astype(np.float32))


@pytest.mark.parametrize("column", [
    pa.array(np.linspace(0, 1, 100), pa.float64()),  # stacks to float64: each value rounded once, by stack_checked
    pa.array(np.arange(100), pa.int64()),
    pa.array([decimal.Decimal(i) for i in range(100)], pa.decimal128(10, 0)),  # no tensor of decimals
    pa.array([True, False] * 50),
    pa.array(np.ones(100, np.float16)),  # Arrow casts no half floats
    pa.array([str(i) for i in range(100)]),
])
def test_a_tiny_batch_arrow_cannot_stack_as_float32_is_left_to_the_column_by_column_stack(column: pa.Array) -> None:
    batch = _batch({"a": pa.array(np.ones(100, np.float32)), "x": column})
    assert _tensor(batch, ("a", "x"), True) is None


def test_the_writers_dictionary_columns_follow_each_files_schema(tmp_path: Path) -> None:
    location = resolve(str(tmp_path))
    with_strings = pa.schema([("s", pa.string()), ("p", pa.float32())])
    without = pa.schema([("s", pa.int64()), ("p", pa.float32())])
    for name, schema, column in (("a", with_strings, pa.array(["x", "y"] * 50)), ("b", without, pa.array(range(100))),
                                 ("c", with_strings, pa.array(["z"] * 100))):
        with ShardWriter(location, location.join(f"{name}.parquet"), schema, in_memory=True) as writer:
            writer.write(pa.record_batch([column, pa.array(np.zeros(100, np.float32))], schema=schema))
            writer.finish()
            writer.publish()
    encodings = {name: pq.ParquetFile(tmp_path / f"{name}.parquet").metadata.row_group(0).column(0).encodings
                 for name in "abc"}
    assert "RLE_DICTIONARY" in encodings["a"] and "RLE_DICTIONARY" in encodings["c"]
    assert "RLE_DICTIONARY" not in encodings["b"]


def test_a_parquet_source_reads_nested_columns_by_name_and_keeps_one_schema(tmp_path: Path) -> None:
    values = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(300, dtype=np.float32)), 3)
    table = pa.table({"id": pa.array(range(100)), "v": values, "s": pa.array([{"x": i, "y": -i} for i in range(100)])})
    pq.write_table(table, tmp_path / "a.parquet")
    location = resolve(str(tmp_path))
    source = open_parquet(location, location.join("a.parquet"), "a.parquet")
    assert source.schema_arrow is source.schema_arrow and source.schema_arrow.equals(table.schema)
    assert source.read_row_group(0, columns=["v", "s"]).equals(table.select(["v", "s"]))
    again = source.reopen()
    assert again.metadata.equals(source.metadata) and again.read().equals(table)


def test_a_lane_child_starts_with_mallocs_cache_tuned_and_the_users_settings_kept() -> None:
    assert environment({"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": MALLOC_TUNABLES}
    mine = environment({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=7"})["GLIBC_TUNABLES"]
    assert mine == f"{MALLOC_TUNABLES}:glibc.malloc.tcache_count=7"  # glibc takes the last: the user's wins
    assert "GLIBC_TUNABLES" not in os.environ or environment(os.environ)["GLIBC_TUNABLES"].endswith(
        os.environ["GLIBC_TUNABLES"])


@pytest.mark.parametrize("schema", [
    pa.schema([("id", pa.int64()), ("prediction", pa.float32())]),
    pa.schema([("s", pa.string()), ("t", pa.timestamp("us", "UTC")), ("prediction", pa.list_(pa.float32(), 2))]),
])
def test_a_tiny_shards_file_is_byte_for_byte_what_the_streaming_writer_makes(tmp_path: Path, schema: pa.Schema) -> None:
    location = resolve(str(tmp_path))
    rows = 50
    columns = {
        "id": pa.array(range(rows), pa.int64()), "s": pa.array(["a", "b"] * 25),
        "t": pa.array(np.arange(rows, dtype=np.int64), pa.int64()).cast(pa.timestamp("us", "UTC")),
    }
    arrays = [columns[f.name] if f.name in columns else (
        pa.array(np.linspace(0, 1, rows, dtype=np.float32)) if f.type == pa.float32()
        else pa.FixedSizeListArray.from_arrays(pa.array(np.linspace(0, 1, 2 * rows, dtype=np.float32)), 2))
        for f in schema]
    batch = pa.record_batch(arrays, schema=schema)
    for name, in_memory in (("tiny", True), ("streamed", False)):
        with ShardWriter(location, location.join(f"{name}.parquet"), schema, in_memory=in_memory) as writer:
            writer.write(batch)
            writer.finish()
            writer.publish()
    assert (tmp_path / "tiny.parquet").read_bytes() == (tmp_path / "streamed.parquet").read_bytes()
    assert pq.read_table(tmp_path / "tiny.parquet").equals(pa.Table.from_batches([batch]))


def test_files_read_one_after_another_get_their_own_columns_whatever_the_last_files_layout(tmp_path: Path) -> None:
    nested = pa.table({"id": pa.array(range(5)), "s": pa.array([{"x": i, "y": -i} for i in range(5)]),
                       "v": pa.array([0.5 * i for i in range(5)])})
    flat = pa.table({"id": pa.array(range(5)), "v": pa.array([2.0 * i for i in range(5)])})
    location = resolve(str(tmp_path))
    for name, table in (("a", nested), ("b", flat), ("c", nested), ("d", nested), ("e", flat)):
        pq.write_table(table, tmp_path / f"{name}.parquet")
        source = open_parquet(location, location.join(f"{name}.parquet"), name)
        assert source.read_row_group(0, columns=["v", "id"]).equals(table.select(["v", "id"]))
        assert source.read_row_group(0, columns=["v"]).equals(table.select(["v"]))
