"""The core lane's remote tier: real doit runs of toy passes (tests/core_project.py) against a
real S3 server (SeaweedFS on 127.0.0.1, tests/s3server.py). No mock of S3, no torch.

Project A builds the toy chain once for the module and pushes every stage to the team prefix;
each test reads that prefix from a project with an empty local cache, or seeds a prefix of its
own when it damages the remote.
"""

from __future__ import annotations

import re
import shutil
import uuid
from dataclasses import dataclass

import obstore
import pytest
from obstore.store import S3Store

from core_project import CHAIN, new_core_project, said
from s3server import free_ports, make_bucket, s3_server  # noqa: F401 (fixture)

pytestmark = pytest.mark.core


def aws_env(server, endpoint: str | None = None) -> dict:
    """The standard AWS variables for ``server`` (or a dead endpoint); the developer's ~/.aws stays out."""
    return {**server.env(), "AWS_ENDPOINT_URL": endpoint or server.endpoint, "AWS_PROFILE": "",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"}


def ran(result) -> set[str]:
    return set(re.findall(r"modelbuild: '(\S+)' running on", result.out))


@dataclass
class Team:
    server: object
    url: str
    env: dict
    a: object


@pytest.fixture(scope="module")
def team(s3_server, tmp_path_factory) -> Team:
    bucket = f"core-{uuid.uuid4().hex[:8]}"
    make_bucket(s3_server, bucket)
    url = f"s3://{bucket}/modelbuild"
    env = {**aws_env(s3_server), "MODELBUILD_REMOTE_CACHE": url}
    a = new_core_project(tmp_path_factory.mktemp("team") / "a")
    built = a.doit("shout", env=env)
    assert ran(built) == CHAIN and said(built, "pushed to the remote cache") == CHAIN, built.out[-3000:]
    assert a.runs() == ["words", "upper", "shout"] and "unreachable" not in built.out
    return Team(s3_server, url, env, a)


def client(team: Team, url: str, monkeypatch):
    """A RemoteStore in the test process, to seed, look at and check a prefix."""
    from modelbuild.cache.remote import RemoteStore

    for name, value in aws_env(team.server).items():
        monkeypatch.setenv(name, value)
    return RemoteStore.from_url(url)


def seed(team: Team, monkeypatch) -> tuple[str, object]:
    """A fresh prefix holding every action of project A's local cache (as A's push left them)."""
    from modelbuild.cache.store import Store

    url = f"{team.url}-{uuid.uuid4().hex[:8]}"
    remote = client(team, url, monkeypatch)
    store = Store(team.a.cache)
    for _, entry in store.entries():
        remote.push(entry, {i["digest"]: store.object_path(i["digest"]) for i in entry["manifest"].values()})
    return url, remote


def test_an_empty_local_cache_restores_every_stage_from_the_remote_without_running_a_pass(team, tmp_path):
    b = new_core_project(tmp_path / "b")
    first = b.doit("shout", env=team.env)
    assert "running on" not in first.out and b.runs() == [], first.out[-3000:]
    assert said(first, r"restored from the remote cache \(built in [\d.]+ s; [\d.]+ MB downloaded\)") == CHAIN
    assert b.manifests(CHAIN) == team.a.manifests(CHAIN)
    assert all(b.files(t) == team.a.files(t) for t in CHAIN)  # byte-identical
    assert {b.stamp(t)["origin"] for t in CHAIN} == {"restored from the remote cache"}
    assert "pushed" not in first.out  # nothing ran, nothing to push

    shutil.rmtree(b.path("build"))  # the next restore is local: the remote filled the local tier
    second = b.doit("shout", env=team.env)
    assert said(second, "restored from cache") == CHAIN and "remote" not in second.out and b.runs() == []
    assert b.doit("shout", env=team.env).up_to_date == CHAIN


def test_a_corrupt_remote_object_is_refused_the_stage_rebuilt_and_the_remote_repaired(team, tmp_path, monkeypatch):
    url, remote = seed(team, monkeypatch)
    from modelbuild.cache.remote import RemoteStore

    digest = team.a.stamp("shout")["manifest"]["counts.json"]["digest"]
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    raw = S3Store(bucket, prefix=prefix, client_options={"allow_http": True})
    data = bytearray(obstore.get(raw, RemoteStore.object_key(digest)).bytes())
    data[len(data) // 2] ^= 0x20  # one flipped bit, same size
    obstore.put(raw, RemoteStore.object_key(digest), bytes(data))
    assert remote.verify() != []

    d = new_core_project(tmp_path / "d")
    result = d.doit("shout", env={**team.env, "MODELBUILD_REMOTE_CACHE": url})
    assert said(result, "restored from the remote cache") == {"words", "upper"}
    assert f"'shout': remote cache {url}: 1 bad object(s): counts.json (object {digest}) corrupt" in result.out
    assert ran(result) == {"shout"} and d.runs() == ["shout"]  # rebuilt, never served
    assert d.files("shout") == team.a.files("shout") and d.manifests(CHAIN) == team.a.manifests(CHAIN)
    assert said(result, "pushed to the remote cache") == {"shout"}
    assert remote.verify() == []  # the push replaced the bad object
    assert remote.lookup(d.stamp("shout")["action_key"])["manifest"] == team.a.stamp("shout")["manifest"]


def test_toplevel_download_leaves_intermediates_on_the_remote_until_needed(team, tmp_path):
    env = {**team.env, "MODELBUILD_DOWNLOAD": "toplevel"}
    intermediate = {"words", "upper"}
    b = new_core_project(tmp_path / "b")
    first = b.doit("shout", env=env)
    assert "running on" not in first.out and b.runs() == [], first.out[-3000:]
    assert said(first, r"on the remote cache \(built in [\d.]+ s\); left there, not downloaded") == intermediate
    assert said(first, "restored from the remote cache") == {"shout"}
    assert b.manifests(CHAIN) == team.a.manifests(CHAIN)  # every stamp: the same keys and digests
    assert b.files("shout") == team.a.files("shout") and all(b.files(t) == {} for t in intermediate)
    assert {b.stamp(t)["left_on_remote"] for t in intermediate} == {team.url}
    assert b.doit("shout", env=env).up_to_date == CHAIN  # the no-op holds with outputs left remote
    why = b.modelbuild("why", "words", env=env)
    assert f"files left on {team.url}: `doit words` downloads them" in why.out, why.out

    asked = b.doit("upper", env=env)  # asked for by name: downloaded, nothing runs
    assert said(asked, r"downloaded from the remote cache \([\d.]+ MB\)") == {"upper"} and b.runs() == []
    assert b.files("upper") == team.a.files("upper") and b.files("words") == {}
    assert b.stamp("upper")["origin"] == "downloaded from the remote cache"

    # A stage that runs here first downloads the inputs it needs, and only those.
    b.edit("targets/toy.toml", 'inputs = { source = ":words" }\n', 'inputs = { source = ":words" }\nparams = { suffix = "~" }\n')
    rebuilt = b.doit("shout", env=env)
    assert ran(rebuilt) == {"upper", "shout"} and b.runs() == ["upper", "shout"], rebuilt.out[-3000:]
    assert said(rebuilt, "downloaded from the remote cache") == {"words"}
    assert b.files("words") == team.a.files("words") and "left_on_remote" not in b.stamp("words")


def test_an_unreachable_remote_warns_once_and_builds_locally(team, tmp_path):
    c = new_core_project(tmp_path / "c")
    endpoint = f"http://127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    down = c.doit("shout", env={**aws_env(team.server, endpoint), "MODELBUILD_REMOTE_CACHE": team.url})
    warnings = [line for line in down.out.splitlines() if "unreachable" in line]
    assert len(warnings) == 1, down.out[-3000:]
    assert warnings[0].startswith(f"modelbuild: remote cache {team.url} unreachable: ")
    assert warnings[0].endswith("; building with the local cache only")
    assert endpoint.split("//")[1] not in down.out  # the endpoint is not echoed
    assert ran(down) == CHAIN and c.manifests(CHAIN) == team.a.manifests(CHAIN)
    assert (c.cache / "remote-pending" / c.stamp("shout")["action_key"]).exists()  # the next run pushes it
