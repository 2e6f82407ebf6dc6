"""The run lease with real processes: refusal naming the owner, take-over of dead and expired owners, heartbeat,
nested holds, concurrent take-over (exactly one winner), and non-local stores (memory://, S3 on moto's server)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from deepercluster.lease import LEASE_FILE, RunLockedError, acquire_lease, read_lease, run_lease
from deepercluster.store import RunStore

CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from deepercluster.lease import RunLockedError, acquire_lease
    from deepercluster.store import RunStore
    uri, hold, go = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    store = RunStore(uri)
    print("ready", flush=True)
    while go and not Path(go).exists():
        time.sleep(0.01)
    try:
        lease = acquire_lease(store, "child run", ttl_s=3600, heartbeat_s=600)
    except RunLockedError as err:
        print("LOCKED", err, flush=True)
        sys.exit(3)
    print("ACQUIRED", lease.owner["token"], flush=True)
    time.sleep(hold)
    lease.release()
""")


def _child(uri: str, hold: float = 0.0, go: str = "") -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", CHILD, uri, str(hold), go], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _owner(host: str, pid: int, expires_in: float) -> dict:
    now = time.time()
    return {"host": host, "pid": pid, "what": "stage cluster r0", "token": uuid.uuid4().hex, "started": now - 5,
            "expires": now + expires_in}


def test_second_process_refused_with_one_line_naming_owner(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "run")
    with run_lease(store, "deepercluster run") as lease:
        assert read_lease(store) == lease.owner
        proc = _child(store.uri)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 3, out + err
        message = out.split("LOCKED ", 1)[1].rstrip("\n")
        assert "\n" not in message
        assert f"run {store.uri} is in use by deepercluster run (host {socket.gethostname()}, pid {os.getpid()}, " \
            in message
        assert "wait for it to finish, or stop it" in message
        assert read_lease(store) == lease.owner  # the refused process left the lease alone
    assert not (tmp_path / "run" / LEASE_FILE).exists()


def test_killed_owner_taken_over(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "run")
    proc = _child(store.uri, hold=3600)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        assert proc.stdout.readline().startswith("ACQUIRED")
        assert read_lease(store)["pid"] == proc.pid
        with pytest.raises(RunLockedError, match=f"pid {proc.pid},"):
            acquire_lease(store, "deepercluster run")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert read_lease(store)["pid"] == proc.pid  # the killed process left its lease (ttl one hour)
    with run_lease(store, "deepercluster run") as lease:
        assert read_lease(store) == lease.owner
        assert lease.owner["pid"] == os.getpid()


def test_expired_lease_of_other_host_taken_over_live_one_refused(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "run")
    store.write_json(LEASE_FILE, _owner("other-host", 1234, expires_in=-1))
    with run_lease(store, "deepercluster run") as lease:
        assert read_lease(store)["token"] == lease.owner["token"]
    assert read_lease(store) is None
    live = _owner("other-host", 1234, expires_in=30)
    store.write_json(LEASE_FILE, live)
    with pytest.raises(RunLockedError) as info:
        acquire_lease(store, "deepercluster run")
    assert "in use by stage cluster r0 (host other-host, pid 1234, since " in str(info.value)
    assert "lease expires in 30s)" in str(info.value) or "lease expires in 29s)" in str(info.value)
    assert read_lease(store) == live


def test_unreadable_lease_taken_over(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "run")
    store.write_text(LEASE_FILE, '{"host": "other-ho')  # torn by hand
    with run_lease(store, "deepercluster run") as lease:
        assert read_lease(store) == lease.owner


def test_heartbeat_renews_expiry(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "run")
    with run_lease(store, "deepercluster run", ttl_s=2, heartbeat_s=0.2) as lease:
        first = read_lease(store)["expires"]
        time.sleep(1.5)
        renewed = read_lease(store)
        assert renewed["expires"] > first + 0.5
        assert renewed["token"] == lease.owner["token"] and not lease.lost
        time.sleep(2.5)  # longer than the ttl: still held thanks to the heartbeat
        assert read_lease(store)["expires"] > time.time()
        with pytest.raises(RunLockedError):
            _refuse_from_child(store)


def _refuse_from_child(store: RunStore) -> None:
    proc = _child(store.uri)
    out, err = proc.communicate(timeout=60)
    if proc.returncode == 3:
        raise RunLockedError(out)
    assert proc.returncode == 0, out + err


def test_heartbeat_notices_lost_lease(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "run")
    lease = acquire_lease(store, "deepercluster run", ttl_s=2, heartbeat_s=0.1)
    thief = _owner("other-host", 1234, expires_in=30)
    store.write_json(LEASE_FILE, thief)
    deadline = time.monotonic() + 5
    while not lease.lost:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    lease.release()
    assert read_lease(store) == thief  # not ours any more: release leaves it


def test_nested_hold_released_by_outermost(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "run")
    with run_lease(store, "deepercluster run") as outer:
        with run_lease(RunStore(tmp_path / "run"), "stage cluster r0") as inner:
            assert inner is outer
        assert read_lease(store) == outer.owner
        inner = acquire_lease(store, "stage train r0")
        inner.release()
        assert read_lease(store) == outer.owner
    assert read_lease(store) is None
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "run").iterdir())


def test_exception_releases(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "run")
    with pytest.raises(KeyError), run_lease(store, "deepercluster run"):
        raise KeyError("boom")
    assert read_lease(store) is None


def test_concurrent_take_over_has_one_winner(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "run")
    store.write_json(LEASE_FILE, _owner("other-host", 1234, expires_in=-1))
    go = tmp_path / "go"
    procs = [_child(store.uri, hold=4.0, go=str(go)) for _ in range(4)]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    go.touch()
    results = [proc.communicate(timeout=60) for proc in procs]
    codes = sorted(proc.returncode for proc in procs)
    assert codes == [0, 3, 3, 3], results
    assert read_lease(store) is None


def test_memory_store(request: pytest.FixtureRequest) -> None:
    store = RunStore(f"memory://lease-{uuid.uuid4().hex}")
    with run_lease(store, "deepercluster run") as lease:
        assert read_lease(store) == lease.owner
        with run_lease(store, "stage cluster r0") as inner:  # nested
            assert inner is lease
        assert read_lease(store) == lease.owner
    assert read_lease(store) is None
    parent = _owner(socket.gethostname(), os.getppid(), expires_in=30)  # alive, same host
    store.write_json(LEASE_FILE, parent)
    with pytest.raises(RunLockedError, match=f"pid {os.getppid()},"):
        acquire_lease(store, "deepercluster run")
    assert read_lease(store) == parent
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    store.write_json(LEASE_FILE, _owner(socket.gethostname(), dead.pid, expires_in=30))
    with run_lease(store, "deepercluster run") as lease:
        assert read_lease(store) == lease.owner
    assert read_lease(store) is None


def test_s3_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1",
                       "DEEPERCLUSTER_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
        monkeypatch.setenv(key, value)
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "moto server did not start"
                time.sleep(0.1)
        store = RunStore("s3://runs/run1")
        store.fs.mkdir("runs")
        with run_lease(store, "deepercluster run") as lease:
            assert read_lease(store) == lease.owner
            with pytest.raises(RunLockedError, match=f"pid {os.getpid()},"):
                _refuse_from_child(store)
        assert read_lease(store) is None
        other = _owner("other-host", 1234, expires_in=30)
        store.write_bytes(LEASE_FILE, json.dumps(other).encode())
        with pytest.raises(RunLockedError, match="host other-host"):
            acquire_lease(store, "deepercluster run")
        store.write_bytes(LEASE_FILE, json.dumps({**other, "expires": time.time() - 1}).encode())
        with run_lease(store, "deepercluster run") as lease:
            assert read_lease(store) == lease.owner
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
