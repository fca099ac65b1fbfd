"""Signed cache entries and trusted keys (issue #24, items 1-3): real doit runs of the toy passes
(tests/core_project.py) against a real SeaweedFS (tests/s3server.py), real ECDSA keys. No mock.

An honest builder A and a hostile builder E share one bucket prefix. A builds the toy chain with
its key; E builds its own chain (other words, so other keys) with its key, and then poisons A's
actions: under A's ``shout`` key an entry with other bytes, every digest recomputed and signed
by E; under A's ``words`` key the same kind of forgery, unsigned. Readers push nothing, so every
test sees the bucket as E left it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import obstore
import pytest
from obstore.store import S3Store

from core_project import CHAIN, WORDS, new_core_project, said
from s3server import make_bucket, s3_server  # noqa: F401 (fixture)

pytestmark = pytest.mark.core

WORDS_E = "a hostile builder builds other words\nother words\n"


def aws_env(server) -> dict:
    return {**server.env(), "AWS_ENDPOINT_URL": server.endpoint, "AWS_PROFILE": "",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"}


def ran(result) -> set[str]:
    return set(re.findall(r"modelbuild: '(\S+)' running on", result.out))


@dataclass
class Key:
    dir: Path
    id: str

    @property
    def private(self) -> Path:
        return self.dir / "modelbuild.key"

    @property
    def public(self) -> Path:
        return self.dir / "modelbuild.pub"

    def secret_fragments(self) -> list[bytes]:
        """What must never leak: each line of the PEM body, and the DER bytes it encodes."""
        lines = [line for line in self.private.read_bytes().splitlines() if line and not line.startswith(b"-----")]
        return [*lines, base64.b64decode(b"".join(lines))]


@dataclass
class World:
    server: object
    url: str
    env: dict  # a reader's: the bucket, no signing key, no push
    a: object
    e: object
    key_a: Key
    key_e: Key
    outputs: list  # every doit/modelbuild output of the module, for the hygiene test
    projects: list


def generate_key(folder: Path) -> Key:
    result = subprocess.run([sys.executable, "-m", "modelbuild", "keys", "generate", str(folder)],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
    assert result.returncode == 0, result.stderr
    return Key(folder, result.stdout.strip())


def raw_store(server, url: str) -> S3Store:
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    env = aws_env(server)
    return S3Store(bucket, prefix=prefix or None, endpoint=env["AWS_ENDPOINT_URL"], access_key_id=env["AWS_ACCESS_KEY_ID"],
                   secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region="us-east-1", client_options={"allow_http": True})


def remote_client(server, url: str, monkeypatch_env: dict):
    from modelbuild.cache.remote import RemoteStore

    saved = {k: os.environ.get(k) for k in monkeypatch_env}
    os.environ.update(monkeypatch_env)
    try:
        return RemoteStore.from_url(url)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def forge(remote, entry: dict, folder: Path, signer) -> dict:
    """A self-consistent entry under ``entry``'s action key whose files hold other bytes: every
    digest recomputed, the objects uploaded, then the entry (signed by ``signer``, or not)."""
    from modelbuild.core.digest import hash_file, hash_json

    folder.mkdir(parents=True)
    manifest, files = {}, {}
    for rel in entry["manifest"]:
        path = folder / rel.replace("/", "_")
        path.write_bytes(b'{"poisoned": "by E"}\n')
        digest = hash_file(path)
        manifest[rel], files[digest] = {"digest": digest, "size": path.stat().st_size}, path
    forged = {**{k: v for k, v in entry.items() if k != "signature"}, "manifest": manifest,
              "manifest_digest": hash_json(manifest), "seconds": 0.001}
    remote.push(forged, files, signer=signer)
    return forged


@pytest.fixture(scope="module")
def world(s3_server, tmp_path_factory) -> World:
    from modelbuild.core.signing import load_signer

    base = tmp_path_factory.mktemp("trust")
    key_a, key_e = generate_key(base / "keys-a"), generate_key(base / "keys-e")
    bucket = f"trust-{uuid.uuid4().hex[:8]}"
    make_bucket(s3_server, bucket)
    url = f"s3://{bucket}/modelbuild"
    env = {**aws_env(s3_server), "MODELBUILD_REMOTE_CACHE": url}
    outputs = []
    a = new_core_project(base / "a")
    built = a.doit("shout", env={**env, "MODELBUILD_SIGNING_KEY": str(key_a.private)})
    outputs.append(built.out)
    assert ran(built) == CHAIN and said(built, "pushed to the remote cache") == CHAIN, built.out[-3000:]
    e = new_core_project(base / "e", words=WORDS_E)
    built = e.doit("shout", env={**env, "MODELBUILD_SIGNING_KEY": str(key_e.private)})
    outputs.append(built.out)
    assert ran(built) == CHAIN and said(built, "pushed to the remote cache") == CHAIN, built.out[-3000:]
    assert {e.stamp(t)["action_key"] for t in CHAIN}.isdisjoint({a.stamp(t)["action_key"] for t in CHAIN})

    remote = remote_client(s3_server, url, aws_env(s3_server))
    signer_e = load_signer(key_e.private, "test")
    forge(remote, a.stamp("shout"), base / "forged-shout", signer_e)  # signed by E, under A's key
    forge(remote, a.stamp("words"), base / "forged-words", None)  # unsigned, under A's key
    reader_env = {**env, "MODELBUILD_REMOTE_PUSH": "0"}
    return World(s3_server, url, reader_env, a, e, key_a, key_e, outputs, [a, e])


def reader(world: World, root: Path, words: str = WORDS):
    project = new_core_project(root, words=words)
    world.projects.append(project)
    return project


def build(world: World, project, *args: str, trusted: list[Key] | None = None, check=True, **extra):
    env = {**world.env, **extra}
    if trusted is not None:
        env["MODELBUILD_TRUSTED_KEYS"] = ",".join(str(k.public) for k in trusted)
    result = project.doit(*(args or ("shout",)), env=env, check=check)
    world.outputs.append(result.out)
    return result


def test_the_attack_is_real_without_trusted_keys(world, tmp_path):
    """The control: without trusted keys, E's self-consistent forgery is served (today's behaviour)."""
    b = reader(world, tmp_path / "b")
    result = build(world, b)
    # E's unsigned forgery of words is served, and what follows is built on it
    assert said(result, "restored from the remote cache") == {"words"}, result.out[-3000:]
    assert b"poisoned" in b.files("words")["counts.json"] and b.runs() == ["upper", "shout"]
    assert b.files("shout") != world.a.files("shout")
    info = b.modelbuild("cache", "info", env=world.env)
    world.outputs.append(info.out)
    assert "trust  remote entries are not signature-checked (set MODELBUILD_TRUSTED_KEYS or [cache] trusted_keys)" \
        in info.out, info.out


def test_a_reader_trusting_only_a_never_restores_e_entries_and_rebuilds_byte_identical_to_a(world, tmp_path):
    b = reader(world, tmp_path / "b")
    result = build(world, b, trusted=[world.key_a])
    assert f"modelbuild: 'shout': remote cache {world.url}: untrusted signer {world.key_e.id}: rebuilding" \
        in result.out, result.out[-3000:]
    assert f"modelbuild: 'words': remote cache {world.url}: unsigned entry: rebuilding" in result.out
    assert said(result, "restored from the remote cache") == {"upper"}  # A's own entry, signed by A
    assert b.runs() == ["words", "shout"] and ran(result) == {"words", "shout"}
    assert all(b.files(t) == world.a.files(t) for t in CHAIN) and b.manifests(CHAIN) == world.a.manifests(CHAIN)
    assert "signature" not in b.stamp("upper")  # the stamp and the local tier keep the entry alone

    c = reader(world, tmp_path / "c", words=WORDS_E)  # E's honest chain: not trusted here either
    result = build(world, c, trusted=[world.key_a])
    assert said(result, f"remote cache {re.escape(world.url)}: untrusted signer {world.key_e.id}: rebuilding") == CHAIN
    assert c.runs() == ["words", "upper", "shout"] and all(c.files(t) == world.e.files(t) for t in CHAIN)


def test_a_reader_trusting_a_and_e_restores_e_entries_and_revoking_e_stops_that_at_once(world, tmp_path):
    b = reader(world, tmp_path / "b", words=WORDS_E)
    result = build(world, b, trusted=[world.key_a, world.key_e])
    assert said(result, "restored from the remote cache") == CHAIN and b.runs() == [], result.out[-3000:]
    assert all(b.files(t) == world.e.files(t) for t in CHAIN)
    info = b.modelbuild("cache", "info", env={**world.env, "MODELBUILD_TRUSTED_KEYS": f"{world.key_a.public},{world.key_e.public}"})
    world.outputs.append(info.out)
    assert f"served only when signed by {', '.join(sorted([world.key_a.id, world.key_e.id]))}" in info.out, info.out

    # A's chain with both keys trusted: the unsigned forgery is still refused, and E's signed one
    # is served: a signature says who pushed an entry, not that it was built honestly.
    c = reader(world, tmp_path / "c")
    result = build(world, c, trusted=[world.key_a, world.key_e])
    assert f"'words': remote cache {world.url}: unsigned entry: rebuilding" in result.out, result.out[-3000:]
    assert said(result, "restored from the remote cache") == {"upper", "shout"} and c.runs() == ["words"]

    # Revoked: the same E chain, E's key taken off the list (a TOML list this time).
    d = reader(world, tmp_path / "d", words=WORDS_E)
    d.append("targets/toy.toml", f'\n[cache]\ntrusted_keys = ["{world.key_a.public}"]\n')
    result = build(world, d)
    assert said(result, f"remote cache {re.escape(world.url)}: untrusted signer {world.key_e.id}: rebuilding") == CHAIN
    assert d.runs() == ["words", "upper", "shout"] and "restored from the remote" not in result.out


def test_an_entry_signed_by_a_whose_manifest_was_edited_afterwards_is_refused(world, tmp_path):
    from modelbuild.core.digest import hash_json

    url = f"{world.url}-{uuid.uuid4().hex[:8]}"
    a2 = reader(world, tmp_path / "a2")
    built = build(world, a2, MODELBUILD_REMOTE_CACHE=url, MODELBUILD_REMOTE_PUSH="1",
                  MODELBUILD_SIGNING_KEY=str(world.key_a.private))
    assert said(built, "pushed to the remote cache") == CHAIN
    raw = raw_store(world.server, url)
    key = a2.stamp("upper")["action_key"]
    entry = json.loads(bytes(obstore.get(raw, f"actions/{key}.json").bytes()))
    assert entry["signature"]["signer"] == world.key_a.id
    # the edit keeps the entry self-consistent: it names shout's object (also on the remote)
    entry["manifest"]["counts.json"] = a2.stamp("shout")["manifest"]["counts.json"]
    entry["manifest_digest"] = hash_json(entry["manifest"])
    obstore.put(raw, f"actions/{key}.json", json.dumps(entry).encode())

    b = reader(world, tmp_path / "b")
    result = build(world, b, trusted=[world.key_a], MODELBUILD_REMOTE_CACHE=url)
    assert f"'upper': remote cache {url}: bad signature (signer {world.key_a.id}): rebuilding" in result.out, \
        result.out[-3000:]
    assert said(result, "restored from the remote cache") == {"words", "shout"} and b.runs() == ["upper"]
    assert all(b.files(t) == world.a.files(t) for t in CHAIN)

    verify = b.modelbuild("cache", "verify", "--remote", env={**world.env, "MODELBUILD_REMOTE_CACHE": url,
                                                              "MODELBUILD_TRUSTED_KEYS": str(world.key_a.public)})
    world.outputs.append(verify.out)
    assert verify.returncode == 1
    assert verify.out.strip().splitlines() == [f"action actions/{key}.json not served here: bad signature "
                                               f"(signer {world.key_a.id})"], verify.out


def test_cache_verify_remote_reports_unsigned_and_untrusted_entries_when_keys_are_trusted(world, tmp_path):
    b = reader(world, tmp_path / "b")
    plain = b.modelbuild("cache", "verify", "--remote", env=world.env)
    world.outputs.append(plain.out)
    assert plain.returncode == 0 and "verified: every object matches its digest" in plain.out, plain.out
    checked = b.modelbuild("cache", "verify", "--remote",
                           env={**world.env, "MODELBUILD_TRUSTED_KEYS": str(world.key_a.public)})
    world.outputs.append(checked.out)
    lines = checked.out.strip().splitlines()
    assert checked.returncode == 1, checked.out
    words, shout = world.a.stamp("words")["action_key"], world.a.stamp("shout")["action_key"]
    assert f"action actions/{words}.json not served here: unsigned entry" in lines
    assert f"action actions/{shout}.json not served here: untrusted signer {world.key_e.id}" in lines
    e_keys = {world.e.stamp(t)["action_key"] for t in CHAIN}
    assert {f"action actions/{k}.json not served here: untrusted signer {world.key_e.id}" for k in e_keys} <= set(lines)
    assert len(lines) == 5  # A's upper is the one entry signed by a trusted key
    assert "dropped" not in checked.out  # another reader may trust E: reported, never deleted


def test_minimal_download_leaves_only_trusted_entries_on_the_remote(world, tmp_path):
    b = reader(world, tmp_path / "b")
    result = build(world, b, trusted=[world.key_a], MODELBUILD_DOWNLOAD="toplevel")
    assert said(result, r"on the remote cache \(built in [\d.]+ s\); left there, not downloaded") == {"upper"}, \
        result.out[-3000:]
    assert f"'words': remote cache {world.url}: unsigned entry: rebuilding" in result.out
    assert f"'shout': remote cache {world.url}: untrusted signer {world.key_e.id}: rebuilding" in result.out
    assert b.runs() == ["words", "shout"] and b.files("shout") == world.a.files("shout")

    c = reader(world, tmp_path / "c", words=WORDS_E)  # E's chain: nothing of it counts as on the remote
    result = build(world, c, trusted=[world.key_a], MODELBUILD_DOWNLOAD="toplevel")
    assert "left there" not in result.out and c.runs() == ["words", "upper", "shout"], result.out[-3000:]
    assert not any(c.stamp(t).get("left_on_remote") for t in CHAIN)


def test_plan_predicts_a_rebuild_where_the_remote_entry_is_not_trusted(world, tmp_path):
    b = reader(world, tmp_path / "b", words=WORDS_E)

    def actions(env):
        result = b.modelbuild("plan", "--json", "shout", env=env)
        world.outputs.append(result.out)
        assert result.returncode == 0, result.out
        return {s["name"]: s["action"] for s in json.loads(result.out[result.out.index("{"):])["stages"]}

    assert actions(world.env)["words"] == "restore remotely"  # unchecked: E's entry would be served
    trusting_a = actions({**world.env, "MODELBUILD_TRUSTED_KEYS": str(world.key_a.public)})
    assert trusting_a["words"] == "run", trusting_a
    trusting_e = actions({**world.env, "MODELBUILD_TRUSTED_KEYS": str(world.key_e.public)})
    assert trusting_e["words"] == "restore remotely", trusting_e
    assert b.runs() == [] and not b.path("build/words").exists()  # plan built nothing


def test_release_to_pushes_its_stages_signed_by_the_builder_key(world, tmp_path):
    url = f"{world.url}-release-{uuid.uuid4().hex[:8]}"
    b = reader(world, tmp_path / "b")
    build(world, b, trusted=[world.key_a])  # words and shout rebuilt here, upper restored
    result = b.modelbuild("release", "shout", "--to", url,
                          env={**world.env, "MODELBUILD_SIGNING_KEY": str(world.key_a.private)})
    world.outputs.append(result.out)
    assert result.returncode == 0 and "published:" in result.out, result.out[-3000:]
    assert b.path("release/shout/shout.sig").is_file()  # signed with A's key: the hygiene test reads it too
    raw = raw_store(world.server, url)
    for target in CHAIN:
        entry = json.loads(bytes(obstore.get(raw, f"actions/{b.stamp(target)['action_key']}.json").bytes()))
        assert entry["signature"]["signer"] == world.key_a.id, target
    c = reader(world, tmp_path / "c")  # the release's stages restore where only A is trusted
    restored = build(world, c, trusted=[world.key_a], MODELBUILD_REMOTE_CACHE=url)
    assert said(restored, "restored from the remote cache") == CHAIN and c.runs() == [], restored.out[-3000:]


def test_keys_generate_writes_a_private_key_0600_never_overwritten_and_prints_its_id(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = generate_key(tmp_path / "k")
    assert re.fullmatch(r"[0-9a-f]{16}", key.id)
    assert (key.private.stat().st_mode & 0o777) == 0o600
    private = serialization.load_pem_private_key(key.private.read_bytes(), password=None)
    public = serialization.load_pem_public_key(key.public.read_bytes())
    assert isinstance(private.curve, ec.SECP256R1) and private.public_key().public_numbers() == public.public_numbers()
    raw = public.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    assert key.id == hashlib.sha256(raw).hexdigest()[:16]
    before = key.private.read_bytes()
    again = subprocess.run([sys.executable, "-m", "modelbuild", "keys", "generate", str(key.dir)],
                           capture_output=True, text=True)
    assert again.returncode != 0 and again.stdout == ""
    assert again.stderr.strip() == f"modelbuild: {key.private}: already exists; a key is never overwritten " \
                                   "(choose another folder)"
    assert key.private.read_bytes() == before


def test_bad_key_files_are_one_line_naming_the_file_and_a_non_zero_exit(world, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    b = reader(world, tmp_path / "b")
    ed = tmp_path / "ed25519.key"
    ed.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    cases = [
        ({"MODELBUILD_SIGNING_KEY": str(tmp_path / "missing.key")},
         f"modelbuild: MODELBUILD_SIGNING_KEY: {tmp_path / 'missing.key'}: no such file"),
        ({"MODELBUILD_SIGNING_KEY": str(ed)},
         f"modelbuild: MODELBUILD_SIGNING_KEY: {ed}: not an ECDSA P-256 key"),
        ({"MODELBUILD_TRUSTED_KEYS": f"{world.key_a.public},{world.key_e.private}"},
         f"modelbuild: MODELBUILD_TRUSTED_KEYS: {world.key_e.private}: not a PEM public key"),
    ]
    for extra, line in cases:
        result = build(world, b, check=False, **extra)
        assert result.returncode != 0, result.out[-2000:]
        lines = [l for l in result.out.splitlines() if l.startswith("modelbuild:")]
        assert len(lines) == 1 and lines[0].startswith(line), result.out[-2000:]
        assert "Traceback" not in result.out and b.runs() == []
    b.append("targets/toy.toml", '\n[cache]\nsigning_key = "keys/none.key"\n')
    result = build(world, b, check=False)
    assert result.returncode != 0 and \
        f"modelbuild: targets/toy.toml: cache.signing_key: {b.root / 'keys/none.key'}: no such file" in result.out, \
        result.out[-2000:]


def test_the_private_keys_appear_in_no_file_object_or_output(world):
    """Last in the module: every project, cache and bucket object the tests above left."""
    secrets = world.key_a.secret_fragments() + world.key_e.secret_fragments()
    assert len(secrets) > 4
    roots = {p.root for p in world.projects} | {p.cache for p in world.projects}
    files = [f for root in roots for f in Path(root).rglob("*") if f.is_file()]
    assert len(files) > 50
    for path in files:
        data = path.read_bytes()
        assert not any(s in data for s in secrets), path
    bucket = world.url.removeprefix("s3://").split("/")[0]
    raw = raw_store(world.server, f"s3://{bucket}")
    metas = [m for batch in obstore.list(raw, chunk_size=1000) for m in batch]
    assert any(m["path"].endswith(".json") for m in metas) and len(metas) > 10
    for meta in metas:
        data = bytes(obstore.get(raw, meta["path"]).bytes())
        assert not any(s in data for s in secrets), meta["path"]
    text = "\n".join(world.outputs).encode()
    assert b"signed" in text or b"pushed" in text
    assert not any(s in text for s in secrets)
