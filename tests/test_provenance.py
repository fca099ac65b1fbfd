"""Releases with signed provenance (issue #24, item 5): real doit runs of the toy chain
(tests/core_project.py), real ECDSA keys, the real ``model_signing`` CLI and a real SeaweedFS
(tests/s3server.py). No mock.

Builder A releases ``shout`` signed with its key and publishes it to the bucket; E is another
key (a hostile builder's). The bundle is what the archive unpacks to; ``<target>.sig`` beside
the lock is its OpenSSF model-signing signature.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import obstore
import pytest

from core_project import CHAIN, new_core_project
from s3server import make_bucket, s3_server  # noqa: F401 (fixture)
from test_trust import Key, aws_env, generate_key, raw_store

pytestmark = pytest.mark.core

TARGET = "shout"
MODEL_SIGNING = str(Path(sys.executable).parent / "model_signing")  # the package's own CLI, unchanged


@dataclass
class Released:
    server: object
    url: str
    env: dict  # the bucket, nothing pushed
    a: object
    key_a: Key
    key_e: Key
    release: Path  # release/shout/ of project a
    outputs: list  # every command's output of the module, for the hygiene test
    projects: list


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def unpack(archive: Path, folder: Path) -> Path:
    """What a user does with a downloaded release: tar xzf."""
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    return folder / TARGET


def model_signing_verify(signature: Path, public: Path, bundle: Path) -> subprocess.CompletedProcess:
    return subprocess.run([MODEL_SIGNING, "verify", "key", "--signature", str(signature), "--public_key", str(public),
                           str(bundle)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def released(s3_server, tmp_path_factory) -> Released:
    base = tmp_path_factory.mktemp("provenance")
    key_a, key_e = generate_key(base / "keys-a"), generate_key(base / "keys-e")
    bucket = f"provenance-{uuid.uuid4().hex[:8]}"
    make_bucket(s3_server, bucket)
    url = f"s3://{bucket}/modelbuild"
    env = {**aws_env(s3_server), "MODELBUILD_REMOTE_PUSH": "0"}
    a = new_core_project(base / "a")
    result = a.modelbuild("release", TARGET, "--to", url, env={**env, "MODELBUILD_SIGNING_KEY": str(key_a.private)})
    assert result.returncode == 0, result.out[-3000:]
    release = a.path(f"release/{TARGET}")
    for name in (f"{TARGET}.lock.json", f"{TARGET}.provenance.json", f"{TARGET}.tar.gz", f"{TARGET}.sig"):
        assert f"published: {url}/releases/{TARGET}/{name}" in result.out, result.out[-3000:]
        assert (release / name).is_file(), name
    return Released(s3_server, url, env, a, key_a, key_e, release, [result.out], [a])


def test_model_signing_cli_accepts_the_release_and_rejects_a_flipped_byte_and_another_key(released, tmp_path):
    signature = released.release / f"{TARGET}.sig"
    bundle = unpack(released.release / f"{TARGET}.tar.gz", tmp_path / "unpacked")
    assert set(files_of(bundle)) == {"counts.json", "total.txt", f"{TARGET}.lock.json", f"{TARGET}.provenance.json"}
    ok = model_signing_verify(signature, released.key_a.public, bundle)
    assert ok.returncode == 0 and "Verification succeeded" in ok.stdout, ok.stdout + ok.stderr

    for rel in ("total.txt", f"{TARGET}.lock.json", f"{TARGET}.provenance.json"):  # outputs, lock, provenance: all signed
        changed = tmp_path / f"flipped-{rel}"
        shutil.copytree(bundle, changed)
        data = bytearray((changed / rel).read_bytes())
        data[len(data) // 2] ^= 0x01
        (changed / rel).write_bytes(bytes(data))
        bad = model_signing_verify(signature, released.key_a.public, changed)
        assert bad.returncode != 0 and "Signature mismatch" in bad.stderr and rel in bad.stderr, (rel, bad.stderr)

    other = model_signing_verify(signature, released.key_e.public, bundle)
    assert other.returncode != 0 and "Verification failed" in other.stderr, other.stdout + other.stderr
    # Not only the key hint: a signature relabelled with E's hint still fails E's key on the ECDSA check.
    from modelbuild.cli.provenance import public_key_hint
    from modelbuild.core.signing import load_public

    relabelled = json.loads(signature.read_text())
    relabelled["verificationMaterial"]["publicKey"]["hint"] = public_key_hint(load_public(released.key_e.public, "test"))
    forged = tmp_path / "relabelled.sig"
    forged.write_text(json.dumps(relabelled))
    assert model_signing_verify(forged, released.key_e.public, bundle).returncode != 0


def test_provenance_subjects_are_the_bundle_files_sha256_and_its_stages_the_lock(released, tmp_path):
    provenance = json.loads((released.release / f"{TARGET}.provenance.json").read_bytes())
    lock = json.loads((released.release / f"{TARGET}.lock.json").read_bytes())
    assert provenance["_type"] == "https://in-toto.io/Statement/v1"
    assert provenance["predicateType"] == "https://slsa.dev/provenance/v1"
    bundle = unpack(released.release / f"{TARGET}.tar.gz", tmp_path / "unpacked")
    expected = {rel: hashlib.sha256(data).hexdigest() for rel, data in files_of(bundle).items()
                if rel != f"{TARGET}.provenance.json"}
    assert {s["name"]: s["digest"]["sha256"] for s in provenance["subject"]} == expected
    assert (bundle / f"{TARGET}.provenance.json").read_bytes() == (released.release / f"{TARGET}.provenance.json").read_bytes()

    definition = provenance["predicate"]["buildDefinition"]
    stages = definition["internalParameters"]["stages"]
    assert set(stages) == set(lock["stages"]) == CHAIN
    for name, stage in lock["stages"].items():
        for field in ("pass", "pass_version", "pass_code", "params", "device", "cpu_numerics", "libraries", "action_key"):
            assert stages[name][field] == stage[field], (name, field)
    inputs = {(d["annotations"]["stage"], d["annotations"]["input"]): d["digest"]["blake3"]
              for d in definition["resolvedDependencies"] if "stage" in d["annotations"]}
    assert inputs == {(name, key): info["digest"] for name, stage in lock["stages"].items()
                      for key, info in stage["inputs"].items()}
    targets = {d["name"]: d["digest"]["blake3"] for d in definition["resolvedDependencies"] if "stage" not in d["annotations"]}
    assert targets == lock["target_files"]
    builder = provenance["predicate"]["runDetails"]["builder"]
    assert builder["id"] == f"urn:modelbuild:builder:key:{released.key_a.id}" and builder["version"]["modelbuild"]


def test_a_release_again_is_byte_identical_and_an_unsigned_one_drops_the_signature(released, tmp_path):
    a = new_core_project(tmp_path / "a")
    released.projects.append(a)
    signing = {"MODELBUILD_SIGNING_KEY": str(released.key_a.private)}
    first = a.modelbuild("release", TARGET, env=signing)
    assert first.returncode == 0, first.out[-2000:]
    before = files_of(a.path(f"release/{TARGET}"))
    second = a.modelbuild("release", TARGET, env=signing)
    released.outputs += [first.out, second.out]
    after = files_of(a.path(f"release/{TARGET}"))
    for name in (f"{TARGET}.lock.json", f"{TARGET}.provenance.json", f"{TARGET}.tar.gz"):
        assert before[name] == after[name] == files_of(released.release)[name], name  # also the fixture's, elsewhere
    assert before[f"{TARGET}.sig"] != after[f"{TARGET}.sig"]  # ECDSA is randomised; both are valid
    bundle = unpack(a.path(f"release/{TARGET}/{TARGET}.tar.gz"), tmp_path / "unpacked")
    assert model_signing_verify(a.path(f"release/{TARGET}/{TARGET}.sig"), released.key_a.public, bundle).returncode == 0

    unsigned = a.modelbuild("release", TARGET)
    released.outputs.append(unsigned.out)
    assert unsigned.returncode == 0 and "signature:" not in unsigned.out, unsigned.out[-2000:]
    assert not a.path(f"release/{TARGET}/{TARGET}.sig").exists()
    provenance = json.loads(a.path(f"release/{TARGET}/{TARGET}.provenance.json").read_bytes())
    assert provenance["predicate"]["runDetails"]["builder"]["id"] == "urn:modelbuild:builder:unsigned"


def verdict(result) -> list[str]:
    return [line for line in result.out.splitlines() if line.startswith(("VERIFIED", "NOT VERIFIED", "NOT REPRODUCED"))]


def test_verify_checks_the_signature_and_provenance_and_names_the_signer(released, tmp_path):
    a = released.a
    lock = str(released.release / f"{TARGET}.lock.json")
    trusting_a = a.modelbuild("verify", lock, env={"MODELBUILD_TRUSTED_KEYS": str(released.key_a.public)})
    released.outputs.append(trusting_a.out)
    assert trusting_a.returncode == 0, trusting_a.out[-3000:]
    assert f"signature: valid model-signing signature of the bundle by key {released.key_a.id} (trusted)" in trusting_a.out
    assert "provenance: 3 subjects match the bundle's files (sha256), 3 stages match the lock" in trusting_a.out
    assert verdict(trusting_a) == ["VERIFIED: byte-identical rebuild"]

    trusting_e = a.modelbuild("verify", lock, env={"MODELBUILD_TRUSTED_KEYS": str(released.key_e.public)})
    released.outputs.append(trusting_e.out)
    assert trusting_e.returncode == 1 and verdict(trusting_e) == [
        f"NOT VERIFIED: signature: by key {released.key_a.id} (so its provenance says), which is not among the "
        "trusted keys: not checked"], trusting_e.out[-3000:]
    assert "running on" not in trusting_e.out  # refused before any rebuild

    # One byte of one file changed, the archive re-packed as deterministically as release packs it.
    tampered = tmp_path / "tampered"
    shutil.copytree(released.release, tampered)
    bundle = unpack(tampered / f"{TARGET}.tar.gz", tmp_path / "unpacked")
    data = bytearray((bundle / "total.txt").read_bytes())
    data[0] ^= 0x01
    (bundle / "total.txt").write_bytes(bytes(data))
    with tarfile.open(tampered / f"{TARGET}.tar.gz", "w:gz") as tar:
        tar.add(bundle, arcname=TARGET)
    bad = a.modelbuild("verify", str(tampered / f"{TARGET}.lock.json"),
                       env={"MODELBUILD_TRUSTED_KEYS": str(released.key_a.public)})
    released.outputs.append(bad.out)
    assert bad.returncode == 1, bad.out[-3000:]
    lines = verdict(bad)
    assert any(line.startswith("NOT VERIFIED: provenance: subject total.txt: sha256") for line in lines), lines
    assert any(line.startswith(f"NOT VERIFIED: signature: bad signature (signer {released.key_a.id})") for line in lines)


def test_verify_from_the_bucket_names_the_signer(released, tmp_path):
    b = new_core_project(tmp_path / "b")
    released.projects.append(b)
    lock_url = f"{released.url}/releases/{TARGET}/{TARGET}.lock.json"
    result = b.modelbuild("verify", lock_url, env={**released.env, "MODELBUILD_TRUSTED_KEYS": str(released.key_a.public)})
    released.outputs.append(result.out)
    assert result.returncode == 0, result.out[-3000:]
    assert f"lock manifest downloaded from {lock_url}" in result.out
    assert f"signature: valid model-signing signature of the bundle by key {released.key_a.id} (trusted)" in result.out
    assert verdict(result) == ["VERIFIED: byte-identical rebuild"]
    unsigned = b.modelbuild("verify", lock_url, env=released.env)  # no trusted keys: the signature cannot be checked
    released.outputs.append(unsigned.out)
    assert unsigned.returncode == 1 and "no trusted keys to check it with" in unsigned.out, unsigned.out[-3000:]


def test_an_archive_with_a_link_or_a_path_out_of_the_bundle_is_one_line(released, tmp_path):
    """An archive from a bucket is untrusted: verify unpacks folders and regular files under
    <target>/ only, and anything else is one line naming the archive and the member."""
    import io

    link = tarfile.TarInfo(f"{TARGET}/total.txt")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    for info in (link, tarfile.TarInfo(f"{TARGET}/../../escaped.txt")):
        member = info.name
        folder = tmp_path / f"case-{len(member)}"
        shutil.copytree(released.release, folder)
        with tarfile.open(folder / f"{TARGET}.tar.gz", "w:gz") as tar:
            tar.addfile(info, io.BytesIO(b""))
        result = released.a.modelbuild("verify", str(folder / f"{TARGET}.lock.json"),
                                       env={"MODELBUILD_TRUSTED_KEYS": str(released.key_a.public)})
        released.outputs.append(result.out)
        assert result.returncode == 2 and result.out.strip() == \
            f"modelbuild: {folder / f'{TARGET}.tar.gz'}: {member!r} is not a file of the {TARGET}/ bundle", result.out
        assert not (tmp_path / "escaped.txt").exists()


def test_the_private_key_appears_in_no_file_object_or_output(released):
    """Last in the module: every project, cache, release and bucket object the tests above left."""
    secrets = released.key_a.secret_fragments()
    roots = {p.root for p in released.projects} | {p.cache for p in released.projects}
    files = [f for root in roots for f in Path(root).rglob("*") if f.is_file()]
    assert any(f.name == f"{TARGET}.sig" for f in files) and len(files) > 20
    for path in files:
        assert not any(s in path.read_bytes() for s in secrets), path
    raw = raw_store(released.server, released.url)
    metas = [m for batch in obstore.list(raw, chunk_size=1000) for m in batch]
    assert any(m["path"].endswith(f"{TARGET}.sig") for m in metas)
    for meta in metas:
        assert not any(s in bytes(obstore.get(raw, meta["path"]).bytes()) for s in secrets), meta["path"]
    text = "\n".join(released.outputs).encode()
    assert b"signature" in text and not any(s in text for s in secrets)
