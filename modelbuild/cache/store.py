"""The content-addressed cache: artifact files by digest, and an action cache key -> manifest.

Layout under the cache folder (``cache/`` or ``$MODELBUILD_CACHE``)::

    objects/ab/cdef...     one file per content digest, read-only, written by atomic rename
    actions/<key>.json     the stamp of a finished stage (manifest, key components, seconds);
                           its mtime is its last use, for least-recently-used collection
    pins/<name>.json       digests a release pins: garbage collection never drops them
    locks/<key>.lock       one builder per action at a time, across processes and projects

Files are copied between build/ and the store (a reflink where the filesystem offers one),
never hard-linked: a user editing a file in build/ must not change what the cache serves. Every
object is re-hashed when it is materialized, so a corrupt or missing object is dropped and the
stage rebuilt, never served.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

from .. import say
from ..core.digest import hash_file, hash_json
from ..core.key import key_of
from ..core.stamp import action_entry

FICLONE = 0x40049409  # linux/fs.h: share the source's blocks (btrfs, xfs, ...)


def clone_or_copy(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` as a reflink when the filesystem supports it, else byte by byte."""
    with open(src, "rb") as source, open(dst, "wb") as target:
        try:
            fcntl.ioctl(target.fileno(), FICLONE, source.fileno())
            return
        except OSError as error:
            if error.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.ENOSYS, errno.EPERM):
                raise
        shutil.copyfileobj(source, target, 1 << 22)


def write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes it private; these files are meant to be read and shared
    os.replace(tmp, path)


def entry_problem(key: str, entry: object) -> str | None:
    """Why an action entry cannot be trusted, or None.

    An entry is served only when it is self-consistent: its key is the digest of its key
    components, and its manifest (output name -> digest) hashes to its manifest digest, the
    value downstream keys are made of. An entry edited by hand, or written by a broken or
    hostile client, fails one of these and is never served. (A writer who recomputes every
    digest can still publish a wrong build: readers of a remote set trusted keys, and then an
    entry is also served only when signed by one of them: tiers.Trust, signing.py.)
    """
    if not isinstance(entry, dict):
        return "not a JSON object"
    manifest = entry.get("manifest")
    if not isinstance(manifest, dict) or not all(
            isinstance(info, dict) and isinstance(info.get("digest"), str) and len(info["digest"]) == 64
            and isinstance(info.get("size"), int) and ".." not in Path(rel).parts and not Path(rel).is_absolute()
            for rel, info in manifest.items()):
        return "malformed (its manifest is not a table of relative file names to digests)"
    if entry.get("action_key") != key:
        return "filed under another key"
    if "components" in entry and key_of(entry["components"]) != key:
        return "inconsistent (its key components do not hash to its key)"
    if entry.get("manifest_digest") != hash_json(manifest):
        return "inconsistent (its manifest does not hash to its manifest digest)"
    return None


class Store:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.objects = self.root / "objects"
        self.actions = self.root / "actions"
        self.pins = self.root / "pins"
        self.locks = self.root / "locks"

    def object_path(self, digest: str) -> Path:
        return self.objects / digest[:2] / digest[2:]

    # -- locking ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, name: str, what: str):
        """Exclusive lock ``name`` (an action key or target); says so when it has to wait."""
        self.locks.mkdir(parents=True, exist_ok=True)
        with open(self.locks / f"{name}.lock", "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                say(f"waiting for another process building {what} ...")
                fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # -- action cache ----------------------------------------------------------------------

    def lookup(self, key: str) -> dict | None:
        """The action entry for ``key`` if the cache has a self-consistent one (else it is dropped)."""
        path = self.actions / f"{key}.json"
        try:
            entry = json.loads(path.read_text())
        except OSError:
            return None
        except ValueError:
            entry = None
        problem = entry_problem(key, entry)
        if problem:
            say(f"cache entry {key[:12]}… is {problem}: dropped, never served")
            path.unlink(missing_ok=True)
            return None
        os.utime(path)  # last use, for LRU collection
        return entry

    def read_output(self, key: str, rel: str) -> bytes | None:
        """One output file of a cached action, if the cache has it intact; None otherwise."""
        entry = self.lookup(key)
        info = entry and entry["manifest"].get(rel)
        if not info:
            return None
        path = self.object_path(info["digest"])
        try:
            intact = hash_file(path) == info["digest"]
        except OSError:
            return None
        return path.read_bytes() if intact else None

    def record(self, out_dir: Path, stamp: dict) -> None:
        """Store every output file by digest, then the action entry that points at them."""
        for rel, info in stamp["manifest"].items():
            target = self.object_path(info["digest"])
            if target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
            os.close(fd)
            clone_or_copy(out_dir / rel, Path(tmp))
            os.chmod(tmp, 0o444)
            os.replace(tmp, target)
        write_json_atomic(self.actions / f"{stamp['action_key']}.json", action_entry(stamp))

    def materialize(self, entry: dict, dest: Path) -> str | None:
        """Copy an action's outputs into ``dest``; None on success, else why it could not.

        Every copied file is re-hashed: a missing or corrupt object drops the action entry
        (and the corrupt object), so the caller rebuilds instead of serving it.
        """
        for rel, info in entry["manifest"].items():
            source = self.object_path(info["digest"])
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                clone_or_copy(source, target)
            except FileNotFoundError:
                self.drop_action(entry["action_key"])
                return f"cache object for {rel} is missing"
            os.chmod(target, 0o644)
            if hash_file(target) != info["digest"]:
                source.unlink(missing_ok=True)
                self.drop_action(entry["action_key"])
                return f"cache object for {rel} is corrupt (dropped)"
        return None

    def drop_action(self, key: str) -> None:
        (self.actions / f"{key}.json").unlink(missing_ok=True)

    # -- maintenance -----------------------------------------------------------------------

    def entries(self) -> list[tuple[Path, dict]]:
        out = []
        for path in sorted(self.actions.glob("*.json")):
            try:
                out.append((path, json.loads(path.read_text())))
            except (OSError, ValueError):
                path.unlink(missing_ok=True)
        return out

    def pinned(self) -> tuple[set[str], set[str]]:
        """(object digests, action keys) that releases pin."""
        digests, actions = set(), set()
        for path in sorted(self.pins.glob("*.json")):
            pin = json.loads(path.read_text())
            digests.update(pin.get("digests", []))
            actions.update(pin.get("actions", []))
        return digests, actions

    def pin(self, name: str, digests: list[str], actions: list[str]) -> None:
        """Keep these objects and action entries through every gc: the release restores from them."""
        write_json_atomic(self.pins / f"{name}.json", {"digests": sorted(set(digests)), "actions": sorted(set(actions))})

    def object_files(self) -> list[Path]:
        return [p for p in self.objects.glob("??/*") if not p.name.startswith(".tmp-")]

    def info(self) -> dict:
        objects = self.object_files()
        return {
            "path": str(self.root),
            "actions": len(self.entries()),
            "objects": len(objects),
            "bytes": sum(p.stat().st_size for p in objects),
            "pins": len(list(self.pins.glob("*.json"))),
        }

    def gc(self, max_bytes: int) -> dict:
        """Drop least-recently-used actions until the objects they need fit ``max_bytes``.

        Objects and action entries a release pins are never dropped (so the release's stages
        restore instead of rebuilding); objects no action needs any more are.
        """
        pinned, pinned_actions = self.pinned()
        entries = sorted((item for item in self.entries() if item[0].stem not in pinned_actions),
                         key=lambda item: item[0].stat().st_mtime)  # oldest first
        kept_pinned = [item for item in self.entries() if item[0].stem in pinned_actions]

        def needed(kept):
            digests = set(pinned)
            for _, entry in kept:
                digests.update(info["digest"] for info in entry["manifest"].values())
            return digests

        def size(digests):
            return sum(self.object_path(d).stat().st_size for d in digests if self.object_path(d).exists())

        kept = list(entries)
        dropped_actions = 0
        while kept and size(needed(kept)) > max_bytes:
            path, _ = kept.pop(0)
            path.unlink(missing_ok=True)
            dropped_actions += 1
        keep = needed(kept + kept_pinned)
        freed = 0
        for obj in self.object_files():
            digest = obj.parent.name + obj.name
            if digest not in keep:
                freed += obj.stat().st_size
                obj.unlink()
        return {"dropped_actions": dropped_actions, "freed_bytes": freed, **self.info()}

    def verify(self) -> list[str]:
        """Check every action entry (self-consistent, objects present) and re-hash every object;
        drop corrupt objects, bad entries and the entries that need a dropped object. Returns problems."""
        problems = []
        bad = set()
        for path in sorted(self.actions.glob("*.json")):
            try:
                entry = json.loads(path.read_text())
            except ValueError:
                entry = None
            problem = entry_problem(path.stem, entry)
            if problem:
                what = entry.get("target", "?") if isinstance(entry, dict) else "?"
                problems.append(f"action {what} ({path.stem[:12]}…) is {problem}: dropped")
                path.unlink()
        for obj in self.object_files():
            digest = obj.parent.name + obj.name
            if hash_file(obj) != digest:
                problems.append(f"corrupt object {digest[:16]}… dropped")
                obj.unlink()
                bad.add(digest)
        for path, entry in self.entries():
            missing = [rel for rel, info in entry["manifest"].items()
                       if info["digest"] in bad or not self.object_path(info["digest"]).exists()]
            if missing:
                problems.append(f"action {entry.get('target', '?')} ({path.stem[:12]}…) lost {', '.join(missing)}: dropped")
                path.unlink()
        return problems

