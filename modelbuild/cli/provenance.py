"""Signed provenance for releases (issue #24, item 5).

A release's *bundle* is the folder its archive unpacks to (``tar xzf <target>.tar.gz`` gives
``<target>/``): the target's output files, ``<target>.lock.json`` and
``<target>.provenance.json``.

``<target>.provenance.json`` is an in-toto Statement v1 whose predicate is SLSA v1 provenance
(``https://slsa.dev/provenance/v1``). Its subject is every other file of the bundle (the outputs
and the lock) with its sha256. ``buildDefinition`` holds the target and the digests of the
target files (``externalParameters``), each stage's pass, pass version and code digest, params,
device, CPU numerics branch, library versions and action key, and the machine kind
(``internalParameters``), and every input of every stage with its digest
(``resolvedDependencies``). ``runDetails.builder`` names the signing key's id and modelbuild's
version. It is derived from the lock alone, with no time and no host name in it, so the
statement, and the archive that holds it, stay byte-identical from release to release.

With a signing key, ``<target>.sig`` beside the lock is the bundle's OpenSSF model-signing
signature: a Sigstore bundle (DSSE envelope, in-toto payload listing every file of the bundle
with its sha256), made by the ``model_signing`` library from the builder's key file. The
signature lives outside the bundle, so it covers the lock and the provenance too, and nothing
beside the bundle gets in the way of ``model_signing verify key``. ECDSA signatures are
randomised, so ``<target>.sig`` differs between two releases of the same bytes (the archive
does not).
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import tarfile
from pathlib import Path

from .. import UserError, __version__

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
SLSA_PROVENANCE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "urn:modelbuild:release:v1"


def provenance_name(target: str) -> str:
    return f"{target}.provenance.json"


def signature_name(target: str) -> str:
    return f"{target}.sig"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def builder_id(key_id: str | None) -> str:
    return f"urn:modelbuild:builder:key:{key_id}" if key_id else "urn:modelbuild:builder:unsigned"


def builder_key_id(statement: dict) -> str | None:
    """The key id a statement's builder names, or None for an unsigned builder."""
    ident = statement.get("predicate", {}).get("runDetails", {}).get("builder", {}).get("id", "")
    prefix = "urn:modelbuild:builder:key:"
    return ident[len(prefix):] if isinstance(ident, str) and ident.startswith(prefix) else None


def build_definition(lock: dict) -> dict:
    """The SLSA buildDefinition of a lock: what the provenance says and ``verify`` compares."""
    stages = {name: {field: stage.get(field) for field in
                     ("pass", "pass_version", "pass_code", "params", "device", "cpu_numerics", "libraries",
                      "action_key", "manifest_digest")}
              for name, stage in sorted(lock["stages"].items())}
    dependencies = [{"name": rel, "digest": {"blake3": digest}, "annotations": {"kind": "target file"}}
                    for rel, digest in sorted(lock["target_files"].items())]
    for name, stage in sorted(lock["stages"].items()):
        for key, info in sorted(stage.get("inputs", {}).items()):
            dependencies.append({"name": info["ref"], "digest": {"blake3": info["digest"]},
                                 "annotations": {"stage": name, "input": key}})
    return {
        "buildType": BUILD_TYPE,
        "externalParameters": {"target": lock["target"]},
        "internalParameters": {"stages": stages, "python": lock.get("python")},
        "resolvedDependencies": dependencies,
    }


def statement(lock: dict, subjects: dict[str, str], key_id: str | None) -> dict:
    """The in-toto Statement: ``subjects`` (bundle path -> sha256) built as ``lock`` says, by the
    holder of ``key_id`` (None: an unsigned release) on this kind of machine."""
    definition = build_definition(lock)
    definition["internalParameters"]["machine"] = {"system": platform.system(), "machine": platform.machine()}
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": rel, "digest": {"sha256": digest}} for rel, digest in sorted(subjects.items())],
        "predicateType": SLSA_PROVENANCE,
        "predicate": {
            "buildDefinition": definition,
            "runDetails": {"builder": {"id": builder_id(key_id), "version": {"modelbuild": __version__}}},
        },
    }


def statement_bytes(value: dict) -> bytes:
    """Canonical bytes (sorted keys, one layout) so the same release gives the same file."""
    return (json.dumps(value, indent=1, sort_keys=True, ensure_ascii=True) + "\n").encode()


# -- the bundle's signature (OpenSSF model-signing) ----------------------------------------

def model_signing_module(what: str):
    try:
        import model_signing
    except ImportError:
        raise UserError(f"{what} needs the model-signing package "
                        "(pip install -c constraints.txt -e '.[release]')") from None
    return model_signing


def sign_bundle(bundle: Path, signature: Path, key_path: Path) -> None:
    """Sign the folder ``bundle`` with the private key file ``key_path`` into ``signature``;
    model_signing reads the key file itself, and writes only the public key's hint."""
    model_signing = model_signing_module("signing a release")
    tmp = signature.with_name(f".tmp-{signature.name}")
    model_signing.signing.Config().use_elliptic_key_signer(private_key=key_path).sign(bundle, tmp)
    tmp.chmod(0o644)
    tmp.replace(signature)


def public_key_hint(public_key) -> str:
    """What model-signing's ``key`` method records to name the key: sha256 of its PEM."""
    from cryptography.hazmat.primitives import serialization

    pem = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def signature_hint(signature: Path) -> str | None:
    try:
        bundle = json.loads(signature.read_bytes())
        hint = bundle["verificationMaterial"]["publicKey"]["hint"]
    except (ValueError, KeyError, TypeError):
        return None
    return hint if isinstance(hint, str) else None


def check_signature(bundle: Path, signature: Path, keys: dict, scratch: Path) -> tuple[str | None, str | None]:
    """(problem, signer key id). ``keys``: key id -> public key, the keys this reader knows. The
    signature names its key by a hint; the key it names is asked to verify it with the
    hashing of ``model_signing verify key``'s defaults (sha256 of every file of ``bundle``)."""
    from cryptography.hazmat.primitives import serialization

    hint = signature_hint(signature)
    if hint is None:
        return f"{signature.name}: not a model-signing signature bundle", None
    known = {public_key_hint(public): kid for kid, public in keys.items()}
    if hint not in known:
        return "signed by a key that is not among the trusted keys", None
    kid = known[hint]
    pem = scratch / f"{kid}.pub"
    pem.write_bytes(keys[kid].public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    model_signing = model_signing_module("checking a release's signature")
    try:
        model_signing.verifying.Config().use_elliptic_key_verifier(public_key=pem).set_hashing_config(
            model_signing.hashing.Config()).verify(bundle, signature)
    except Exception as error:  # model_signing raises ValueError, InvalidSignature, ...: all mean "no"
        return f"bad signature (signer {kid}): {str(error)[:300] or type(error).__name__}", kid
    return None, kid


# -- reading a bundle back ----------------------------------------------------------------

def unpack(archive: Path, folder: Path, target: str) -> Path:
    """The archive's bundle, unpacked under ``folder`` (folders and regular files below
    ``<target>/`` only: an archive from a bucket is untrusted input); its path."""
    bundle = folder / target
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                parts = Path(member.name).parts
                if not parts or parts[0] != target or ".." in parts or Path(member.name).is_absolute() \
                        or not (member.isfile() or member.isdir()):
                    raise UserError(f"{archive}: {member.name!r} is not a file of the {target}/ bundle")
                out = folder.joinpath(*parts)
                if member.isdir():
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as source, open(out, "wb") as handle:
                    shutil.copyfileobj(source, handle)
    except (tarfile.TarError, OSError, EOFError) as error:
        raise UserError(f"{archive}: not a release archive ({error})") from None
    return bundle


def bundle_sha256(bundle: Path, target: str) -> dict[str, str]:
    """sha256 of every file of the bundle but its provenance: what the subject must list."""
    skip = provenance_name(target)
    return {path.relative_to(bundle).as_posix(): sha256_file(path)
            for path in sorted(bundle.rglob("*")) if path.is_file() and path.relative_to(bundle).as_posix() != skip}


def provenance_problems(found: dict, lock: dict, subjects: dict[str, str]) -> list[str]:
    """What in a statement disagrees with the lock and the bundle's files (empty: all agrees)."""
    if not isinstance(found, dict) or found.get("_type") != STATEMENT_TYPE \
            or found.get("predicateType") != SLSA_PROVENANCE:
        return ["not an in-toto Statement v1 with an SLSA v1 provenance predicate"]
    problems = []
    listed = {s.get("name"): (s.get("digest") or {}).get("sha256") for s in found.get("subject") or []
              if isinstance(s, dict) and isinstance(s.get("digest") or {}, dict)}
    for rel in sorted(set(listed) | set(subjects)):
        if rel not in subjects:
            problems.append(f"subject {rel} is not in the bundle")
        elif rel not in listed:
            problems.append(f"bundle file {rel} is not a subject")
        elif listed[rel] != subjects[rel]:
            problems.append(f"subject {rel}: sha256 {str(listed[rel])[:12]}… but the file has {subjects[rel][:12]}…")
    expected = build_definition(lock)
    definition = found.get("predicate", {}).get("buildDefinition", {})
    stages = definition.get("internalParameters", {}).get("stages")
    for name in sorted(set(expected["internalParameters"]["stages"]) | set(stages or {})):
        if (stages or {}).get(name) != expected["internalParameters"]["stages"].get(name):
            problems.append(f"stage {name}: differs from the lock")
    for key in ("buildType", "externalParameters", "resolvedDependencies"):
        if definition.get(key) != expected[key]:
            problems.append(f"buildDefinition.{key}: differs from the lock")
    return problems


def read_statement(data: bytes, where: str) -> dict:
    try:
        return json.loads(data)
    except ValueError:
        raise UserError(f"{where}: not JSON") from None


def check_release(lock_path: Path, project, scratch: Path) -> tuple[list[str], list[str]]:
    """(problems, report lines) of the release beside ``lock_path``: its archive's lock equals
    this lock, its provenance agrees with the lock and the bundle's files, and its signature is
    valid by a key this reader trusts (the trusted keys, and its own signing key). Without
    trusted keys an unsigned release is a note; with them, a problem."""
    from ..cache.tiers import trust_config

    lock_bytes = lock_path.read_bytes()
    lock = json.loads(lock_bytes)
    target = lock["target"]
    trust = trust_config(project)
    keys = dict(trust.trusted or {})
    if trust.signer is not None:
        keys[trust.signer.key_id] = trust.signer.public
    required = trust.trusted is not None
    problems, lines = [], []
    archive = lock_path.with_name(f"{target}.tar.gz")
    if not archive.is_file():
        lines.append(f"note: no {archive.name} beside the lock: its provenance and signature are not checked")
        if required:
            problems.append("trusted keys are set, and there is no signed release beside the lock to check")
        return problems, lines
    bundle = unpack(archive, scratch / "bundle", target)
    inside = bundle / lock_path.name
    if not inside.is_file() or inside.read_bytes() != lock_bytes:
        problems.append(f"{archive.name}: the lock inside differs from {lock_path.name}")
    provenance = bundle / provenance_name(target)
    if not provenance.is_file():
        problems.append(f"{archive.name}: no {provenance.name} in the bundle")
        found = None
    else:
        found = read_statement(provenance.read_bytes(), f"{archive.name}: {provenance.name}")
        beside = lock_path.with_name(provenance.name)
        if beside.is_file() and beside.read_bytes() != provenance.read_bytes():
            problems.append(f"{beside.name} beside the lock differs from the one in {archive.name}")
        subjects = bundle_sha256(bundle, target)
        wrong = provenance_problems(found, lock, subjects)
        problems += [f"provenance: {p}" for p in wrong]
        if not wrong:
            lines.append(f"provenance: {len(subjects)} subjects match the bundle's files (sha256), "
                         f"{len(lock['stages'])} stages match the lock")
    signature = lock_path.with_name(signature_name(target))
    claimed = builder_key_id(found) if isinstance(found, dict) else None
    if not signature.is_file():
        lines.append(f"unsigned release: no {signature.name} beside the lock")
        if required:
            problems.append(f"unsigned release: trusted keys are set, and {target} is not signed")
        return problems, lines
    problem, signer = check_signature(bundle, signature, keys, scratch)
    if problem is None:
        whose = "trusted" if signer in (trust.trusted or {}) else "this builder's own key, not in the trusted keys"
        lines.append(f"signature: valid model-signing signature of the bundle by key {signer} ({whose})")
        if claimed != signer:
            problems.append(f"provenance names builder key {claimed}, but the bundle is signed by {signer}")
    elif signer is None and problem.startswith("signed by a key"):
        who = f"by key {claimed} (so its provenance says)" if claimed else "by a key its provenance does not name"
        if keys:
            problems.append(f"signature: {who}, which is not among the trusted keys: not checked")
        else:
            problems.append(f"signature: {who}; no trusted keys to check it with (set MODELBUILD_TRUSTED_KEYS "
                            "or [cache] trusted_keys to the signer's .pub)")
    else:
        problems.append(f"signature: {problem}")
    return problems, lines
