"""The remote tier of the content-addressed cache: the same layout as ``cache/``, in an S3 bucket.

``s3://bucket/prefix`` holds ``objects/<2 hex>/<rest>`` (one object per BLAKE3 digest) and
``actions/<key>.json`` (the stamp of a finished stage), exactly like store.py's folder, so a
team, CI and Ray workers share what any of them built. With a signing key the entry carries a
``signature`` field (signing.py: over its key, key components, manifest and signer id), written
in the same PUT; readers with trusted keys serve only entries signed by one (tiers.py). Any S3-compatible store works (AWS,
SeaweedFS, MinIO, Ceph, R2, ...).

Why it is safe to share:
* Objects are named by content: two machines pushing the same action write identical bytes, and
  an object that is already there is never uploaded again. The action entry is one PUT, written
  after all its objects, so a reader never sees an entry whose objects are missing; a push killed
  half-way leaves no entry (and an unfinished multipart upload is invisible to readers).
* Nothing remote is trusted: every downloaded object is re-hashed before it is renamed into
  place, so a corrupt or truncated object is reported (RemoteCorrupt, naming file and digest) and
  never served.
* Endpoint and credentials come only from the standard AWS chain (AWS_ENDPOINT_URL[_S3],
  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION, AWS_PROFILE with
  ~/.aws/credentials and ~/.aws/config, or the container/instance roles object_store reads). They
  are never arguments, never written to files, and scrubbed from every message this module raises.
* An unreachable server fails fast (2 s connect timeout, 2 retries) with RemoteUnavailable, a
  one-line message naming the URL, so a build can warn and go on local-only, or stop when the
  remote is required.

Client: obstore (Rust object_store), chosen by bench/s3_clients_bench.py against SeaweedFS here:
1,000 small objects 1.6x (up) and 2.9x (down) faster than boto3, a 500 MB object on par (upload
is bound by the server on this machine; the lead changed sides between runs), and no dependency
beyond typing-extensions (boto3 pins python-dateutil < 3, below this project's pin; s3fs brings
aiobotocore + aiohttp and was slowest throughout). Its blocking calls release the GIL, so plain
thread pools move many objects and the parts of large ones in parallel. Its asyncio API is not
used: with obstore 0.12.1 a process that used it under asyncio.run() aborted (SIGABRT) at
interpreter exit about one time in three, after the work had succeeded.
"""

from __future__ import annotations

import configparser
import contextlib
import json
import os
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlparse

import obstore
from obstore.store import S3Store

from ..core.digest import hash_file
from ..core.signing import signed

PART = 16 << 20  # multipart part size and the size above which downloads go by parallel ranges
PARALLEL_FILES = 8  # objects in flight at once
PARALLEL_PARTS = 8  # parts of one large object in flight at once
CLIENT_OPTIONS = {"connect_timeout": "2s", "timeout": "120s"}  # timeout: one request (a part at most)
NOT_FOUND = (FileNotFoundError, obstore.exceptions.NotFoundError)  # obstore raises the former
RETRY = {"max_retries": 2, "retry_timeout": timedelta(seconds=15),
         "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=1), "base": 2}}


class RemoteError(Exception):
    """Something about the remote cache; the message is one line and never contains a secret."""


class RemoteUnavailable(RemoteError):
    """The remote cache cannot be used right now (unreachable, refused, failing)."""


class RemoteCorrupt(RemoteError):
    """Remote objects whose bytes do not match their digest (or are missing); nothing was served."""

    def __init__(self, url: str, problems: list[str], digests: tuple[str, ...] = ()):
        self.problems = problems
        self.digests = digests  # the bad objects: a push that repairs the remote uploads them again
        super().__init__(f"remote cache {url}: {len(problems)} bad object(s): {'; '.join(problems)}")


def _aws_settings() -> dict:
    """What the environment lacks, taken from the AWS profile files, plus allow_http for http://.

    object_store reads the AWS_* variables itself; profiles it does not read, so their static keys,
    region and endpoint_url are read here (environment first, as every AWS SDK does).
    """
    env = os.environ
    profile = env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE") or "default"
    paths = [os.path.expanduser(env.get(var, default)) for var, default in
             (("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"), ("AWS_CONFIG_FILE", "~/.aws/config"))]
    files = configparser.RawConfigParser(), configparser.RawConfigParser()
    for parser, path in zip(files, paths):
        try:
            parser.read(path)
        except configparser.Error:  # its message quotes the offending line: it may hold a key
            raise RemoteError(f"AWS profile file {path} cannot be parsed") from None
    section = profile if profile == "default" else f"profile {profile}"
    creds = dict(files[0].items(profile)) if files[0].has_section(profile) else {}
    conf = dict(files[1].items(section)) if files[1].has_section(section) else {}
    settings = {}
    if not env.get("AWS_ACCESS_KEY_ID"):
        for name in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token"):
            if value := creds.get(name) or conf.get(name):
                settings[name.removeprefix("aws_")] = value
    if not (env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")):
        settings["region"] = conf.get("region", "us-east-1")
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or env.get("AWS_ENDPOINT")
    if not endpoint and conf.get("endpoint_url"):
        endpoint = settings["endpoint"] = conf["endpoint_url"]
    settings["allow_http"] = bool(endpoint and endpoint.startswith("http://"))  # the user chose http
    return settings


def _short_reason(text: str) -> str:
    """The part of an object_store error a user acts on: the S3 status and error code, or the
    connection failure; the request line (method, path, timings) is left out."""
    if status := re.search(r"status code: (\d{3})", text):
        code = re.search(r"<Code>([^<]{1,64})</Code>", text)
        return f"HTTP {status.group(1)}" + (f" {code.group(1)}" if code else "")
    retries = re.search(r"after (\d+) retries", text)
    for needle, what in (("error sending request", "no connection to the S3 endpoint"),
                         ("timed out", "the S3 endpoint timed out"), ("connection reset", "the connection was reset"),
                         ("connection closed", "the connection was closed")):
        if needle in text.lower():
            return what + (f" (after {retries.group(1)} retries)" if retries else "")
    return text


class RemoteStore:
    """One ``s3://bucket/prefix`` cache. Blocking methods, safe to call from several threads."""

    def __init__(self, url: str, store: S3Store, secrets: tuple[str, ...]):
        self.url = url
        self._store = store
        self._secrets = tuple(s for s in secrets if s)  # scrubbed from messages (keys, the endpoint)

    @classmethod
    def from_url(cls, url: str) -> "RemoteStore":
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"remote cache must be s3://bucket[/prefix], not {url!r}")
        settings = _aws_settings()
        allow_http = settings.pop("allow_http")
        prefix = parsed.path.strip("/") or None
        store = S3Store(parsed.netloc, prefix=prefix, config=settings,
                        client_options={**CLIENT_OPTIONS, "allow_http": allow_http}, retry_config=RETRY)
        secrets = [os.environ.get(f"AWS_{name.upper()}") or settings.get(name)
                   for name in ("secret_access_key", "session_token", "access_key_id")]
        endpoint = (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                    or os.environ.get("AWS_ENDPOINT") or settings.get("endpoint") or "").rstrip("/")
        if endpoint:  # where the team's server is: no business of logs and error messages either
            secrets += [endpoint, urlparse(endpoint).netloc]
        return cls(f"s3://{parsed.netloc}/{prefix or ''}".rstrip("/"), store, tuple(s for s in secrets if s))

    # -- helpers ---------------------------------------------------------------------------

    @staticmethod
    def object_key(digest: str) -> str:
        return f"objects/{digest[:2]}/{digest[2:]}"

    def _error(self, error: BaseException) -> RemoteUnavailable:
        """A one-line, secret-free RemoteUnavailable from a client error."""
        text = " ".join(str(error).split()).split(" Debug source:")[0] or type(error).__name__
        for secret in sorted(self._secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        reason = _short_reason(text)[:300]
        unavailable = RemoteUnavailable(f"remote cache {self.url} unavailable: {reason}")
        unavailable.reason = reason
        return unavailable

    @contextlib.contextmanager
    def _client(self):
        """Client errors -> RemoteUnavailable, never chained (the original could carry request
        details). Local file errors are raised outside this block, as themselves."""
        try:
            yield
        except (obstore.exceptions.BaseError, OSError) as error:
            raise self._error(error) from None

    @staticmethod
    def _parallel(limit: int, fn, items) -> list:
        items = list(items)
        if len(items) <= 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(min(limit, len(items))) as pool:
            return list(pool.map(fn, items))

    def _head(self, key: str) -> dict | None:
        with self._client():
            try:
                return obstore.head(self._store, key)
            except NOT_FOUND:
                return None

    def _get(self, key: str) -> bytes | None:
        with self._client():
            try:
                return obstore.get(self._store, key).bytes()
            except NOT_FOUND:
                return None

    def _list(self, prefix: str) -> list[dict]:
        with self._client():
            return [meta for batch in obstore.list(self._store, prefix=prefix, chunk_size=1000) for meta in batch]

    def _has(self, digests: set[str]) -> set[str]:
        """HEAD each digest, or list the two-hex-digit folders they fall in when that is fewer
        requests (1,000 digests touch at most 256 folders)."""
        folders = sorted({d[:2] for d in digests})
        if len(digests) <= len(folders) * 2:
            ordered = sorted(digests)
            found = self._parallel(32, lambda d: self._head(self.object_key(d)) is not None, ordered)
            return {d for d, ok in zip(ordered, found) if ok}
        listings = self._parallel(32, lambda f: self._list(f"objects/{f}/"), folders)
        present = {meta["path"].removeprefix("objects/").replace("/", "", 1) for batch in listings for meta in batch}
        return digests & present

    def _upload(self, path: Path, key: str) -> None:
        """A file -> an object: one PUT, or above PART a multipart upload of parallel parts
        streamed from disk (an unfinished one is invisible to readers)."""
        if path.stat().st_size <= PART:
            data = path.read_bytes()
            with self._client():
                obstore.put(self._store, key, data)
        else:
            with self._client():
                obstore.put(self._store, key, path, chunk_size=PART, max_concurrency=PARALLEL_PARTS)

    def _download(self, key: str, path: Path, size: int | None) -> bool:
        """Object -> file (False if it does not exist): one GET, or parallel ranged GETs for a
        large object (each request stays well inside the per-request timeout)."""
        if size is None or size > PART:
            meta = self._head(key)
            if meta is None:
                return False
            size = meta["size"]
        if size <= PART:
            data = self._get(key)
            if data is None:
                return False
            path.write_bytes(data)
            return True
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            def part(start: int) -> None:  # written as it arrives: 2x faster here than whole ranges
                with self._client():
                    chunks = obstore.get(self._store, key, options={"range": (start, min(start + PART, size))})
                    for chunk in chunks.stream(min_chunk_size=1 << 20):
                        start += os.pwrite(fd, chunk, start)
            self._parallel(PARALLEL_PARTS, part, range(0, size, PART))
        finally:
            os.close(fd)
        return True

    def _check(self, key: str, digest: str, path: Path, size: int | None) -> str | None:
        """Download ``key`` to ``path`` and re-hash it; None if intact, else why not."""
        if not self._download(key, path, size):
            return "missing"
        actual = hash_file(path)
        return None if actual == digest else f"corrupt (content hashes to {actual[:12]}…, {path.stat().st_size} bytes)"

    # -- the cache API ---------------------------------------------------------------------

    def has_objects(self, digests) -> set[str]:
        """Which of ``digests`` the remote holds."""
        digests = set(digests)
        return self._has(digests) if digests else set()

    def lacking(self, manifest: dict) -> set[str]:
        """The digests of a manifest's files that the remote does not hold."""
        digests = {info["digest"] for info in manifest.values()}
        return digests - self.has_objects(digests)

    def lookup(self, key: str) -> dict | None:
        """The action entry for ``key``, or None (absent or unreadable: a miss, never a crash)."""
        data = self._get(f"actions/{key}.json")
        try:
            return json.loads(bytes(data)) if data is not None else None
        except ValueError:
            return None

    def push(self, entry: dict, files: dict[str, Path], replace=(), signer=None) -> dict:
        """Upload the objects the remote lacks (multipart and parallel above PART), then the entry.

        ``files`` maps digest -> a local file with that content (the local store's objects or the
        stage's output; objects the remote already has need none); ``replace``: digests to upload even though the remote has them (objects
        a fetch found corrupt: the push repairs them); ``signer`` (signing.Signer): the entry goes
        up with its ``signature`` field, in the same PUT. Returns counts: objects uploaded and
        skipped, bytes uploaded.
        """
        needed = {info["digest"] for info in entry["manifest"].values()}
        missing = sorted((needed - self._has(needed)) | (needed & set(replace)))
        if lacking := set(missing) - set(files):  # an entry never goes up before its objects
            raise ValueError(f"push of {entry.get('action_key')}: no local file for digest(s) {sorted(lacking)}")
        self._parallel(PARALLEL_FILES, lambda d: self._upload(Path(files[d]), self.object_key(d)), missing)
        body = json.dumps(signed(entry, signer), indent=1, sort_keys=True).encode()  # as store.py writes it
        with self._client():
            obstore.put(self._store, f"actions/{entry['action_key']}.json", body)  # last, in one PUT
        return {"uploaded": len(missing), "skipped": len(needed) - len(missing),
                "uploaded_bytes": sum(Path(files[d]).stat().st_size for d in missing)}

    def fetch(self, entry: dict, dest: Path) -> dict:
        """Download an entry's outputs into ``dest``: all or nothing.

        Every object lands in a temporary folder inside ``dest``, is re-hashed, and only when all
        match their digests are they renamed into place. Otherwise RemoteCorrupt names each bad
        file and digest, and nothing is written into ``dest``.
        """
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".remote-fetch-", dir=dest))
        try:
            by_digest = {}
            for rel, info in entry["manifest"].items():
                by_digest.setdefault(info["digest"], (rel, info.get("size")))
            results = self._parallel(PARALLEL_FILES, lambda item: self._check(
                self.object_key(item[0]), item[0], work / item[0], item[1][1]), by_digest.items())
            bad = [(d, rel, why) for (d, (rel, _)), why in zip(by_digest.items(), results) if why]
            if bad:
                raise RemoteCorrupt(self.url, [f"{rel} (object {d}) {why}" for d, rel, why in bad],
                                    tuple(d for d, _, _ in bad))
            for rel, info in entry["manifest"].items():
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                first = by_digest[info["digest"]][0]
                if first == rel:
                    os.replace(work / info["digest"], target)
                else:  # the same content under a second name
                    shutil.copyfile(dest / first, target)
            return {"files": len(entry["manifest"]), "objects": len(by_digest),
                    "bytes": sum(size or 0 for _, size in by_digest.values())}
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def ping(self) -> None:
        """One cheap request (the first page of a listing): RemoteUnavailable if the server, the
        bucket or the credentials do not answer."""
        with self._client():
            next(iter(obstore.list(self._store, prefix="actions/", chunk_size=1)), None)

    def put_file(self, key: str, path: Path) -> None:
        """Any file (a release archive, a lock) under ``key`` below the prefix."""
        self._upload(Path(path), key)

    def get_file(self, key: str, path: Path) -> bool:
        """``key`` below the prefix -> ``path``; False when there is no such object."""
        return self._download(key, Path(path), None)

    # -- maintenance -----------------------------------------------------------------------

    def info(self) -> dict:
        objects, actions = self._list("objects/"), self._list("actions/")
        return {"url": self.url, "objects": len(objects), "bytes": sum(m["size"] for m in objects),
                "actions": sum(1 for m in actions if m["path"].endswith(".json"))}

    def verify(self, drop: bool = False, trust=None) -> list[str]:
        """Re-hash every remote object; return the problems (bad objects, entries that lost one).

        With ``drop``, corrupt objects and the entries that need them are deleted, so the next
        build rebuilds and pushes them again. ``trust`` (tiers.Trust with trusted keys): entries
        that are unsigned, signed by another key or badly signed are reported too (never dropped:
        another reader may trust their signer).
        """
        objects, actions = self._list("objects/"), self._list("actions/")
        digests = [m["path"].removeprefix("objects/").replace("/", "", 1) for m in objects]
        with tempfile.TemporaryDirectory(prefix="modelbuild-verify-") as tmp:
            results = self._parallel(PARALLEL_FILES, lambda item: self._check(
                item[0]["path"], item[1], Path(tmp) / item[1], item[0]["size"]), zip(objects, digests))
        checked = dict(zip(digests, results))
        bodies = self._parallel(32, lambda m: self._get(m["path"]), actions)
        bad = {d for d, why in checked.items() if why}
        problems = [f"object {d} {checked[d]}" for d in sorted(bad)]
        dropped = []
        for meta, body in zip(actions, bodies):
            try:
                manifest = json.loads(bytes(body))["manifest"] if body is not None else {}
            except (ValueError, KeyError, TypeError):
                problems.append(f"action {meta['path']} is unreadable")
                dropped.append(meta["path"])
                continue
            transport = meta["path"].startswith("actions/ray-")  # a Ray task's inputs or result: never a stage's entry
            distrust = trust.problem(json.loads(bytes(body))) if trust and body is not None and not transport else None
            if distrust:
                problems.append(f"action {meta['path']} not served here: {distrust}")
            lost = [rel for rel, info in manifest.items() if info["digest"] in bad or info["digest"] not in checked]
            if lost:
                problems.append(f"action {meta['path']} lost {', '.join(lost)}")
                dropped.append(meta["path"])
        if drop and (dropped or bad):
            with self._client():
                obstore.delete(self._store, dropped + [self.object_key(d) for d in sorted(bad)])
        return problems
