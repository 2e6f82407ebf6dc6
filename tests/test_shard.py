from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_overrides
from PIL import Image

from deepercluster.config import build_config
from deepercluster.data.shard import load_manifest, scan_part
from deepercluster.errors import ConfigError
from deepercluster.stages import run_stage
from deepercluster.store import RunStore


def _png(path: Path, seed: int, size=(12, 10), mode="RGB") -> None:
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode).save(path)


@pytest.fixture
def messy_folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    for i in range(6):
        _png(root / "cat" / f"c{i}.png", seed=i)
        _png(root / "dog" / f"d{i}.png", seed=100 + i, mode="L")
    (root / "dog" / "dup.png").write_bytes((root / "cat" / "c0.png").read_bytes())  # exact duplicate
    (root / "dog" / "empty.jpg").write_bytes(b"")
    (root / "dog" / "text.png").write_text("this is not an image")
    good = (root / "cat" / "c1.png").read_bytes()
    (root / "cat" / "cut.png").write_bytes(good[: len(good) // 2])
    (root / "cat" / "notes.txt").write_text("hello")
    big = root / "cat" / "huge.png"
    Image.new("L", (400, 300)).save(big)
    return root


def test_shard_stage_keeps_good_images_and_records_every_reject(tmp_path: Path, messy_folder: Path):
    cfg = build_config({"data": {"source": str(messy_folder), "shard_size": 5, "max_pixels": 100_000},
                        "cluster": {"k": 1, "super_clusters": 1}})
    store = RunStore(tmp_path / "run")
    info = run_stage(store, cfg, "shard")
    manifest = load_manifest(store)
    rejects = store.read_parquet("data/rejects.parquet")
    assert info["images"] == len(manifest) == 12
    reasons = {Path(u).name: r for u, r in zip(rejects["uri"], rejects["reason"], strict=True)}
    assert reasons == {"dup.png": "duplicate", "empty.jpg": "empty file", "text.png": "not an image",
                       "cut.png": "truncated", "notes.txt": "not an image suffix", "huge.png": "too large"}
    assert manifest["image_id"].tolist() == list(range(12))
    assert manifest["shard"].tolist() == [0] * 5 + [1] * 5 + [2] * 2
    assert set(manifest["label"]) == {"cat", "dog"} and manifest["label_id"].notna().all()
    assert (manifest["width"] == 12).all() and (manifest["height"] == 10).all()
    assert manifest["sha256"].is_unique


def test_shard_stage_resumes_parts_and_needs_a_readable_image(tmp_path: Path, messy_folder: Path):
    cfg = build_config({"data": {"source": str(messy_folder)}, "cluster": {"k": 1, "super_clusters": 1}})
    store = RunStore(tmp_path / "run")
    run_stage(store, cfg, "shard")
    before = store.done_record("shard", None, "part-00000")
    assert scan_part(store, cfg.data, "part-00000") == before["counts"]
    assert store.done_record("shard", None, "part-00000") == before  # not recomputed
    run_stage(store, cfg, "shard", force=True)
    assert store.done_record("shard", None, "part-00000")["finished_at"] > before["finished_at"]

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.png").write_text("nope")
    cfg = build_config({"data": {"source": str(junk)}, "cluster": {"k": 1, "super_clusters": 1}})
    with pytest.raises(ConfigError, match="no readable image"):
        run_stage(RunStore(tmp_path / "run2"), cfg, "shard")


def test_bundled_digits_are_written_once_as_pngs(tmp_path: Path):
    from deepercluster.data.digits import digits_folder

    folder = digits_folder()
    files = sorted(folder.glob("*/*.png"))
    assert len(files) == 1797 and {f.parent.name for f in files} == {str(i) for i in range(10)}
    assert Image.open(files[0]).size == (8, 8)
    stamp = (folder / "_complete").stat().st_mtime
    assert digits_folder() == folder and (folder / "_complete").stat().st_mtime == stamp


def test_a_source_changed_after_the_shard_stage_is_said_in_one_line(tmp_path: Path, digits_dir: Path):
    import shutil

    from deepercluster.data.shard import source_change
    from deepercluster.stages import run_stage

    source = tmp_path / "images"
    shutil.copytree(digits_dir, source)
    cfg = build_config(tiny_overrides(source))
    store = RunStore(tmp_path / "run")
    run_stage(store, cfg, "shard")
    assert source_change(store, cfg.data) is None
    shutil.copy(next((source / "3").glob("*.png")), source / "3" / "new-0001.png")  # one more image in a class
    note = source_change(store, cfg.data)
    assert note and "\n" not in note and "changed since the shard stage listed it (240 entries then)" in note
    assert "deepercluster stage shard --run RUN --force" in note
    assert run_stage(store, cfg, "shard")["images"] == 240  # the run keeps its snapshot
