"""The shard stage on every source kind, and on a folder holding every broken and odd-but-valid image case."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from deepercluster.config import build_config
from deepercluster.data.images import decode, read_bytes
from deepercluster.data.shard import load_manifest, load_manifest_shard
from deepercluster.errors import ConfigError
from deepercluster.stages import run_stage
from deepercluster.store import RunStore


def _rgb(seed: int, size=(24, 20)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _cfg(source, **data) -> dict:
    return {"data": {"source": str(source), **data}, "cluster": {"k": 1, "super_clusters": 1}}


def _odd_and_broken_folder(root: Path) -> None:
    for i in range(5):
        (root / "good").mkdir(parents=True, exist_ok=True)
        _rgb(i).save(root / "good" / f"g{i}.png")
    odd = root / "odd"
    odd.mkdir()
    Image.new("CMYK", (24, 20), (0, 255, 255, 0)).save(odd / "cmyk.jpg")  # red
    Image.fromarray(np.full((20, 24), 40000, np.uint16)).save(odd / "grey16.png")
    pal = Image.new("P", (24, 20), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((0, 0), 1)
    pal.save(odd / "palette.png", transparency=0)  # index 0 transparent: white once composited
    frames = [Image.new("RGB", (24, 20), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(odd / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    Image.fromarray(np.arange(480, dtype=np.uint8).reshape(20, 24), mode="L").save(odd / "grey.png")
    stored = Image.new("RGB", (24, 20), (0, 0, 0))
    stored.paste((255, 255, 255), (0, 0, 12, 20))  # stored: left half white; orientation 6 puts it on top
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(odd / "rotated.jpg", exif=exif.tobytes(), quality=95)
    bad = root / "rejected"  # sorts after good/: its copy of g0.png is the later one
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    _rgb(7, (64, 48)).save(bad / "whole.jpg", quality=90)
    whole = (bad / "whole.jpg").read_bytes()
    (bad / "whole.jpg").unlink()
    (bad / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (bad / "text.png").write_text("this is not an image")
    (bad / "notes.txt").write_text("hello")
    Image.new("L", (4000, 3000)).save(bad / "bomb.png")  # 12 Mpx in a few kB
    (bad / "missing.jpg").symlink_to(bad / "gone.jpg")
    _rgb(8).save(bad / "locked.png")
    (bad / "locked.png").chmod(0o000)
    Image.new("L", (3, 40)).save(bad / "thin.png")
    shutil.copy(root / "good" / "g0.png", bad / "copy.png")


def _run_stage_unprivileged(run: Path, overrides: dict) -> dict:
    """The stage in a child process that file permissions apply to: as root, one without the capabilities that
    bypass them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), so that a file without read permission is unreadable."""
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: no way to make a file unreadable")
        prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    code = ("import json, sys; from deepercluster.config import build_config; "
            "from deepercluster.stages import run_stage; from deepercluster.store import RunStore; "
            "print(json.dumps(run_stage(RunStore(sys.argv[1]), build_config(json.loads(sys.argv[2])), 'shard')))")
    done = subprocess.run([*prefix, sys.executable, "-c", code, str(run), json.dumps(overrides)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_broken_image_is_a_reject_and_odd_images_decode_right(tmp_path: Path):
    root = tmp_path / "images"
    _odd_and_broken_folder(root)
    run = tmp_path / "run"
    info = _run_stage_unprivileged(run, _cfg(root, shard_size=4, max_pixels=1_000_000, min_side=4))

    store = RunStore(run)
    manifest = load_manifest(store)
    rejects = store.read_parquet("data/rejects.parquet")
    reasons = {Path(u).name: r for u, r in zip(rejects["uri"], rejects["reason"], strict=True)}
    assert reasons == {"empty.jpg": "empty file", "truncated.jpg": "truncated", "text.png": "not an image",
                       "notes.txt": "not an image suffix", "bomb.png": "too large", "missing.jpg": "dangling symlink",
                       "locked.png": "permission denied", "thin.png": "too small", "copy.png": "duplicate"}
    kept = {Path(u).name for u in manifest["uri"]}
    assert kept == {f"g{i}.png" for i in range(5)} | {"cmyk.jpg", "grey16.png", "palette.png", "animated.gif",
                                                      "grey.png", "rotated.jpg"}
    assert info["images"] == len(manifest) == 11 and info["rejects"] == 9
    assert info["reasons"]["duplicate"] == 1 and info["shards"] == 3
    assert manifest["image_id"].tolist() == list(range(11))
    assert manifest["shard"].tolist() == [0] * 4 + [1] * 4 + [2] * 3
    assert set(manifest["label"]) == {"good", "odd"}

    rows = manifest.set_index(manifest["uri"].map(lambda u: Path(u).name))
    assert (rows.loc["rotated.jpg", "width"], rows.loc["rotated.jpg", "height"]) == (20, 24)  # upright size
    rotated = np.asarray(decode(read_bytes(rows.loc["rotated.jpg", "uri"])))
    assert rotated.shape == (24, 20, 3)
    assert rotated[:10].mean() > 240 and rotated[-10:].mean() < 15  # the white half is on top: upright

    def pixel(name: str, xy=(5, 5)) -> tuple:
        img = decode(read_bytes(rows.loc[name, "uri"]))
        assert img.mode == "RGB" and img.size == (24, 20)
        return tuple(int(v) for v in img.getpixel(xy))

    assert all(abs(a - b) <= 3 for a, b in zip(pixel("cmyk.jpg"), (255, 0, 0), strict=True))
    assert pixel("grey16.png") == (156, 156, 156)  # 40000 / 65535 of full scale, not clipped to white
    assert pixel("palette.png", (0, 0)) == (255, 0, 0) and pixel("palette.png") == (255, 255, 255)
    assert pixel("animated.gif") == (255, 0, 0)  # the first frame
    assert pixel("grey.png", (3, 0)) == (3, 3, 3)

    shard1 = load_manifest_shard(store, 1)
    assert shard1["image_id"].tolist() == [4, 5, 6, 7]


def _yfcc_line(n: int, pid: int, phash: str, marker: int, tags: str = "", lon: str = "", lat: str = "") -> str:
    f = [str(n), str(pid), phash, "123@N00", "nick", "2010-01-01 00:00:00.0", "1262304000", "Canon", "title",
         "desc", tags, "", lon, lat, "16" if lon else "", "http://page", "http://dl", "CC", "http://lic", "1", "2",
         "abc", "def", "jpg", str(marker)]
    return "\t".join(f)


def test_yfcc100m_metadata_keeps_photos_with_their_metadata(tmp_path: Path):
    mirror = tmp_path / "mirror"
    lines = []
    for i in range(6):
        phash = f"{i:03x}" + "ab" * 14
        lines.append(_yfcc_line(i, 1000 + i, phash, 0, tags=f"tag{i},sky", lon=f"{2.35 + i}", lat="48.85"))
        if i != 4:  # photo 1004 was never downloaded: a reject "missing"
            (mirror / phash[:3]).mkdir(parents=True, exist_ok=True)
            _rgb(i).save(mirror / phash[:3] / f"{phash}.jpg", quality=90)
    lines.insert(2, _yfcc_line(90, 2000, "ffffff", 1))  # a video: dropped
    lines.insert(4, "7\t1007\tbroken line")  # malformed
    old = _yfcc_line(0, 1005, "", 0).split("\t")
    lines.append("\t".join([old[1]] + old[3:]))  # the 23-field layout (no line number, no hash): id 1005 again
    meta = tmp_path / "yfcc100m_dataset"
    meta.write_text("\n".join(lines) + "\n")
    ids = tmp_path / "ids.npy"
    np.save(ids, np.array([1000, 1001, 1002, 1003, 1004, 1005, 3000]))

    cfg = build_config(_cfg(meta, kind="yfcc100m", id_list=str(ids), shard_size=2,
                            path_template=str(mirror) + "/{hash[:3]}/{hash}.{ext}"))
    store = RunStore(tmp_path / "run")
    info = run_stage(store, cfg, "shard")
    manifest = load_manifest(store)
    rejects = store.read_parquet("data/rejects.parquet")
    assert manifest["photo_id"].tolist() == [1000, 1001, 1002, 1003, 1005]
    assert manifest["user_tags"].tolist()[0] == "tag0,sky"
    assert manifest["longitude"].tolist() == pytest.approx([2.35, 3.35, 4.35, 5.35, 7.35])
    assert manifest["latitude"].tolist() == pytest.approx([48.85] * 5)
    assert manifest["uri"][1] == f"{mirror}/001/001{'ab' * 14}.jpg"
    assert manifest["label_id"].isna().all() and info["classes"] == 0
    assert sorted(rejects["reason"]) == ["malformed metadata line", "missing", "missing"]  # 1004; 1005 (no hash)
    assert f"{meta}:5" in set(rejects["uri"])  # the malformed line, by line number

    with pytest.raises(ConfigError, match="unknown"):
        build_config(_cfg(meta, kind="yfcc100m", path_template="/m/{photo}.jpg"))
    with pytest.raises(ConfigError, match="needs data.path_template"):
        build_config(_cfg(meta, kind="yfcc100m"))


def test_file_lists_txt_csv_parquet_and_a_memory_folder(tmp_path: Path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        _rgb(i).save(folder / f"{i}.png")
    (tmp_path / "list.txt").write_text("imgs/0.png\tcat\nimgs/1.png\tdog\n\n" + f"{folder}/2.png\nimgs/nope.png\n")
    import pandas as pd

    pd.DataFrame({"path": ["imgs/3.png", "imgs/0.png", "imgs/1.png"], "label": ["b", "a", None]}).to_csv(
        tmp_path / "list.csv", index=False)
    pd.DataFrame({"uri": [str(folder / "2.png"), str(folder / "3.png")], "cls": [7, 8]}).to_parquet(
        tmp_path / "list.parquet")

    def run(name: str, **data):
        store = RunStore(tmp_path / f"run-{name}")
        run_stage(store, build_config(_cfg(tmp_path / name, **data)), "shard")
        return load_manifest(store), store.read_parquet("data/rejects.parquet")

    manifest, rejects = run("list.txt")
    assert [Path(u).name for u in manifest["uri"]] == ["0.png", "1.png", "2.png"]
    assert manifest["label"].tolist()[:2] == ["cat", "dog"] and pd.isna(manifest["label"][2])
    assert manifest["label_id"].tolist()[:2] == [0, 1]
    assert rejects["reason"].tolist() == ["missing"] and rejects["uri"][0].endswith("imgs/nope.png")
    manifest, _ = run("list.csv")
    assert [Path(u).name for u in manifest["uri"]] == ["3.png", "0.png", "1.png"]
    assert manifest["label"].tolist()[:2] == ["b", "a"]
    manifest, _ = run("list.parquet", label_column="cls")
    assert manifest["label"].tolist() == ["7", "8"]

    fs = fsspec.filesystem("memory")
    for i in range(3):
        buf = io.BytesIO()
        _rgb(10 + i).save(buf, format="PNG")
        fs.pipe(f"/dc-test/{'ab'[i % 2]}/{i}.png", buf.getvalue())
    store = RunStore(tmp_path / "run-memory")
    info = run_stage(store, build_config(_cfg("memory://dc-test")), "shard")
    manifest = load_manifest(store)
    assert info["images"] == 3 and manifest["uri"].str.startswith("memory://").all()
    assert manifest["label"].tolist() == ["a", "a", "b"]
    fs.rm("/dc-test", recursive=True)


def _tar(path: Path, samples: list[tuple[str, bytes | None, str | None]]) -> None:
    with tarfile.open(path, "w") as tf:
        for key, image, label in samples:
            for name, data in [(f"{key}.jpg", image), (f"{key}.cls", label.encode() if label else None)]:
                if data is not None:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))


def test_webdataset_tars_are_read_in_place(tmp_path: Path):
    def jpeg(seed: int) -> bytes:
        buf = io.BytesIO()
        _rgb(seed).save(buf, format="JPEG", quality=90)
        return buf.getvalue()

    shards = tmp_path / "wds"
    shards.mkdir()
    _tar(shards / "train-000.tar", [("a/000", jpeg(0), "3"), ("a/001", jpeg(1), "5"), ("a/002", None, "1")])
    _tar(shards / "train-001.tar", [("b/000", jpeg(2), "3"), ("b/001", b"", "5")])
    store = RunStore(tmp_path / "run")
    info = run_stage(store, build_config(_cfg(shards / "train-{000..001}.tar")), "shard")
    manifest = load_manifest(store)
    rejects = store.read_parquet("data/rejects.parquet")
    assert info["images"] == 3 and manifest["label"].tolist() == ["3", "5", "3"]
    assert manifest["uri"][0].startswith("tar://a/000.jpg@") and manifest["uri"][0].endswith("train-000.tar")
    assert sorted(rejects["reason"]) == ["empty file", "no image in sample"]
    assert np.array_equal(np.asarray(decode(read_bytes(manifest["uri"][2]))),
                          np.asarray(decode(jpeg(2))))  # the bytes of the member, read by offset
    # the folder of tars is recognised as webdataset too, and lists the same samples
    store2 = RunStore(tmp_path / "run2")
    run_stage(store2, build_config(_cfg(shards)), "shard")
    assert load_manifest(store2)["uri"].tolist() == manifest["uri"].tolist()


def test_yfcc_id_lists_are_sorted_memory_maps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import pandas as pd

    from deepercluster.data import yfcc

    monkeypatch.setattr(yfcc, "CHUNK_IDS", 4)  # several blocks per list
    unsorted = np.array([9, 3, 70000000001, 3, 12, 5, 1, 44, 2, 8], dtype=np.int64)
    expected = np.sort(unsorted)
    np.save(tmp_path / "sorted.npy", expected)
    np.save(tmp_path / "unsorted.npy", unsorted.astype(np.uint64))
    (tmp_path / "ids.txt").write_text("9 3\n70000000001\n3\t12\n5\n1\n44\n2\n8")
    pd.DataFrame({"photo_id": unsorted}).to_parquet(tmp_path / "ids.parquet")
    with fsspec.open("memory://lists/ids.npy", "wb") as f:
        np.save(f, unsorted)
    for uri in ["sorted.npy", "unsorted.npy", "ids.txt", "ids.parquet", "memory://lists/ids.npy"]:
        scratch = tmp_path / f"scratch-{Path(uri).name}"
        scratch.mkdir()
        ids = yfcc.load_id_list(uri if "://" in uri else str(tmp_path / uri), str(scratch))
        assert isinstance(ids, np.memmap), uri  # mapped from disk, never whole in memory
        np.testing.assert_array_equal(ids, expected)
        assert yfcc._in(ids, 70000000001) and yfcc._in(ids, 3) and not yfcc._in(ids, 4) and not yfcc._in(ids, 10**12)
    in_place = yfcc.load_id_list(str(tmp_path / "sorted.npy"), "/nowhere")  # a sorted local .npy: no copy
    assert Path(in_place.filename) == tmp_path / "sorted.npy"
    (tmp_path / "bad.txt").write_text("12 twelve")
    with pytest.raises(ConfigError, match="not a list of integer ids"):
        yfcc.load_id_list(str(tmp_path / "bad.txt"), str(tmp_path))
    with pytest.raises(ConfigError, match="does not exist"):
        yfcc.load_id_list(str(tmp_path / "nope.npy"), str(tmp_path))
