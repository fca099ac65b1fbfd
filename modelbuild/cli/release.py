"""Reproducible releases: a lock manifest + archive, and a from-scratch rebuild that checks it.

``release`` builds the target, writes ``release/<target>/<target>.lock.json`` (every input
digest of the whole build graph, target files, resolved params, pass and package versions,
every output digest) and its SLSA provenance, and packs the target's output with both into a
deterministic ``release/<target>/<target>.tar.gz``; with a signing key, ``<target>.sig`` beside
it is the bundle's OpenSSF model-signing signature (cli/provenance.py). The cache pins what the
release needs.

``verify`` checks the release's provenance and signature, then rebuilds it in a temporary copy
of the project with an empty cache (only the sha256-pinned downloads are shared, no remote
cache is used) and compares every output file; for ONNX files that differ it reports the
largest absolute difference per initializer.

``release --to s3://bucket/prefix`` publishes the archive, provenance, signature and lock under
``prefix/releases/<target>/`` and pushes the release's stages into the remote cache at that
prefix; ``verify`` accepts the lock's s3:// URL, so a release built on CI is checked anywhere.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .. import UserError
from ..core.digest import NotAFile, hash_file, read_regular
from ..core.numerics import check_name, missing
from ..exec.executor import load_here
from ..core.project import Project
from ..engine.stage import stat_cache
from ..core.stamp import read_stamp
from ..core.status import Fresh, status
from ..cache.store import Store, write_json_atomic
from .provenance import (check_release, model_signing_module, provenance_name, sha256_file, sign_bundle,
                         signature_name, statement, statement_bytes, unpack)

LOCK_FORMAT = 2  # 2: named inputs flat ("adapters.travel"), keys with python and platform


def run_doit(root: Path, target: str, env: dict | None = None) -> None:
    result = subprocess.run([sys.executable, "-m", "doit", target], cwd=root, env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise UserError(f"doit {target} failed (exit {result.returncode}) in {root}")


def lock_manifest(project: Project, name: str) -> dict:
    stages = {}
    cache = stat_cache(project)
    for stage in project.closure([name]):
        state = status(project, project.targets[stage], cache)
        if not isinstance(state, Fresh):
            raise UserError(f"target '{stage}' is not up to date ({state.text}); build it first")
        stamp = state.stamp
        if stamp.get("left_on_remote"):
            raise UserError(f"target '{stage}': its files were left on the remote cache; "
                            f"build it here first (MODELBUILD_DOWNLOAD=all doit {name})")
        components = stamp["components"]
        inputs = {key: {"ref": str(ref), "digest": components["inputs"][key]}
                  for key, ref in project.targets[stage].inputs.items()}
        stages[stage] = {
            "pass": components["pass"],
            "pass_version": components["pass_version"],
            "pass_code": components["pass_code"],
            "params": components["params"],
            "device": components["device"],
            "cpu_numerics": components["cpu_numerics"],
            "libraries": components["libraries"],
            "inputs": inputs,
            "action_key": stamp["action_key"],
            "outputs": stamp["manifest"],
            "manifest_digest": stamp["manifest_digest"],
        }
    target_files = {
        path.relative_to(project.root).as_posix(): hash_file(path)
        for path in sorted((project.root / "targets").glob("*.toml"))
    }
    return {
        "format": LOCK_FORMAT,
        "target": name,
        "python": platform.python_version(),
        "target_files": target_files,
        "stages": stages,
    }


def _tar_add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def release(project_root: Path, name: str, out_dir: Path | None = None) -> dict[str, Path]:
    """Build ``name`` and write its release; {what: path} of the files written (a signature only
    with a signing key)."""
    from ..cache.tiers import trust_config

    project = load_here(project_root)
    if name not in project.targets:
        raise UserError(f"unknown target '{name}' (see: doit list)")
    signer = trust_config(project).signer  # a bad key file is one line before minutes of building
    if signer is not None:
        model_signing_module("signing a release")  # so is a missing model-signing package
    run_doit(project.root, name, env={"MODELBUILD_DOWNLOAD": "all"})  # it packs and pins every stage's files
    lock = lock_manifest(project, name)
    out_dir = Path(out_dir or project.root / "release" / name)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock_path = out_dir / f"{name}.lock.json"
    write_json_atomic(lock_path, lock)
    source = project.output_dir(name)
    outputs = sorted(lock["stages"][name]["outputs"])
    subjects = {rel: sha256_file(source / rel) for rel in outputs}
    subjects[lock_path.name] = sha256_file(lock_path)
    provenance = out_dir / provenance_name(name)
    provenance_data = statement_bytes(statement(lock, subjects, signer.key_id if signer else None))
    tmp = provenance.with_name(f".tmp-{provenance.name}")
    tmp.write_bytes(provenance_data)
    os.replace(tmp, provenance)
    archive = out_dir / f"{name}.tar.gz"
    tmp = archive.with_suffix(".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel in outputs:
            info = tar.gettarinfo(str(source / rel), arcname=f"{name}/{rel}")
            info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, 0, "", "", 0o644
            with open(source / rel, "rb") as handle:
                tar.addfile(info, handle)
        _tar_add_bytes(tar, f"{name}/{name}.lock.json", lock_path.read_bytes())
        _tar_add_bytes(tar, f"{name}/{provenance.name}", provenance_data)
    os.replace(tmp, archive)
    written = {"lock manifest": lock_path, "provenance": provenance, "archive": archive}
    signature = out_dir / signature_name(name)
    signature.unlink(missing_ok=True)  # never leave an older release's signature beside this one
    if signer is not None:
        with tempfile.TemporaryDirectory(prefix="modelbuild-sign-") as scratch:
            sign_bundle(unpack(archive, Path(scratch), name), signature, signer.path)  # what the archive unpacks to
        written["signature"] = signature
    store = Store(project.cache_dir)
    for stage in lock["stages"]:  # the store must hold what it pins, even after a gc emptied it
        store.record(project.output_dir(stage), read_stamp(project.output_dir(stage)))
    digests = [info["digest"] for stage in lock["stages"].values() for info in stage["outputs"].values()]
    store.pin(f"release-{name}", digests, [stage["action_key"] for stage in lock["stages"].values()])
    return written


def publish(project_root: Path, written: dict[str, Path], url: str) -> list[str]:
    """Upload what ``release`` wrote (``written``) to ``url/releases/<target>/``: the archive,
    its provenance and signature, then the lock (last: a lock that is there has the rest), and
    push every stage of the release into the remote cache at ``url`` (objects it has are
    skipped), so the release restores anywhere. Report lines."""
    from ..cache.remote import RemoteError, RemoteStore

    from ..cache.tiers import trust_config

    lock_path = written["lock manifest"]
    lock = read_lock(lock_path)
    name = lock["target"]
    project = load_here(project_root)
    store = Store(project.cache_dir)
    trust = trust_config(project)
    lines = []
    try:
        remote = RemoteStore.from_url(url)
        for stage in lock["stages"].values():
            entry = store.lookup(stage["action_key"])
            if entry is None:
                raise UserError(f"release --to: stage {stage['action_key'][:12]}… is not in the local cache "
                                "(run the release again)")
            files = {info["digest"]: store.object_path(info["digest"]) for info in entry["manifest"].values()}
            stats = remote.push(entry, files, signer=trust.signer)  # signed like a build's push
            lines.append(f"pushed {entry.get('target', '?')}: {stats['uploaded']} objects "
                         f"({stats['uploaded_bytes'] / 1e6:.1f} MB), {stats['skipped']} already there")
        uploads = [path for what, path in written.items() if what != "lock manifest"] + [lock_path]
        for path in uploads:
            remote.put_file(f"releases/{name}/{path.name}", path)
    except RemoteError as error:
        raise UserError(f"release --to: {error}") from None
    lines += [f"published: {url}/releases/{name}/{path.name}" for path in uploads]
    return lines


def download_lock(url: str, folder: Path) -> Path:
    """A lock manifest at an s3:// URL -> a local file in ``folder`` (one line if it cannot be had)."""
    from ..core.settings import check_remote_url
    from ..cache.remote import RemoteError, RemoteStore

    base, _, name = url.rpartition("/")
    if not url.startswith("s3://") or not name or "/" not in base.removeprefix("s3://"):
        raise UserError(f"{url[:200]}: not a local lock manifest or s3://bucket/prefix/.../<target>.lock.json")
    check_remote_url(base, "verify")
    path = Path(folder) / name
    try:
        remote = RemoteStore.from_url(base)
        found = remote.get_file(name, path)
        if found:  # what verify checks beside the lock, where the release has it
            target = name.removesuffix(".lock.json")
            for beside in (f"{target}.tar.gz", provenance_name(target), signature_name(target)):
                remote.get_file(beside, Path(folder) / beside)
    except RemoteError as error:
        raise UserError(f"verify: {error}") from None
    if not found:
        raise UserError(f"{url}: no such lock manifest on the remote")
    return path


def onnx_initializer_diff(a: Path, b: Path) -> dict[str, float]:
    """Largest absolute difference per initializer of two ONNX models (same names compared)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    first = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(a)).graph.initializer}
    second = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(b)).graph.initializer}
    diffs = {}
    for name in sorted(set(first) | set(second)):
        if name not in first or name not in second or first[name].shape != second[name].shape:
            diffs[name] = float("inf")
            continue
        delta = np.abs(first[name].astype(np.float64) - second[name].astype(np.float64)).max() if first[name].size else 0.0
        if delta:
            diffs[name] = float(delta)
    return diffs


def read_lock(path: Path) -> dict:
    """A lock manifest written by ``release``; anything else is one line saying what it is."""
    try:
        lock = json.loads(read_regular(path).decode("utf-8"))  # never blocks on a named pipe
    except NotAFile as error:
        raise UserError(f"{path}: {error}: a lock manifest is a JSON file") from None
    except UnicodeDecodeError:
        hint = " (that is the release archive: give the .lock.json beside it)" if path.name.endswith(".tar.gz") else ""
        raise UserError(f"{path}: not a lock manifest: binary data{hint}") from None
    except ValueError as error:
        raise UserError(f"{path}: not a lock manifest: not JSON ({error})") from None
    if not isinstance(lock, dict) or lock.get("format") != LOCK_FORMAT:
        found = f"format {lock.get('format')!r}" if isinstance(lock, dict) else f"a JSON {type(lock).__name__}"
        raise UserError(f"{path}: not a modelbuild lock manifest ({found}; expected a table with format {LOCK_FORMAT})")
    stages = lock.get("stages")
    if not isinstance(lock.get("target"), str) or not isinstance(stages, dict) or lock["target"] not in stages \
            or not all(isinstance(s, dict) and isinstance(s.get("outputs"), dict) for s in stages.values()) \
            or not isinstance(lock.get("target_files"), dict):
        raise UserError(f"{path}: damaged lock manifest (target, stages with their outputs, target_files expected)")
    return lock


def verify(lock_path: Path, project_root: Path, keep: bool = False) -> tuple[bool, list[str]]:
    """Check the release's provenance and signature (provenance.check_release), then rebuild
    from scratch, cache bypassed, and compare; (verified?, report lines ending in the verdict)."""
    lock = read_lock(Path(lock_path))
    project = load_here(project_root)
    report = []
    work = Path(tempfile.mkdtemp(prefix="modelbuild-verify-"))
    try:
        (work / "release").mkdir()
        problems, lines = check_release(Path(lock_path), project, work / "release")
        report += lines
        if problems:  # a release that is not what it claims is not worth a rebuild
            report += [f"NOT VERIFIED: {problem}" for problem in problems]
            return False, report
        for rel, digest in lock["target_files"].items():
            path = project.root / rel
            if not path.exists() or hash_file(path) != digest:
                report.append(f"note: {rel} differs from the release; rebuilding from the current target files")
        clean = work / "project"
        clean.mkdir()
        shutil.copy(project.root / "dodo.py", clean / "dodo.py")
        shutil.copytree(project.root / "targets", clean / "targets")
        cache = work / "cache"
        cache.mkdir()
        downloads = project.cache_dir / "downloads"
        if downloads.is_dir():
            os.symlink(downloads, cache / "downloads")  # sha256-pinned sources, not build outputs
        env = {"MODELBUILD_CACHE": str(cache), "MODELBUILD_REMOTE_CACHE": "off"}
        branch = lock["stages"][lock["target"]].get("cpu_numerics")
        if branch:  # rebuild on the CPU branch the release was built on
            lacking = missing(check_name(branch, f"{lock_path}: cpu_numerics"))
            if lacking:
                raise UserError(f"{lock_path}: built on CPU numerics {branch}; {lacking}, so this machine "
                                "cannot reproduce its bytes")
            env["MODELBUILD_CPU_NUMERICS"] = branch
            report.append(f"rebuilding on CPU numerics {branch}, as the release was built")
        run_doit(clean, lock["target"], env=env)
        identical = True
        for stage, expected in lock["stages"].items():
            built = read_stamp(clean / "build" / stage)["manifest"]
            same = [rel for rel in expected["outputs"] if built.get(rel, {}).get("digest") == expected["outputs"][rel]["digest"]]
            differ = [rel for rel in sorted(set(expected["outputs"]) | set(built)) if rel not in same]
            if not differ:
                report.append(f"{stage}: {len(same)} files byte-identical")
                continue
            identical = False
            report.append(f"{stage}: {len(same)} files byte-identical, {len(differ)} differ:")
            for rel in differ:
                old, new = expected["outputs"].get(rel), built.get(rel)
                if old is None or new is None:
                    report.append(f"  {rel}: {'only in the rebuild' if old is None else 'missing from the rebuild'}")
                    continue
                line = f"  {rel}: size {old['size']} -> {new['size']}"
                original = project.output_dir(stage) / rel
                if rel.endswith(".onnx") and original.exists():
                    diffs = onnx_initializer_diff(original, clean / "build" / stage / rel)
                    worst = max(diffs.items(), key=lambda item: item[1]) if diffs else None
                    line += f"; {len(diffs)} initializers differ" + (f", max |diff| {worst[1]:.3g} in {worst[0]}" if worst else "")
                report.append(line)
        report.append("VERIFIED: byte-identical rebuild" if identical else "NOT REPRODUCED: outputs differ (see above)")
        return identical, report
    finally:
        if keep:
            report.append(f"rebuild kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
