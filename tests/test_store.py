from pathlib import Path

import pandas as pd
import pytest

from deepercluster.errors import ConfigError, StoreError
from deepercluster.stages import get_stage
from deepercluster.store import RunStore


@pytest.mark.parametrize("uri", ["local", "memory://runs/test-store"])
def test_atomic_writes_and_completion_records(tmp_path: Path, uri: str):
    store = RunStore(tmp_path / "run" if uri == "local" else uri)
    store.write_json("rounds/0/x.json", {"a": 1})
    store.write_parquet("data/t.parquet", pd.DataFrame({"v": [1, 2]}))
    assert store.read_json("rounds/0/x.json") == {"a": 1}
    assert store.read_parquet("data/t.parquet")["v"].tolist() == [1, 2]
    assert not [n for n in store.listdir("rounds/0") if n.startswith(".tmp")]

    assert not store.is_done("extract", 0, "shard-00000")
    store.mark_done("extract", 0, "shard-00000", {"rows": [0, 5]})
    store.mark_done("extract", 0, "shard-00001")
    assert store.done_units("extract", 0) == ["shard-00000", "shard-00001"]
    assert store.done_record("extract", 0, "shard-00000")["rows"] == [0, 5]
    assert not store.stage_done("extract", 0)
    store.mark_stage_done("extract", 0)
    assert store.stage_done("extract", 0) and store.done_units("extract", 0) == ["shard-00000", "shard-00001"]
    assert not store.is_done("extract", 1, "shard-00000")  # rounds are separate

    store.reset_stage("extract", 0)
    assert store.done_units("extract", 0) == [] and not store.stage_done("extract", 0)
    if uri != "local":
        store.remove("")


def test_missing_artifact_and_unknown_stage_are_clear(tmp_path: Path):
    store = RunStore(tmp_path)
    with pytest.raises(StoreError, match="missing"):
        store.read_json("rounds/0/nothing.json")
    with pytest.raises(StoreError, match="stage 'cluster' needs a round"):
        store.is_done("cluster", None, "u")
    with pytest.raises(ConfigError, match="unknown stage 'polish'; stages are "):
        get_stage("polish")


def test_store_pickles_as_its_uri(tmp_path: Path):
    import pickle

    store = RunStore(tmp_path)
    assert pickle.loads(pickle.dumps(store)).uri == store.uri


def test_a_write_left_half_done_by_a_killed_process_is_not_a_record(tmp_path: Path):
    store = RunStore(tmp_path)
    store.mark_done("extract", 0, "shard-00000")
    leftover = tmp_path / "rounds/0/_done/extract/.tmp-0123abcd-shard-00001.json"
    leftover.write_text("{")
    assert store.done_units("extract", 0) == ["shard-00000"]


@pytest.mark.parametrize("uri", ["local", "memory://runs/test-parquet-parts"])
def test_parquet_is_written_part_by_part_and_read_by_column(tmp_path: Path, uri: str, monkeypatch):
    import numpy as np
    import pyarrow.parquet as pq

    from deepercluster import store as store_module

    store = RunStore(tmp_path / "run" if uri == "local" else uri)
    monkeypatch.setattr(store_module, "PARQUET_ROWS", 4)
    df = pd.DataFrame({"id": np.arange(10), "v": np.linspace(0, 1, 10, dtype=np.float32)})
    store.write_parquet("t.parquet", df)
    with store.fs.open(store.path("t.parquet"), "rb") as f:
        assert pq.ParquetFile(f).metadata.num_row_groups == 3  # 4 + 4 + 2 rows: one part at a time
    pd.testing.assert_frame_equal(store.read_parquet("t.parquet"), df)
    assert store.read_parquet("t.parquet", columns=["v"]).columns.tolist() == ["v"]
    store.write_parquet("empty.parquet", df.iloc[:0])
    assert store.read_parquet("empty.parquet").columns.tolist() == ["id", "v"]

    def failing():
        yield df.iloc[:5]
        raise RuntimeError("the producer died")

    with pytest.raises(RuntimeError):
        store.write_parquet_parts("half.parquet", failing())
    assert not store.exists("half.parquet") and not [n for n in store.listdir("") if n.startswith(".tmp")]
    with pytest.raises(StoreError, match="missing"):
        store.read_parquet("half.parquet")
