"""The remote cache tier wired into the executor: real doit runs of the tiny recipe against a real
S3 server (SeaweedFS on 127.0.0.1, tests/s3server.py). No mock of S3.

One project (A) builds the tiny recipe once for the module and pushes it; tests that change a
project edit private copies of it (conftest.copy_project). A stage is made stale cheaply by giving
the smoke stage (the last, a few seconds) another ``max_new_tokens``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass, field

import obstore
import pytest
from obstore.store import S3Store

from conftest import TINY, copy_project, new_project
from modelbuild.cache.remote import RemoteStore
from modelbuild.cache.store import Store
from s3server import free_ports, make_bucket, s3_server, start_weed, stop_weed  # noqa: F401 (fixture)
from test_remote import raw_store

ALL = {"tiny-base", "tiny-travel-adapter", "tiny-travel-cpu-int4", TINY}
SMOKE = 'pass = "smoke"\n'


def stamp(project, target) -> dict:
    return json.loads(project.path(f"build/{target}/.modelbuild/stamp.json").read_text())


def manifests(project) -> dict:
    return {name: stamp(project, name)["manifest"] for name in sorted(ALL)}


def said(result, what: str) -> set[str]:
    return set(re.findall(rf"modelbuild: '(\S+)': {what}", result.out))


def ran(result) -> set[str]:
    return set(re.findall(r"modelbuild: '(\S+)' running on", result.out))


def smoke_tokens(project, n: int) -> None:
    """Make the smoke stage stale (a new key) without touching anything upstream."""
    path = project.path("targets/travel.toml")
    text = re.sub(r"\nparams = \{ max_new_tokens = \d+ \}\n", "\n", path.read_text())
    path.write_text(text.replace(SMOKE, f"{SMOKE}params = {{ max_new_tokens = {n} }}\n", 1))


def aws_env(server, endpoint: str | None = None) -> dict:
    """The standard AWS variables for ``server`` (or a dead endpoint); the developer's ~/.aws stays out."""
    return {**server.env(), "AWS_ENDPOINT_URL": endpoint or server.endpoint, "AWS_PROFILE": "",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"}


def dead_endpoint() -> str:
    return f"http://127.0.0.1:{free_ports(1)[0]}"  # nothing listens there


def remote(monkeypatch, server, url: str) -> RemoteStore:
    """A client in the test process, to look at (and tamper with) the bucket."""
    for name, value in aws_env(server).items():
        monkeypatch.setenv(name, value)
    return RemoteStore.from_url(url)


@dataclass
class Team:
    server: object
    url: str
    env: dict
    a: object
    outputs: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def team(s3_server, tmp_path_factory) -> Team:
    """Project A builds the tiny recipe with the remote cache set: every stage runs and is pushed."""
    bucket = f"team-{uuid.uuid4().hex[:8]}"
    make_bucket(s3_server, bucket)
    url = f"s3://{bucket}/modelbuild"
    env = {**aws_env(s3_server), "MODELBUILD_REMOTE_CACHE": url}
    a = new_project(tmp_path_factory.mktemp("team") / "a")
    built = a.doit(TINY, env=env)
    assert ran(built) == ALL and said(built, "pushed to the remote cache") == ALL, built.out[-3000:]
    assert built.executed == ALL and "unreachable" not in built.out
    return Team(s3_server, url, env, a, [built.out])


def fresh_url(team: Team) -> str:
    return f"{team.url}-{uuid.uuid4().hex[:8]}"


def test_a_fresh_clone_with_an_empty_cache_restores_every_stage_from_the_remote(team, tmp_path):
    b = new_project(tmp_path / "b")
    assert not (b.cache / "actions").exists()
    first = b.doit(TINY, env=team.env)
    team.outputs.append(first.out)
    assert "running on" not in first.out, first.out[-3000:]  # no pass ran
    assert said(first, r"restored from the remote cache \(built in [\d.]+ s; [\d.]+ MB downloaded\)") == ALL
    assert manifests(b) == manifests(team.a)  # byte-identical outputs (every file's BLAKE3 digest)
    assert {stamp(b, t)["origin"] for t in ALL} == {"restored from the remote cache"}
    assert "pushed" not in first.out  # nothing ran, nothing to push

    shutil.rmtree(b.path("build"))  # the next restore is local: the remote filled the local tier
    second = b.doit(TINY, env=team.env)
    assert said(second, "restored from cache") == ALL and "remote" not in second.out and "running on" not in second.out
    assert manifests(b) == manifests(team.a)
    assert b.doit(TINY, env=team.env).up_to_date == ALL


def files(project, target) -> dict:
    """What build/<target> holds besides its stamp: path -> SHA-256 of its bytes."""
    out = project.path(f"build/{target}")
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and ".modelbuild" not in p.relative_to(out).parts}


def test_toplevel_download_fetches_what_was_asked_for_and_the_rest_when_needed(team, tmp_path):
    env = {**team.env, "MODELBUILD_DOWNLOAD": "toplevel"}
    bundle, intermediate = "tiny-travel-cpu-int4", ALL - {TINY}
    b = new_project(tmp_path / "b")
    first = b.doit(TINY, env=env)
    team.outputs.append(first.out)
    assert "running on" not in first.out, first.out[-3000:]
    assert said(first, r"on the remote cache \(built in [\d.]+ s\); left there, not downloaded") == intermediate
    assert said(first, "restored from the remote cache") == {TINY}
    assert manifests(b) == manifests(team.a)  # every stamp: the same keys and digests
    assert files(b, TINY) == files(team.a, TINY) and all(files(b, t) == {} for t in intermediate)
    assert {stamp(b, t)["left_on_remote"] for t in intermediate} == {team.url}
    assert b.doit(TINY, env=env).up_to_date == ALL  # the no-op holds with outputs left remote
    why = b.modelbuild("why", "tiny-base", env=env)
    assert f"files left on {team.url}: `doit tiny-base` downloads them" in why.out, why.out

    asked = b.doit(bundle, env=env)  # asked for by name: downloaded, nothing runs
    assert said(asked, r"downloaded from the remote cache \([\d.]+ MB\)") == {bundle}
    assert "running on" not in asked.out and files(b, bundle) == files(team.a, bundle)
    assert stamp(b, bundle)["origin"] == "downloaded from the remote cache" and files(b, "tiny-base") == {}

    # a stage that runs here first downloads the inputs it needs from the remote
    b.edit("targets/travel.toml", 'vars = { model = "tiny", ', 'vars = { model = "tiny", int4_algorithm = "rtn", ')
    rebuilt = b.doit("-n", "2", TINY, env=env)  # two stage threads: downloads beside key checks
    assert ran(rebuilt) == {bundle, TINY}, rebuilt.out[-3000:]
    assert said(rebuilt, "downloaded from the remote cache") == {"tiny-base", "tiny-travel-adapter"}
    for target in ("tiny-base", "tiny-travel-adapter"):
        assert files(b, target) == files(team.a, target) and "left_on_remote" not in stamp(b, target)


def test_an_output_left_on_a_remote_that_lost_or_spoiled_it_is_brought_back_in_the_same_run(team, tmp_path,
                                                                                       monkeypatch):
    """A left output a local stage needs, which the remote cannot give back: deleted objects, a
    flipped bit, the remote turned off. The run brings it up to date itself and goes on."""
    url = fresh_url(team)
    client = seed(url, team.a, monkeypatch, team.server)
    env = {**team.env, "MODELBUILD_REMOTE_CACHE": url, "MODELBUILD_DOWNLOAD": "toplevel"}
    base = [RemoteStore.object_key(i["digest"]) for i in stamp(team.a, "tiny-base")["manifest"].values()]

    def lose_the_base():
        for key in base:
            obstore.delete(raw_store(url), key)

    def spoil_the_base():
        for key in base:
            data = bytearray(obstore.get(raw_store(url), key).bytes())
            data[len(data) // 2] ^= 0x20
            obstore.put(raw_store(url), key, bytes(data))

    steps = 30
    for damage in (lose_the_base, spoil_the_base, None):
        d = new_project(tmp_path / f"d-{steps}")
        d.doit("tiny-travel-adapter", env=env)
        assert files(d, "tiny-base") == {} and files(d, "tiny-travel-adapter") == files(team.a, "tiny-travel-adapter")
        if damage:
            damage()
        steps -= 1  # the adapter must run here now, and needs the base's files
        d.edit("targets/travel.toml", 'vars = { model = "tiny", steps = 30,', f'vars = {{ model = "tiny", steps = {steps},')
        run_env = env if damage else {**env, "MODELBUILD_REMOTE_CACHE": "off"}
        result = d.doit("tiny-travel-adapter", env=run_env)
        team.outputs.append(result.out)
        assert ("'tiny-travel-adapter': input base (:tiny-base) cannot be had from the remote cache; bringing "
                "'tiny-base' up to date here") in result.out, result.out[-3000:]
        assert ran(result) == {"tiny-base", "tiny-travel-adapter"}  # one run: the base rebuilt, then the adapter
        assert files(d, "tiny-base") == files(team.a, "tiny-base")  # byte-identical
        assert client.verify() == []  # what was lost or spoiled was pushed back
        assert result.out.count("never served") <= 1  # found bad once, not fetched again

    e = new_project(tmp_path / "e")
    e.doit("tiny-travel-adapter", env=env)
    lose_the_base()
    asked = e.doit("tiny-base", env=env)  # asked for by name: the download fails, so it is rebuilt
    assert ran(asked) == {"tiny-base"} and files(e, "tiny-base") == files(team.a, "tiny-base")


def test_server_down_warns_once_and_builds_locally_or_stops_when_required(team, tmp_path):
    c = copy_project(team.a, tmp_path / "c")
    smoke_tokens(c, 40)
    endpoint = dead_endpoint()
    down = c.doit(TINY, env={**team.env, "AWS_ENDPOINT_URL": endpoint})
    team.outputs.append(down.out)
    warnings = [line for line in down.out.splitlines() if "unreachable" in line]
    assert warnings == [line for line in warnings if line.startswith(f"modelbuild: remote cache {team.url} unreachable: ")
                        and line.endswith("; building with the local cache only")], down.out[-3000:]
    assert len(warnings) == 1 and endpoint.split("//")[1] not in down.out  # one line; the endpoint is not echoed
    assert "unreachable: no connection to the S3 endpoint" in warnings[0]
    assert ran(down) == {TINY} and stamp(c, TINY)["origin"] == "built"
    assert (c.cache / "remote-pending" / stamp(c, TINY)["action_key"]).exists()  # the next run pushes it

    smoke_tokens(c, 36)
    c.path("targets/zz-cache.toml").write_text(f'[cache]\nremote = "{team.url}"\nrequired = true\n')
    before = stamp(c, TINY)
    env = {**team.env, "AWS_ENDPOINT_URL": endpoint, "MODELBUILD_REMOTE_CACHE": ""}  # the table's remote
    required = c.doit(TINY, env=env, check=False)
    lines = [line for line in required.out.splitlines() if line.strip()]
    assert required.returncode == 2 and len(lines) == 1, required.out[-3000:]
    assert lines[0].startswith(f"modelbuild: remote cache {team.url} unreachable: ")
    assert lines[0].endswith("; it is required (targets/zz-cache.toml: cache.required = true)")
    assert stamp(c, TINY) == before  # nothing built

    c.path("targets/zz-cache.toml").write_text('[cache]\nremote = "s3://AKIAX:s3cr3t@bucket/x"\n')
    bad = c.doit(TINY, check=False)
    assert bad.returncode == 2 and "targets/zz-cache.toml: cache.remote: the URL names credentials" in bad.out
    assert "s3cr3t" not in bad.out


def seed(url: str, source, monkeypatch, server) -> RemoteStore:
    """Push every action of a project's local cache to ``url`` (as project A's runs did)."""
    client = remote(monkeypatch, server, url)
    store = Store(source.cache)
    for _, entry in store.entries():
        client.push(entry, {i["digest"]: store.object_path(i["digest"]) for i in entry["manifest"].values()})
    return client


def test_a_corrupt_remote_object_is_reported_never_served_rebuilt_and_repaired(team, tmp_path, monkeypatch):
    url = fresh_url(team)
    client = seed(url, team.a, monkeypatch, team.server)
    answers = stamp(team.a, TINY)["manifest"]["answers.json"]["digest"]
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    raw = S3Store(bucket, prefix=prefix, client_options={"allow_http": True})
    data = bytearray(obstore.get(raw, RemoteStore.object_key(answers)).bytes())
    data[len(data) // 2] ^= 0x20  # one flipped bit, same size
    obstore.put(raw, RemoteStore.object_key(answers), bytes(data))

    d = new_project(tmp_path / "d")
    result = d.doit(TINY, env={**team.env, "MODELBUILD_REMOTE_CACHE": url})
    team.outputs.append(result.out)
    assert said(result, "restored from the remote cache") == ALL - {TINY}
    assert f"'{TINY}': remote cache {url}: 1 bad object(s): answers.json (object {answers}) corrupt" in result.out
    assert ran(result) == {TINY}  # rebuilt, never served
    assert manifests(d) == manifests(team.a)  # byte-identical rebuild
    assert said(result, "pushed to the remote cache") == {TINY}
    assert client.verify() == []  # the push replaced the bad object: the remote is repaired
    assert client.lookup(stamp(d, TINY)["action_key"])["manifest"] == stamp(team.a, TINY)["manifest"]


def test_push_false_is_a_read_only_consumer(team, tmp_path, monkeypatch):
    url = fresh_url(team)
    e = copy_project(team.a, tmp_path / "e")
    smoke_tokens(e, 44)
    e.path("targets/zz-cache.toml").write_text(f'[cache]\nremote = "{url}"\npush = false\n')
    result = e.doit(TINY, env={**team.env, "MODELBUILD_REMOTE_CACHE": ""})
    team.outputs.append(result.out)
    assert ran(result) == {TINY} and "pushed" not in result.out
    info = remote(monkeypatch, team.server, url).info()
    assert (info["objects"], info["actions"]) == (0, 0)
    listing = e.modelbuild("cache", "info", env={**team.env, "MODELBUILD_REMOTE_CACHE": ""})
    assert listing.returncode == 0 and f"remote {url} (read-only): 0 actions, 0 objects" in listing.out


def test_server_killed_during_a_build_the_push_fails_and_the_next_run_pushes(team, tmp_path, monkeypatch):
    server = start_weed(tmp_path / "weed")
    try:
        make_bucket(server, "killed")
        url = "s3://killed/cache"
        f = copy_project(team.a, tmp_path / "f")
        smoke_tokens(f, 48)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **f.env(), **aws_env(server), "MODELBUILD_REMOTE_CACHE": url}
        proc = subprocess.Popen([sys.executable, "-m", "doit", TINY], cwd=f.root, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out = []
        for line in proc.stdout:
            out.append(line)
            if f"'{TINY}' running on" in line:
                stop_weed(server)  # SIGKILL while the stage runs: its push meets a dead server
        proc.wait(timeout=300)
        out = "".join(out)
        team.outputs.append(out)
        assert proc.returncode == 0, out[-3000:]  # built locally all the same
        assert f"modelbuild: '{TINY}': push to the remote cache {url} failed: " in out
        assert "the stage is built and in the local cache, the next run pushes it" in out
        key = stamp(f, TINY)["action_key"]

        server = start_weed(tmp_path / "weed")  # same data folder; fresh ports and credentials
        client = remote(monkeypatch, server, url)
        assert client.lookup(key) is None  # no entry visible
        again = f.doit(TINY, env={**aws_env(server), "MODELBUILD_REMOTE_CACHE": url})
        team.outputs.append(again.out)
        assert again.up_to_date == ALL and said(again, "pushed to the remote cache") == {TINY}
        assert client.lookup(key)["manifest"] == stamp(f, TINY)["manifest"]
        assert client.verify() == [] and not any((f.cache / "remote-pending").iterdir())
    finally:
        stop_weed(server)


def test_two_machines_building_the_same_stages_at_once_leave_one_consistent_remote(team, tmp_path, monkeypatch):
    """Two clones with empty caches run the same build at the same moment against one remote: both
    miss, both run, both push the same actions. Neither fails, both hold byte-identical outputs,
    the remote verifies, and a third clone restores everything from it without running a pass."""
    url = fresh_url(team)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **team.env, "MODELBUILD_REMOTE_CACHE": url,
           "MODELBUILD_CPU_THREADS": "1"}  # one thread each: the two builds share two cores
    wanted = ["tiny-base", "tiny-travel-adapter"]
    clones = [new_project(tmp_path / name) for name in ("b", "c")]
    procs = [subprocess.Popen([sys.executable, "-m", "doit", *wanted], cwd=clone.root, env={**env, **clone.env()},
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for clone in clones]
    outs = [proc.communicate(timeout=900)[0] for proc in procs]
    team.outputs.extend(outs)
    for proc, out in zip(procs, outs):
        assert proc.returncode == 0, out[-3000:]
        assert "failed" not in out and "corrupt" not in out, out[-3000:]
    pushed = [set(re.findall(r"modelbuild: '(\S+)': pushed to the remote cache", out)) for out in outs]
    assert pushed[0] | pushed[1] == set(wanted), outs
    for target in wanted:
        assert stamp(clones[0], target)["manifest"] == stamp(clones[1], target)["manifest"], target
        assert stamp(clones[0], target)["action_key"] == stamp(clones[1], target)["action_key"]
    client = remote(monkeypatch, team.server, url)
    assert client.verify() == []
    for target in wanted:
        assert client.lookup(stamp(clones[0], target)["action_key"])["manifest"] == stamp(clones[0], target)["manifest"]
    d = new_project(tmp_path / "d")
    restored = d.doit(*wanted, env={**team.env, "MODELBUILD_REMOTE_CACHE": url})
    assert "running on" not in restored.out and said(restored, "restored from the remote cache") == set(wanted)
    assert all(stamp(d, t)["manifest"] == stamp(clones[0], t)["manifest"] for t in wanted)


def test_release_published_to_the_remote_is_verified_from_there(team, tmp_path, monkeypatch):
    url = fresh_url(team)
    g = copy_project(team.a, tmp_path / "g")
    env = {**team.env, "MODELBUILD_REMOTE_CACHE": url}
    published = g.modelbuild("release", "tiny-base", "--to", url, env=env)
    team.outputs.append(published.out)
    assert published.returncode == 0, published.out[-3000:]
    lock_url = f"{url}/releases/tiny-base/tiny-base.lock.json"
    assert f"published: {lock_url}" in published.out
    client = remote(monkeypatch, team.server, url)
    assert client.lookup(stamp(g, "tiny-base")["action_key"]) is not None  # the release restores anywhere

    h = new_project(tmp_path / "h")  # anywhere: a checkout with an empty cache
    checked = h.modelbuild("verify", lock_url, env=env)
    team.outputs.append(checked.out)
    assert checked.returncode == 0 and "VERIFIED: byte-identical rebuild" in checked.out, checked.out[-3000:]
    assert "restored from the remote cache" not in checked.out  # verify rebuilds, caches bypassed
    missing = h.modelbuild("verify", f"{url}/releases/nope/nope.lock.json", env=env)
    assert missing.returncode == 2 and missing.out.strip().count("\n") == 0 and "no such lock manifest" in missing.out

    verified = g.modelbuild("cache", "verify", "--remote", env=env)
    assert verified.returncode == 0 and "verified: every object matches its digest" in verified.out
    info = g.modelbuild("cache", "info", env=env)
    assert info.out.startswith("local  ") and f"remote {url} (push): 1 actions" in info.out


def test_credentials_and_endpoint_never_land_in_files_or_output(team):
    secrets = [team.server.secret_key, team.server.access_key, team.server.endpoint.split("//")[1]]
    for text in team.outputs:
        assert not any(s in text for s in secrets)
    for folder in (team.a.root, team.a.cache):
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                assert not any(s.encode() in data for s in secrets), path
