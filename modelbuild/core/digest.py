"""Content digests of files and folders, with a stat cache so unchanged files are not re-hashed.

A no-op build must not re-read gigabytes of weights. A file's digest is reused while its
identity (inode, size, mtime_ns, ctime_ns) is unchanged. Same-tick guard (as in git's "racy"
index): a file whose mtime is within ``RACY_NS`` of when it was hashed may still be modified in
the same clock tick without changing its stat, so such an entry is not trusted and the file is
hashed again until its mtime lies safely before the hashing time.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import threading
import time
from pathlib import Path

import blake3

from .. import UserError

# BLAKE3: cryptographic (a shared cache must not be poisonable by crafted collisions, which
# rules out xxh3) and, mmap'd on all cores, 4x faster than hashlib's sha256 on this machine
# (bench/hash_bench.py).
ALGORITHM = "blake3"
MMAP_MIN_BYTES = 1 << 20  # below this, a plain read is cheaper than mapping and threading
RACY_NS = 2_000_000_000  # coarse filesystems stamp mtime to 1-2 s


class NotAFile(UserError, OSError):
    """A named pipe, device or socket where modelbuild reads a file: a ``UserError`` (one line) that
    code which treats an unreadable file as missing (an ``OSError``) also catches."""


KINDS = {stat.S_IFIFO: "a named pipe (FIFO)", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
         stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder", stat.S_IFLNK: "a symbolic link"}


def kind_of(mode: int) -> str:
    """What a stat mode is, in words: "a regular file", "a named pipe (FIFO)", "a folder"..."""
    return "a regular file" if stat.S_ISREG(mode) else KINDS.get(stat.S_IFMT(mode), "not a regular file")


def special(mode: int) -> str | None:
    """None for a regular file or a folder; else what it is, in words. Anything else is refused
    wherever modelbuild reads its input: opening a named pipe blocks until something writes to it,
    and a device such as /dev/zero reads without end (its size says 0)."""
    return None if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else kind_of(mode)


def read_regular(path: Path | str) -> bytes:
    """The bytes of a regular file (a target file): never blocks on a named pipe nor opens a socket.
    Anything but a regular file is ``NotAFile`` ("a named pipe (FIFO), not a regular file");
    the caller names the path. Opened without blocking and checked on the open file, so nothing
    can be swapped in between; as cheap as ``open().read()`` (fewer system calls)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        try:
            mode = os.stat(path).st_mode  # a socket cannot be opened (ENXIO): say what it is
        except OSError:
            mode = None
        if mode is not None and not stat.S_ISREG(mode):
            raise NotAFile(f"{kind_of(mode)}, not a regular file") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotAFile(f"{kind_of(st.st_mode)}, not a regular file")
        chunks = []
        while chunk := os.read(fd, max(st.st_size + 1, 1 << 16)):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_regular_text(path: Path | str) -> str:
    """``read_regular`` decoded as ``Path.read_text(encoding="utf-8")`` decodes (universal newlines)."""
    return read_regular(path).decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")


def _refuse_special(path: Path, st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise NotAFile(f"{path} is {kind_of(st.st_mode)}, not a regular file: modelbuild hashes only regular files")


def hash_file(path: Path) -> str:
    """The file's content digest; anything but a regular file is ``NotAFile`` (never a read
    that blocks on a named pipe or runs on without end on a device)."""
    st = os.stat(path)
    _refuse_special(path, st)
    if st.st_size >= MMAP_MIN_BYTES:
        return blake3.blake3(max_threads=blake3.blake3.AUTO).update_mmap(str(path)).hexdigest()
    with open(path, "rb") as handle:
        return blake3.blake3(handle.read()).hexdigest()


def hash_json(value) -> str:
    """Digest of a JSON-able value in canonical form (sorted keys, no whitespace)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return blake3.blake3(text.encode()).hexdigest()


class StatCache:
    """path -> (inode, size, mtime_ns, ctime_ns) -> digest, in a small sqlite file.

    One connection per thread (doit's parallel thread mode calls in from several threads).
    Several processes may share the file: sqlite locks it, and a lost write only costs a re-hash.
    """

    def __init__(self, db_path: Path):
        self.db_path = Path(db_path)
        self._local = threading.local()

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.db_path, timeout=60, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, ino INTEGER, size INTEGER,"
                " mtime_ns INTEGER, ctime_ns INTEGER, hashed_ns INTEGER, digest TEXT)"
            )
            self._local.db = db
        return db

    def digest(self, path: Path) -> str:
        path = Path(path).resolve()
        st = os.stat(path)
        _refuse_special(path, st)
        identity = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        row = self._db().execute(
            "SELECT ino, size, mtime_ns, ctime_ns, hashed_ns, digest FROM files WHERE path = ?", (str(path),)
        ).fetchone()
        if row and tuple(row[:4]) == identity and st.st_mtime_ns + RACY_NS < row[4]:
            return row[5]
        hashed_ns = time.time_ns()
        digest = hash_file(path)
        after = os.stat(path)
        if (after.st_ino, after.st_size, after.st_mtime_ns, after.st_ctime_ns) != identity:
            # Changed while we read it: the digest describes no real state of the file.
            return self.digest(path)
        self._db().execute(
            "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?)", (str(path), *identity, hashed_ns, digest)
        )
        return digest


def walk_files(root: Path, exclude: tuple[str, ...] = ()):
    """(relative posix path, path) of every file under ``root``, in sorted order.

    A symbolic link is followed only while it stays inside ``root``: one that leads out of it
    (``config.json -> /etc/passwd``) is a ``UserError``, so no file the user did not put in the
    folder ends up in an artifact, the cache or a shared remote cache. Anything but a regular file
    or a folder, there or where a link leads (a named pipe, a device, a socket), is
    ``NotAFile``: reading it would block or never end. One lstat per entry, as the link check took.
    """
    root = Path(root)
    real_root = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        for name in [*dirnames, *filenames]:
            full = Path(dirpath) / name
            try:
                mode = os.lstat(full).st_mode
                if stat.S_ISLNK(mode):
                    if not full.resolve().is_relative_to(real_root):
                        raise UserError(f"{(rel_dir / name).as_posix()} is a symbolic link to {full.resolve()}, outside "
                                        f"{root.name}/; copy the file in if it belongs to the input")
                    mode = os.stat(full).st_mode
            except FileNotFoundError:
                continue  # gone since it was listed, or a dangling link: the digest says it is missing
            if what := special(mode):
                raise NotAFile(f"{(rel_dir / name).as_posix()} is {what}, not a file or a folder: remove it from {root.name}/")
        dirnames[:] = sorted(d for d in dirnames if (rel_dir / d).as_posix() not in exclude)
        for filename in sorted(filenames):
            rel = (rel_dir / filename).as_posix()
            if rel not in exclude:
                yield rel, Path(dirpath) / filename


def tree_manifest(root: Path, stat_cache: StatCache, exclude: tuple[str, ...] = ()) -> dict[str, dict]:
    """{relative posix path: {"size", "digest"}} for every file under ``root``, sorted."""
    manifest = {rel: {"size": full.stat().st_size, "digest": stat_cache.digest(full)}
                for rel, full in walk_files(root, exclude)}
    return dict(sorted(manifest.items()))


def input_digest(path: Path, stat_cache: StatCache) -> str:
    """A file's content digest, or for a folder the digest of its manifest."""
    path = Path(path)
    if path.is_dir():
        return hash_json(tree_manifest(path, stat_cache))
    return stat_cache.digest(path)
