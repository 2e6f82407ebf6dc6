"""Nothing lost, nothing silently wrong: every input of a source ends in the manifest or in the rejects with a
reason of the fixed vocabulary, the stage never hangs on a FIFO, and no image can make a decode allocate more than
its bound."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepercluster.config import DataConfig, build_config
from deepercluster.data.images import (
    MAX_ASPECT,
    MAX_SIDE,
    REJECT_REASONS,
    ImageRejected,
    decode,
    reason_key,
    size_reject,
)
from deepercluster.data.shard import load_manifest
from deepercluster.errors import ConfigError
from deepercluster.stages import run_stage
from deepercluster.store import RunStore

STAGE_TIMEOUT_S = 240  # the stage on ~50 small files takes seconds; a FIFO opened for reading would block forever


def _rgb(seed: int, size=(24, 20)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _cfg(source, **data) -> dict:
    return {"data": {"source": str(source), **data}, "cluster": {"k": 1, "super_clusters": 1}}


def _drop_privileges_prefix() -> list[str] | None:
    """The command prefix under which file permissions apply to the stage (as root: without the capabilities
    that bypass them), or None when there is no way (root without setpriv)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        return None
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


def _corrupt_exif_jpeg() -> bytes:
    """A good JPEG with an APP1 EXIF block whose IFD claims 65535 entries in 12 bytes."""
    jpeg = _encoded(_rgb(31), "JPEG", quality=90)
    payload = b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 0xFFFF) + b"\x12\x01\x03\x00" * 3
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def _every_kind_of_entry(root: Path, elsewhere: Path, unreadable: bool) -> dict[str, str | None]:
    """Make one entry of each kind under ``root``; return entry (path relative to ``root``) -> expected reject
    reason (None: kept in the manifest). With ``unreadable``, also a file and a folder without permissions."""
    expected: dict[str, str | None] = {}

    def put(rel: str, data: bytes | Image.Image, reason: str | None, fmt: str | None = None, **kw) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, Image.Image):
            data.save(path, format=fmt, **kw)
        else:
            path.write_bytes(data)
        expected[rel] = reason

    root.mkdir(parents=True)
    # broken
    put("empty.jpg", b"", "empty file")
    jpeg = _encoded(_rgb(1, (64, 48)), "JPEG", quality=90)
    put("truncated.jpg", jpeg[: len(jpeg) // 2], "truncated")
    png = _encoded(_rgb(2, (64, 64)), "PNG")
    put("truncated.png", png[: len(png) // 2], "truncated")
    put("text.jpg", b"just some text, not a JPEG\n" * 4, "not an image")
    put("page.png", b"<!doctype html><html><body>404 Not Found</body></html>\n", "not an image")
    put("bomb.png", Image.new("L", (2000, 2000)), "too large")  # 4 Mpx (max_pixels 3.5M) in 4 kB
    put("line_300k.png", Image.new("1", (1, 300_000)), "too large side")  # 661 bytes
    put("line_3m.png", Image.new("1", (1, 3_000_000)), "too large side")  # 5.9 kB, far below max_pixels
    put("thin.png", Image.new("L", (2, 150), 9), "extreme aspect ratio")
    put("real_png.txt", _rgb(3), "not an image suffix", "PNG")
    (root / "dangling.jpg").symlink_to(root / "gone.jpg")
    expected["dangling.jpg"] = "dangling symlink"
    os.mkfifo(root / "pipe.png")
    expected["pipe.png"] = "not a regular file"
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(root / "sock.jpg"))
        expected["sock.jpg"] = "not a regular file"
    except OSError:  # a path too long for a unix socket: the FIFO stands for every non-regular file
        pass
    finally:
        sock.close()
    (root / "loops").mkdir()
    (root / "loops" / "back").symlink_to(root / "loops")  # a folder link to its own folder
    expected["loops/back"] = "symlink loop"
    (root / "loops" / "self.jpg").symlink_to(root / "loops" / "self.jpg")  # a link to itself
    expected["loops/self.jpg"] = "symlink loop"
    bad_name = os.fsencode(root) + b"/caf\xe9.jpg"  # latin-1 bytes: no UTF-8 text
    with open(bad_name, "wb") as f:
        f.write(_encoded(_rgb(4), "JPEG"))
    expected["caf\\xe9.jpg"] = "undecodable name"
    # duplicates: the first in listing order is kept (root files sort before folders, names in code point order)
    original = _rgb(5)
    put("aa_original.png", original, None, "PNG")
    put("zz_duplicate.png", (root / "aa_original.png").read_bytes(), "duplicate")
    put("zz_reencoded.png", original, None, "PNG", compress_level=1)  # same pixels, other bytes: kept
    # odd but valid
    put("cmyk.jpg", Image.new("CMYK", (24, 20), (0, 255, 255, 0)), None)
    put("grey16.png", Image.fromarray(np.full((20, 24), 40000, np.uint16)), None)
    pal = Image.new("P", (24, 20), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.putpixel((0, 0), 1)
    put("palette.png", pal, None, transparency=0)
    frames = [Image.new("RGB", (24, 20), c) for c in [(255, 0, 0), (0, 0, 255)]]
    put("animated.gif", frames[0], None, save_all=True, append_images=frames[1:], duration=100, loop=0)
    put("image.webp", _rgb(6), None, quality=90)
    put("image.tif", _rgb(7), None)
    put("lab.tif", Image.new("LAB", (24, 20), (60, 20, 30)), None)
    put("image.bmp", _rgb(8), None)
    stored = Image.new("RGB", (24, 20), (0, 0, 0))
    stored.paste((255, 255, 255), (0, 0, 12, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    put("rotated.jpg", stored, None, exif=exif.tobytes(), quality=95)
    put("bad_exif.jpg", _corrupt_exif_jpeg(), None)
    put("one.png", Image.new("RGB", (1, 1), (1, 2, 3)), None)
    put("junk_after.jpg", _encoded(_rgb(9), "JPEG") + b"\x00trailing junk" * 8, None)
    put("png_inside.jpg", _encoded(_rgb(10), "PNG"), None)
    put("UPPER.JPG", _rgb(11), None, "JPEG")
    put("unicode é 名.png", _rgb(12), None)
    put("with space.png", _rgb(13), None)
    put("new\nline.png", _rgb(14), None)
    put("/".join(f"d{i}" for i in range(10)) + "/deep.png", _rgb(15), None)  # 10 folders deep
    # hidden names are images like any other (data.skip_hidden is off)
    put("_DSC0001.jpg", _rgb(16), None)
    put(".hidden.png", _rgb(17), None)
    put("_private/p.png", _rgb(18), None)
    put(".cache/c.png", _rgb(19), None)
    # a symlinked folder (data on another disk): followed, its images listed under the link
    elsewhere.mkdir()
    for i in range(2):
        _rgb(20 + i).save(elsewhere / f"l{i}.png")
        expected[f"linked/l{i}.png"] = None
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    if unreadable:
        put("locked.png", _rgb(22), "permission denied")
        (root / "locked.png").chmod(0o000)
        put("locked_dir/inside.png", _rgb(23), None)
        del expected["locked_dir/inside.png"]  # its content cannot be listed: the folder is the entry
        (root / "locked_dir").chmod(0o000)
        expected["locked_dir"] = "unreadable folder: Permission denied"
    return expected


def _run_stage_subprocess(prefix: list[str], run: Path, overrides: dict) -> dict:
    code = ("import json, sys; from deepercluster.config import build_config; "
            "from deepercluster.stages import run_stage; from deepercluster.store import RunStore; "
            "print(json.dumps(run_stage(RunStore(sys.argv[1]), build_config(json.loads(sys.argv[2])), 'shard')))")
    try:
        done = subprocess.run([*prefix, sys.executable, "-c", code, str(run), json.dumps(overrides)],
                              capture_output=True, text=True, timeout=STAGE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the shard stage did not finish in {STAGE_TIMEOUT_S} s (blocked on the FIFO?)")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_every_entry_of_a_folder_is_in_the_manifest_or_the_rejects(tmp_path: Path):
    """An *entry* is each file, FIFO, socket or symbolic link the test creates under the folder (a link to a
    folder is not one: each file reached through it is), plus each unreadable folder (one entry: its content
    cannot be listed). Every entry must be one manifest row or one reject row, with the expected reason, so that
    entries == manifest rows + reject rows. The stage runs in a subprocess, with a timeout (a FIFO opened for
    reading blocks forever), and, as root, without the capabilities that bypass file permissions (so that the
    unreadable file and folder are unreadable; without setpriv, as root, those two entries are left out)."""
    prefix = _drop_privileges_prefix()
    root = tmp_path / "images"
    expected = _every_kind_of_entry(root, tmp_path / "elsewhere", unreadable=prefix is not None)
    run = tmp_path / "run"
    try:
        info = _run_stage_subprocess(prefix or [], run, _cfg(root, shard_size=8, max_pixels=3_500_000))
    finally:
        for locked in ("locked.png", "locked_dir"):
            if (root / locked).exists():
                (root / locked).chmod(0o755)
    if prefix is None:
        print("root without setpriv: the unreadable file and folder were left out")

    store = RunStore(run)
    manifest = load_manifest(store)
    rejects = store.read_parquet("data/rejects.parquet")

    def rel(uri: str) -> str:
        assert uri.startswith(f"{root}/"), uri
        return uri[len(str(root)) + 1:]

    got = {rel(u): None for u in manifest["uri"]}
    got.update({rel(u): r for u, r in zip(rejects["uri"], rejects["reason"], strict=True)})
    assert len(manifest) + len(rejects) == len(got) == len(expected)  # no entry twice, none lost
    assert got == expected
    assert info["images"] + info["rejects"] == len(expected)
    assert all(reason_key(r) in REJECT_REASONS for r in rejects["reason"])
    assert info["reasons"] == {r: sum(v == r for v in expected.values()) for r in set(expected.values()) - {None}}

    rows = manifest.set_index(manifest["uri"].map(rel))
    assert (rows.loc["rotated.jpg", "width"], rows.loc["rotated.jpg", "height"]) == (20, 24)  # upright
    assert (rows.loc["one.png", "width"], rows.loc["one.png", "height"]) == (1, 1)
    assert rows.loc["linked/l0.png", "label"] == "linked" and rows.loc["d0/d1/d2/d3/d4/d5/d6/d7/d8/d9/deep.png",
                                                                        "label"] == "d0"
    for name in rows.index:  # every kept image decodes, as extraction will decode it
        img = decode(Path(rows.loc[name, "uri"]).read_bytes())
        assert img.mode == "RGB" and img.size == (rows.loc[name, "width"], rows.loc[name, "height"]), name


def test_hidden_names_are_skipped_only_on_request_and_counted(tmp_path: Path):
    """Entries here: each file at the top, and each hidden folder (one entry: it is not entered)."""
    import fsspec

    root = tmp_path / "images"
    (root / "_x").mkdir(parents=True)
    (root / ".git").mkdir()
    for i, name in enumerate(["_DSC0001.jpg", ".x.png", "a.png", "_x/in.png", ".git/in.png", "_x/more.png"]):
        _rgb(40 + i).save(root / name, format="PNG")
    fs = fsspec.filesystem("memory")
    for i, name in enumerate(["_DSC0001.jpg", ".x.png", "a.png", "_x/in.png", ".git/in.png", "_x/more.png"]):
        fs.pipe(f"/dc-hidden/{name}", _encoded(_rgb(50 + i), "PNG"))
    try:
        for k, source in enumerate((root, "memory://dc-hidden")):
            store = RunStore(tmp_path / f"run-{k}")
            info = run_stage(store, build_config(_cfg(source)), "shard")
            assert info["images"] == 6 and info["rejects"] == 0  # off by default: all listed
            store = RunStore(tmp_path / f"run-skip-{k}")
            info = run_stage(store, build_config(_cfg(source, skip_hidden=True)), "shard")
            rejects = store.read_parquet("data/rejects.parquet")
            names = sorted(u.rsplit("/", 1)[-1] for u in rejects["uri"])
            assert names == [".git", ".x.png", "_DSC0001.jpg", "_x"]
            assert set(rejects["reason"]) == {"hidden (data.skip_hidden)"}
            assert info["images"] + info["rejects"] == 5 and [u.rsplit("/", 1)[-1] for u in
                                                              load_manifest(store)["uri"]] == ["a.png"]
    finally:
        fs.rm("/dc-hidden", recursive=True)


def test_a_ragged_csv_row_is_a_reject_not_a_traceback(tmp_path: Path):
    for i in range(4):
        _rgb(60 + i).save(tmp_path / f"{i}.png")
    (tmp_path / "list.csv").write_text(
        "path,label\n"  # row 1
        "0.png,007\n"  # 2: the label stays the text '007'
        "1.png\n"  # 3: one field short
        "2.png,b\n"  # 4
        "3.png,c,extra\n"  # 5: one field too many
        ",d\n"  # 6: no path
        "3.png,e\n")  # 7
    store = RunStore(tmp_path / "run")
    info = run_stage(store, build_config(_cfg(tmp_path / "list.csv")), "shard")
    manifest = load_manifest(store)
    rejects = store.read_parquet("data/rejects.parquet")
    assert [Path(u).name for u in manifest["uri"]] == ["0.png", "2.png", "3.png"]
    assert manifest["label"].tolist() == ["007", "b", "e"]
    assert sorted(zip(rejects["uri"], rejects["reason"], strict=True)) == [
        (f"{tmp_path / 'list.csv'}:{n}", f"malformed list row {n}") for n in (3, 5, 6)]
    assert info["images"] + info["rejects"] == 6  # the six data rows

    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ConfigError, match="empty.csv") as err:
        run_stage(RunStore(tmp_path / "run2"), build_config(_cfg(tmp_path / "empty.csv")), "shard")
    assert "\n" not in str(err.value)


def test_the_reject_vocabulary_and_the_size_checks():
    for key, meaning in REJECT_REASONS.items():
        assert meaning and "\n" not in meaning and reason_key(key) == key
    assert reason_key("unreadable folder: Permission denied") == "unreadable folder: <error>"
    assert reason_key("corrupt: OSError") == "corrupt: <error>"
    assert reason_key("malformed list row 12") == "malformed list row <n>"
    assert reason_key("unreadable: TimeoutError") == "unreadable: <error>"
    assert reason_key("something new") is None
    defaults = DataConfig()
    assert (defaults.max_side, defaults.max_aspect, defaults.skip_hidden) == (MAX_SIDE, MAX_ASPECT, False)
    assert size_reject(16384, 16384) is None and size_reject(16385, 400) == "too large side"
    assert size_reject(50, 1) is None and size_reject(51, 1) == "extreme aspect ratio"
    assert size_reject(100, 100, max_pixels=9999) == "too large"
    line = _encoded(Image.new("1", (1, 3_000_000)), "PNG")
    with pytest.raises(ImageRejected, match="too large side") as err:
        decode(line)
    assert err.value.reason == "too large side"
    with pytest.raises(ImageRejected, match="extreme aspect ratio"):
        decode(line, max_side=10_000_000)
    assert decode(_encoded(_rgb(70), "PNG")).size == (24, 20)


def test_extraction_decode_of_a_1_by_3m_png_is_a_clear_error_in_bounded_memory(tmp_path: Path):
    """The decode path of extraction and training (``images.decode`` then the clustering view's resize of the
    short side, as ``HostView.pixels`` does it) in a subprocess whose peak RSS is measured (VmHWM, or getrusage
    without /proc): without the header
    check, resizing a 1 x 3,000,000 line to a short side of 37 needs a 15 GiB intermediate (a MemoryError, or the
    OOM killer). The subprocess does not import torch (whose import alone takes ~800 MB of RSS here); HostView
    itself is checked in this process for the error it raises."""
    path = tmp_path / "line.png"
    Image.new("1", (1, 3_000_000)).save(path)
    code = """
import json, resource, sys
from PIL import Image
from deepercluster.data.images import ImageRejected, decode, read_bytes

def peak_kb():
    # the peak RSS of this process since its exec: /proc's VmHWM (getrusage's ru_maxrss also counts the RSS of
    # the parent it was forked from, here pytest with torch loaded), getrusage where /proc is not there
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

before = peak_kb()
try:
    img = decode(read_bytes(sys.argv[1]))
    w, h = img.size
    short = 37  # round(32 / 0.875): the clustering view of a 32 px input
    img.resize((short, int(short * h / w)) if w <= h else (int(short * w / h), short), Image.BILINEAR)
    outcome = "decoded"
except ImageRejected as err:
    outcome = f"{err.reason} | {err}"
except MemoryError:
    outcome = "MemoryError"
print(json.dumps({"outcome": outcome, "before_kb": before, "after_kb": peak_kb()}))
"""
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["outcome"].startswith("too large side | too large side: 1 x 3000000 pixels"), result
    assert result["after_kb"] < 256 * 1024, result  # peak RSS of the whole process: well below 1 GB
    assert result["after_kb"] - result["before_kb"] < 32 * 1024, result  # the decode itself: a few MB at most

    from deepercluster.errors import DataError
    from deepercluster.features.loader import HostView

    with pytest.raises(DataError, match="too large side: 1 x 3000000") as err:
        HostView(32).pixels(str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_list_naming_a_fifo_or_a_folder_never_opens_it(tmp_path: Path):
    """A file list's entries get the same checks before any open (the stage runs in a subprocess, with a timeout:
    opening the FIFO would block it forever)."""
    _rgb(80).save(tmp_path / "ok.png")
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    (tmp_path / "list.txt").write_text("ok.png\npipe.png\nfolder.png\ndangling.png\nnope.png\n")
    info = _run_stage_subprocess([], tmp_path / "run", _cfg(tmp_path / "list.txt"))
    rejects = RunStore(tmp_path / "run").read_parquet("data/rejects.parquet")
    assert info["images"] == 1
    assert dict(zip((Path(u).name for u in rejects["uri"]), rejects["reason"], strict=True)) == {
        "pipe.png": "not a regular file", "folder.png": "not a regular file", "dangling.png": "dangling symlink",
        "nope.png": "missing"}


def test_a_link_member_of_a_webdataset_tar_is_a_reject(tmp_path: Path):
    import tarfile

    with tarfile.open(tmp_path / "shard-0.tar", "w") as tf:
        for key, data in [("000", _encoded(_rgb(90), "JPEG")), ("001", _encoded(_rgb(91), "JPEG"))]:
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("002.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "000.jpg"
        tf.addfile(link)
    store = RunStore(tmp_path / "run")
    info = run_stage(store, build_config(_cfg(tmp_path / "shard-0.tar")), "shard")
    rejects = store.read_parquet("data/rejects.parquet")
    assert info["images"] == 2 and rejects["reason"].tolist() == ["not a regular file"]
    assert rejects["uri"][0] == f"{tmp_path / 'shard-0.tar'}#002.jpg"


_PEAK_CODE = """
import json, sys
from deepercluster.config import build_config
from deepercluster.stages import run_stage
from deepercluster.store import RunStore
store, cfg = RunStore(sys.argv[1]), build_config(json.loads(sys.argv[2]))
info = run_stage(store, cfg, "shard")
run_stage(store, cfg, "extract", 0)
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
print(json.dumps({"rejects": info["reasons"], "peak_kib": peak}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc for the peak RSS")
def test_an_extreme_aspect_png_is_a_reject_and_costs_no_memory(tmp_path: Path, digits_dir: Path):
    """The shard and extract stages of 240 digits, with and without a 1 x 3,000,000 PNG (5.9 KB; its resize alone
    would need 15 GiB): it is a reject, and the peak RSS of the process stays within 10% of the run without it."""
    plain, extreme = tmp_path / "plain", tmp_path / "extreme"
    shutil.copytree(digits_dir, plain)
    shutil.copytree(digits_dir, extreme)
    Image.new("L", (3_000_000, 1), 255).save(extreme / "line.png")
    assert (extreme / "line.png").stat().st_size < 20_000
    peaks = {}
    for folder in (plain, extreme):
        overrides = {"data": {"source": str(folder), "shard_size": 40, "image_size": 16, "max_pixels": 10**8},
                     "model": {"arch": "smallnet", "feature_dim": 32}, "extract": {"batch_size": 32},
                     "cluster": {"super_clusters": 1, "k": 5}}
        done = subprocess.run([sys.executable, "-c", _PEAK_CODE, str(tmp_path / f"run-{folder.name}"),
                               json.dumps(overrides)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        out = json.loads(done.stdout.strip().splitlines()[-1])
        peaks[folder.name] = out["peak_kib"]
        if folder is extreme:
            assert out["rejects"] == {"too large side": 1}
    print(f"peak RSS: {peaks['plain'] / 1024:.0f} MiB without the line, {peaks['extreme'] / 1024:.0f} MiB with it")
    assert peaks["extreme"] <= 1.10 * peaks["plain"], peaks
