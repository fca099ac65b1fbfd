"""The remote cache tier (modelbuild/cache/remote.py) against a real S3 server: SeaweedFS on 127.0.0.1.

No mock of S3: every test pushes to and fetches from a `weed server` started by tests/s3server.py.
One server serves the session (each test gets its own prefix); the kill test starts its own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import obstore
import pytest
from obstore.store import S3Store

from modelbuild.core.digest import hash_file
from modelbuild.cache.remote import PART, RemoteCorrupt, RemoteError, RemoteStore, RemoteUnavailable
from s3server import free_ports, make_bucket, s3_server, start_weed, stop_weed  # noqa: F401 (fixture)

BUCKET = "modelbuild-test"
REPO = Path(__file__).resolve().parent.parent


def use_server(monkeypatch, server) -> None:
    """Point the standard AWS variables (and only them) at ``server``."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")  # the developer's ~/.aws stays out
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ALLOW_HTTP")  # RemoteStore allows http itself when the endpoint is http://


@pytest.fixture(scope="session")
def bucket(s3_server):
    make_bucket(s3_server, BUCKET)
    return BUCKET


@pytest.fixture
def url(s3_server, bucket, monkeypatch) -> str:
    use_server(monkeypatch, s3_server)
    return f"s3://{bucket}/t-{uuid.uuid4().hex[:10]}"


def raw_store(url: str) -> S3Store:
    """Direct access to the bucket, to tamper with objects as a faulty disk or a bad actor would."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    return S3Store(bucket, prefix=prefix, client_options={"allow_http": True})


def make_output(root: Path, files: dict[str, bytes | int], key: str | None = None) -> tuple[dict, dict]:
    """Write files (bytes, or an int: that many random bytes) and return (entry, {digest: path})."""
    manifest, by_digest = {}, {}
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(content) if isinstance(content, int) else content)
        digest = hash_file(path)
        manifest[rel] = {"size": path.stat().st_size, "digest": digest}
        by_digest[digest] = path
    entry = {"action_key": key or uuid.uuid4().hex, "target": "demo", "seconds": 1.5,
             "manifest": dict(sorted(manifest.items()))}
    return entry, by_digest


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_push_then_fetch_into_an_empty_folder_is_byte_identical(url, tmp_path):
    remote = RemoteStore.from_url(url)
    entry, files = make_output(tmp_path / "out", {
        "model.onnx.data": PART * 2 + 12345,  # above PART: multipart upload, parallel ranged download
        "model.onnx": 300_000, "config/genai_config.json": b'{"a": 1}\n',
        "copy/same.json": b'{"a": 1}\n',  # same content, one object
        "empty.txt": b""})
    assert remote.lookup(entry["action_key"]) is None
    stats = remote.push(entry, files)
    assert stats == {"uploaded": 4, "skipped": 0, "uploaded_bytes": sum(p.stat().st_size for p in files.values())}
    assert remote.lookup(entry["action_key"]) == entry

    dest = tmp_path / "fresh"  # an empty local folder, as on a colleague's machine
    fetched = remote.fetch(remote.lookup(entry["action_key"]), dest)
    assert fetched["files"] == 5 and fetched["objects"] == 4
    assert tree(dest) == tree(tmp_path / "out")  # byte-identical, and no temporary leftovers
    assert remote.info() == {"url": url, "objects": 4, "actions": 1,
                             "bytes": sum(p.stat().st_size for p in files.values())}


def test_objects_already_on_the_remote_are_not_uploaded_again(url, tmp_path):
    remote = RemoteStore.from_url(url)
    first, files = make_output(tmp_path / "a", {"weights.bin": 3_000_000, "tokenizer.json": 50_000, "b.txt": b"b"})
    remote.push(first, files)
    raw = raw_store(url)
    before = {d: obstore.head(raw, RemoteStore.object_key(d)) for d in files}
    time.sleep(1.1)  # LastModified has one-second resolution: a re-upload would move it

    assert remote.push(first, files) == {"uploaded": 0, "skipped": 3, "uploaded_bytes": 0}
    shared = {"weights.bin": (tmp_path / "a/weights.bin").read_bytes(), "tokenizer.json": (tmp_path / "a/tokenizer.json").read_bytes()}
    second, files2 = make_output(tmp_path / "b", {**shared, "new.bin": 1000})
    stats = remote.push(second, files2)
    assert stats == {"uploaded": 1, "skipped": 2, "uploaded_bytes": 1000}
    after = {d: obstore.head(raw, RemoteStore.object_key(d)) for d in files}
    assert [(m["last_modified"], m["e_tag"]) for m in after.values()] == \
           [(m["last_modified"], m["e_tag"]) for m in before.values()]


def test_has_objects_is_exact_for_many_small_objects(url, tmp_path):
    remote = RemoteStore.from_url(url)
    entry, files = make_output(tmp_path / "many", {f"f{i:04d}": 64 + i for i in range(400)})
    remote.push(entry, files)
    absent = {os.urandom(32).hex() for _ in range(600)}
    started = time.perf_counter()
    assert remote.has_objects(set(files) | absent) == set(files)  # listing path: 1,000 digests
    assert time.perf_counter() - started < 10
    few = set(list(files)[:3]) | set(list(absent)[:3])
    assert remote.has_objects(few) == set(list(files)[:3])  # HEAD path
    assert remote.has_objects([]) == set()


def test_corrupt_and_truncated_remote_objects_are_never_served(url, tmp_path):
    remote = RemoteStore.from_url(url)
    entry, files = make_output(tmp_path / "out", {"big.bin": PART + 4096, "small.bin": 10_000, "ok.txt": b"fine"})
    remote.push(entry, files)
    digest = {rel: info["digest"] for rel, info in entry["manifest"].items()}
    raw = raw_store(url)
    flipped = bytearray((tmp_path / "out/small.bin").read_bytes())
    flipped[5000] ^= 1
    obstore.put(raw, RemoteStore.object_key(digest["small.bin"]), bytes(flipped))  # same size, one bit
    obstore.put(raw, RemoteStore.object_key(digest["big.bin"]), (tmp_path / "out/big.bin").read_bytes()[:PART // 2])

    dest = tmp_path / "dest"
    with pytest.raises(RemoteCorrupt) as caught:
        remote.fetch(entry, dest)
    message = str(caught.value)
    for rel in ("small.bin", "big.bin"):
        assert rel in message and digest[rel] in message
    assert "ok.txt" not in message and len(caught.value.problems) == 2
    assert list(dest.iterdir()) == []  # nothing written, not even the intact file, no temp folder

    problems = remote.verify()
    assert len(problems) == 3  # two objects and the action that needs them
    assert any(digest["small.bin"] in p for p in problems) and any(digest["big.bin"] in p for p in problems)
    assert any(entry["action_key"] in p and "lost big.bin, small.bin" in p for p in problems)
    assert remote.verify(drop=True) == problems
    assert remote.lookup(entry["action_key"]) is None
    assert remote.has_objects(set(digest.values())) == {digest["ok.txt"]}
    assert remote.verify() == []
    assert remote.push(entry, files)["uploaded"] == 2  # the next push repairs the remote
    remote.fetch(entry, dest)
    assert tree(dest) == tree(tmp_path / "out")


PUSHER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from modelbuild.cache.remote import RemoteStore
    url, spec, go = sys.argv[1], json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[3])
    remote = RemoteStore.from_url(url)
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.005)
    print(json.dumps(remote.push(spec["entry"], {d: Path(p) for d, p in spec["files"].items()})), flush=True)
""")


def start_pusher(url: str, spec: Path, go: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PUSHER, url, str(spec), str(go)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_two_processes_pushing_the_same_action_give_one_consistent_entry(url, tmp_path):
    entry, files = make_output(tmp_path / "out", {"weights.bin": PART + 777, **{f"part{i}.bin": 200_000 + i for i in range(6)}})
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"entry": entry, "files": {d: str(p) for d, p in files.items()}}))
    go = tmp_path / "go"
    pushers = [start_pusher(url, spec, go) for _ in range(2)]
    for proc in pushers:
        assert proc.stdout.readline().strip() == "ready"
    go.touch()  # both start at once
    results = [proc.communicate(timeout=120) for proc in pushers]
    assert [proc.returncode for proc in pushers] == [0, 0], [err[-2000:] for _, err in results]

    remote = RemoteStore.from_url(url)
    assert remote.lookup(entry["action_key"]) == entry
    assert remote.verify() == []  # every object's bytes match its digest
    assert remote.info()["objects"] == len(files)
    remote.fetch(entry, tmp_path / "dest")
    assert tree(tmp_path / "dest") == tree(tmp_path / "out")


def test_server_killed_mid_upload_leaves_no_entry_and_a_later_push_completes(tmp_path, monkeypatch):
    server = start_weed(tmp_path / "weed")
    try:
        make_bucket(server, BUCKET)
        use_server(monkeypatch, server)
        url = f"s3://{BUCKET}/kill"
        entry, files = make_output(tmp_path / "out", {"huge.bin": 96 << 20, "small.txt": b"x"})
        spec = tmp_path / "spec.json"
        spec.write_text(json.dumps({"entry": entry, "files": {d: str(p) for d, p in files.items()}}))
        go = tmp_path / "go"
        pusher = start_pusher(url, spec, go)
        assert pusher.stdout.readline().strip() == "ready"
        stored = lambda: sum(f.stat().st_size for f in (tmp_path / "weed/data").rglob("*") if f.is_file())  # noqa: E731
        before = stored()
        go.touch()
        deadline = time.monotonic() + 60
        while stored() < before + PART and pusher.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)  # until the server has stored at least one part of huge.bin
        assert pusher.poll() is None, "push finished before the kill: make huge.bin bigger"
        started = time.perf_counter()
        stop_weed(server)  # SIGKILL, as a crash or a pulled cable would
        out, err = pusher.communicate(timeout=60)
        assert pusher.returncode != 0 and "RemoteUnavailable" in err and url in err, err[-2000:]
        assert time.perf_counter() - started < 30
        assert server.secret_key not in err and server.access_key not in err

        server = start_weed(tmp_path / "weed")  # the same data folder, fresh ports and credentials
        use_server(monkeypatch, server)
        remote = RemoteStore.from_url(url)
        assert remote.lookup(entry["action_key"]) is None  # no entry: nobody can restore half a push
        huge = entry["manifest"]["huge.bin"]["digest"]
        assert remote.has_objects({huge}) == set()  # the unfinished multipart upload is invisible
        assert remote.push(entry, files)["uploaded"] >= 1
        assert huge in remote.has_objects({huge})
        assert remote.lookup(entry["action_key"]) == entry
        remote.fetch(entry, tmp_path / "dest")
        assert tree(tmp_path / "dest") == tree(tmp_path / "out")
    finally:
        stop_weed(server)
        shutil.rmtree(tmp_path, ignore_errors=True)  # 96 MB twice, plus the server's volumes


def test_server_down_raises_remote_unavailable_quickly_without_secrets(tmp_path, monkeypatch):
    secret, key = "S3cr3t-" + uuid.uuid4().hex, "AKIA" + uuid.uuid4().hex[:16].upper()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_ports(1)[0]}")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    remote = RemoteStore.from_url("s3://team-cache/modelbuild")
    entry, files = make_output(tmp_path / "out", {"a.bin": 1000})
    for call in (lambda: remote.lookup("k"), lambda: remote.has_objects(set(files)),
                 lambda: remote.push(entry, files), lambda: remote.fetch(entry, tmp_path / "dest"), remote.info):
        started = time.perf_counter()
        with pytest.raises(RemoteUnavailable) as caught:
            call()
        assert time.perf_counter() - started < 5
        message = str(caught.value)
        assert message.startswith("remote cache s3://team-cache/modelbuild unavailable: ") and "\n" not in message
        assert secret not in message and key not in message
        assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert not any((tmp_path / "dest").iterdir())


def test_wrong_secret_is_reported_without_echoing_it_and_nothing_written_holds_a_secret(url, s3_server, tmp_path, monkeypatch):
    remote = RemoteStore.from_url(url)
    entry, files = make_output(tmp_path / "out", {"a.bin": 5000})
    remote.push(entry, files)
    remote.fetch(entry, tmp_path / "dest")
    remote.verify()
    written = b"".join(p.read_bytes() for p in (tmp_path / "dest").rglob("*") if p.is_file())
    assert s3_server.secret_key.encode() not in written and s3_server.access_key.encode() not in written

    wrong = "Wr0ng-" + uuid.uuid4().hex
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    with pytest.raises(RemoteUnavailable) as caught:
        RemoteStore.from_url(url).lookup(entry["action_key"])
    assert wrong not in str(caught.value) and s3_server.access_key not in str(caught.value)
    assert "\n" not in str(caught.value)


def test_credentials_and_endpoint_from_an_aws_profile(url, s3_server, tmp_path, monkeypatch):
    remote = RemoteStore.from_url(url)
    entry, files = make_output(tmp_path / "out", {"a.bin": 5000})
    remote.push(entry, files)
    (tmp_path / "credentials").write_text(
        f"[team]\naws_access_key_id = {s3_server.access_key}\naws_secret_access_key = {s3_server.secret_key}\n")
    (tmp_path / "config").write_text(f"[profile team]\nregion = us-east-1\nendpoint_url = {s3_server.endpoint}\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_PROFILE", "team")
    assert RemoteStore.from_url(url).lookup(entry["action_key"]) == entry

    (tmp_path / "credentials").write_text(f"aws_secret_access_key = {s3_server.secret_key}\n")  # no [section]
    with pytest.raises(RemoteError) as caught:
        RemoteStore.from_url(url)
    assert "credentials cannot be parsed" in str(caught.value) and s3_server.secret_key not in str(caught.value)


def test_only_s3_urls():
    for bad in ("cache/", "gs://bucket/x", "s3:///nobucket"):
        with pytest.raises(ValueError):
            RemoteStore.from_url(bad)
