"""The remote tier of the cache, as the executor uses it: configuration, restore, push, faults.

``stage.build()`` asks the local ``cache/`` first (store.py); on a local miss it asks the remote
tier here (an S3 bucket, remote.py), which downloads and re-hashes every object, and the stage's
outputs then fill the local tier. A stage that ran pushes its outputs, objects first and the
action entry last (an output a Ray worker left on the remote: the entry alone). Nothing here
decides whether a stage is up to date (status.py does), nor which outputs come down (download.py).

Configuration: ``MODELBUILD_REMOTE_CACHE=s3://bucket/prefix`` (``off``: no remote) or a ``[cache]``
table in one targets/*.toml (``remote``, ``push = true``, ``required = false``; validated in
project.py); ``MODELBUILD_REMOTE_PUSH`` and ``MODELBUILD_REMOTE_REQUIRED`` (booleans, settings.py)
override the table's. Endpoint and credentials come only from the AWS chain, inside remote.py.

Faults, per doit process:
* unreachable (server down, wrong bucket or keys): one warning line, then local-only for the rest
  of the run; with ``required`` a one-line error before any stage runs (``check_remote``), and a
  stage that meets it mid-run fails with one line;
* a corrupt or truncated remote object: reported, never served, the stage rebuilt; with ``push``
  the rebuilt objects replace the bad ones, so the remote is repaired;
* a push that fails (server killed mid-push): the stage is built and in the local cache, a
  warning says so, and its key is queued in ``cache/remote-pending/``: the next run pushes it
  (objects already there are skipped) before anything else.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

from .. import UserError, say
from ..core import settings
from ..core.digest import hash_file
from ..core.project import Project
from ..core.run import UNSET
from ..core.signing import unsigned
from ..core.stamp import action_entry
from .audit import denial, refusal
from .store import Store, entry_problem

ENV_KEY, ENV_TRUSTED = "MODELBUILD_SIGNING_KEY", "MODELBUILD_TRUSTED_KEYS"

ENV_URL, ENV_PUSH, ENV_REQUIRED = "MODELBUILD_REMOTE_CACHE", "MODELBUILD_REMOTE_PUSH", "MODELBUILD_REMOTE_REQUIRED"
PENDING = "remote-pending"  # folder in the local cache: keys whose push has not completed


class RemoteRequired(Exception):
    """The remote is required and cannot be used: the stage fails with this one line."""


@dataclass(frozen=True)
class RemoteConfig:
    url: str
    push: bool
    required: bool
    required_from: str  # where ``required`` came from, for its error message


@dataclass(frozen=True)
class Trust:
    """Who signs what this builder pushes, and whose remote entries it serves.

    ``signer``: the builder's key (signing.Signer) or None: entries go up unsigned. ``trusted``:
    key id -> public key, the builder's own included; None when no trusted keys are set (then
    remote entries are not signature-checked, as before #24)."""
    signer: object
    trusted: dict | None

    def problem(self, entry: dict) -> str | None:
        """Why a remote entry must not be served by these keys, or None (always None unchecked)."""
        if self.trusted is None:
            return None
        from ..core.signing import signature_problem

        return signature_problem(entry, self.trusted)[0]

    def describe(self) -> str:
        signing = f"pushes signed by key {self.signer.key_id}" if self.signer else "pushes unsigned (no signing key)"
        if self.trusted is None:
            return f"remote entries are not signature-checked (set {ENV_TRUSTED} or [cache] trusted_keys); {signing}"
        return f"remote entries served only when signed by {', '.join(sorted(self.trusted))}; {signing}"


def trust_config(project: Project, env: settings.Settings | None = None) -> Trust:
    """The signing key and the trusted keys, from the environment or the [cache] table (the
    environment wins). A missing file or a key of the wrong kind is one line naming it. Paths in
    the table are relative to the project folder; in the environment, to the current folder."""
    from ..core.signing import key_id, load_public, load_signer

    env = settings.current() if env is None else env
    table = project.cache
    where = f"{project.cache_from}: cache"
    signer = None
    if env.signing_key:
        signer = load_signer(Path(env.signing_key), ENV_KEY)
    elif table.get("signing_key"):
        signer = load_signer(project.root / table["signing_key"], f"{where}.signing_key")
    if env.trusted_keys is not None:
        named = [(Path(p), ENV_TRUSTED) for p in env.trusted_keys]
    elif "trusted_keys" in table:
        named = [(project.root / p, f"{where}.trusted_keys") for p in table["trusted_keys"]]
    else:
        return Trust(signer, None)
    trusted = {}
    for path, source in named:
        public = load_public(path, source)
        trusted[key_id(public)] = public
    if signer is not None:
        trusted[signer.key_id] = signer.public  # the builder's own key is trusted implicitly
    return Trust(signer, trusted)


def remote_config(project: Project, env: settings.Settings | None = None) -> RemoteConfig | None:
    """The remote tier this project uses, or None. The environment overrides the [cache] table."""
    table = project.cache
    env = settings.current() if env is None else env
    if env.remote_cache == "off":
        return None
    url = env.remote_cache or table.get("remote")
    if not url:
        return None
    push, required = env.remote_push, env.remote_required
    return RemoteConfig(url, table.get("push", True) if push is None else push,
                        table.get("required", False) if required is None else required,
                        f"{ENV_REQUIRED}=1" if required is not None else f"{project.cache_from}: cache.required = true")


def other_branches(remote, components: dict) -> list[str]:
    """The CPU numerics branches (numerics.py) other than this one under which ``remote`` holds
    this very action: the key these components would have with ``cpu_numerics`` set to each
    other branch, looked up (at most three small GETs). An action of another machine matches only
    when everything else in its key does (inputs, pass, libraries, platform): then a pin is what
    keeps the two machines from sharing."""
    from ..core.key import key_of
    from ..core.numerics import BRANCHES

    here = components.get("cpu_numerics")
    if here not in BRANCHES:  # "native" (not x86): nothing to pin, nothing another branch shares
        return []
    found = []
    for name in BRANCHES:
        if name != here:
            key = key_of({**components, "cpu_numerics": name})
            entry = remote.lookup(key)
            if entry is not None and not entry_problem(key, entry):
                found.append(name)
    return found


def share_hint(here: str, others: list[str], what: str) -> str:
    """One line: the remote holds ``what`` built under other branches, and the pin that shares it.
    The pin is the narrowest of the branches met, which every machine among them can run."""
    from ..core.numerics import BRANCHES

    narrowest = max([here, *others], key=list(BRANCHES).index)
    return (f"the remote cache holds {what} built on CPU numerics branch {', '.join(others)}, not this machine's "
            f"{here}: to share one cache, pin [devices] cpu_numerics = \"{narrowest}\" in the project "
            f"(or MODELBUILD_CPU_NUMERICS={narrowest} on every machine)")


class RemoteTier:
    """One remote cache for one doit process (thread-safe: ``doit -n N`` runs stages in threads)."""

    def __init__(self, config: RemoteConfig, store: Store, trust: Trust | None = None):
        self.config = config
        self.store = store
        self.trust = trust or Trust(None, None)
        self._lock = threading.Lock()
        self._remote = None
        self._down: str | None = None  # why it is unusable for the rest of this run
        self._bad: dict[str, tuple[str, ...]] = {}  # action key -> corrupt remote digests to replace
        self._missed = False  # the first miss of the run looks for the action under other CPU numerics branches

    @property
    def url(self) -> str:
        return self.config.url

    def _client(self):
        """The RemoteStore, connected and answering (checked once), or None when it is down."""
        from .remote import RemoteError, RemoteStore  # obstore: only when a stage needs the remote

        with self._lock:
            if self._remote is None and self._down is None:
                try:
                    remote = RemoteStore.from_url(self.url)
                    remote.ping()
                    self._remote = remote
                except RemoteError as error:
                    self._went_down(error)
            if self._down and self.config.required:  # every stage that needs it fails, not only the first
                raise self._required()
            return None if self._down else self._remote

    def client(self):
        """The RemoteStore for code that moves files through the remote itself (the Ray executor),
        or None when it is down for this run (RemoteRequired when it is required)."""
        return self._client()

    def _required(self) -> RemoteRequired:
        return RemoteRequired(f"remote cache {self.url} unreachable: {self._down}; it is required "
                              f"({self.config.required_from})")

    def _went_down(self, error: Exception, warn: bool = True) -> None:
        """Local-only from now on; one warning line per run (or RemoteRequired)."""
        reason = getattr(error, "reason", None) or str(error)
        first = self._down is None
        self._down = reason
        if self.config.required:
            raise self._required()
        if first and warn:
            say(f"remote cache {self.url} unreachable: {reason}; building with the local cache only")

    def check(self) -> None:
        """At load: reach the remote now when it is required (one line and exit otherwise), and push
        what earlier runs could not."""
        if self.config.required:
            try:
                remote = self._client()
            except RemoteRequired as error:
                raise UserError(str(error)) from None
            assert remote is not None
        if self.config.push and any(self._pending_dir().glob("*")):
            try:
                self.push_pending()
            except RemoteRequired as error:
                raise UserError(str(error)) from None

    # -- restore ---------------------------------------------------------------------------

    def restore(self, name: str, key: str, dest: Path, download: bool = True, components: dict | None = None) -> dict | None:
        """Fetch the action's outputs into ``dest`` (an empty folder); the entry, or None on a miss.

        A remote entry is served only if it is self-consistent (store.entry_problem, as for a
        local one), no rebuild audit here found other bytes (audit.denial), it is signed by a
        trusted key where keys are trusted, and every object re-hashes to its digest (remote.fetch); anything else is
        reported and the caller builds the stage. ``download=False`` (download.py): the entry is
        served if the remote holds every object it names, and nothing is fetched. On the run's
        first miss, ``components`` (the action's key components) are looked up under the other CPU
        numerics branches: one line says when the remote holds the action built on another.
        """
        from .remote import RemoteCorrupt, RemoteUnavailable

        remote = self._client()
        if remote is None:
            return None
        with self._lock:
            if key in self._bad:  # found bad earlier in this run (a download by digest): no second try
                return None
        try:
            entry = remote.lookup(key)
            if entry is None:
                self._first_miss(remote, name, components)
                return None
            problem = entry_problem(key, entry)
            if problem:
                say(f"'{name}': remote cache entry {key[:12]}… is {problem}: never served; building")
                with self._lock:
                    self._bad[key] = ()
                return None
            denied = denial(self.store.root, key, entry)
            if denied:  # a rebuild audit here built other bytes: never served, whoever signed it
                say(f"'{name}': remote cache entry {key[:12]}… {refusal(denied, entry)}: never served; rebuilding")
                with self._lock:
                    self._bad[key] = ()
                return None
            distrust = self.trust.problem(entry)
            if distrust:  # unsigned, another key, or a signature that does not match: never served
                say(f"'{name}': remote cache {self.url}: {distrust}: rebuilding")
                with self._lock:
                    self._bad[key] = ()
                return None
            entry = unsigned(entry)
            if not download:
                lacking = remote.lacking(entry["manifest"])
                if lacking:
                    say(f"'{name}': remote cache entry {key[:12]}… names {len(lacking)} object(s) the remote "
                        "does not have: never served; building")
                    return None
                say(f"'{name}': on the remote cache (built in {entry['seconds']} s); left there, not downloaded")
                return entry
            stats = remote.fetch(entry, dest)
        except RemoteCorrupt as error:
            say(f"'{name}': {error}; never served, building")
            with self._lock:
                self._bad[key] = error.digests
            return None
        except RemoteUnavailable as error:
            self._went_down(error)
            return None
        say(f"'{name}': restored from the remote cache (built in {entry['seconds']} s; "
            f"{stats['bytes'] / 1e6:.1f} MB downloaded)")
        return entry

    def _first_miss(self, remote, name: str, components: dict | None) -> None:
        with self._lock:
            if self._missed or components is None:
                return
            self._missed = True
        others = other_branches(remote, components)
        if others:
            say(f"'{name}': not on the remote cache; {share_hint(components['cpu_numerics'], others, 'it')}")

    def download(self, name: str, entry: dict, dest: Path) -> bool:
        """Fetch the outputs an entry names into ``dest`` by their digests (an output left on the
        remote, now needed here). False, said why, if the remote cannot give them back."""
        from .remote import RemoteCorrupt, RemoteUnavailable

        remote = self._client()
        if remote is None:
            return False
        try:
            stats = remote.fetch(entry, dest)
        except RemoteCorrupt as error:
            say(f"'{name}': {error}; never served")
            with self._lock:  # a rebuild's push replaces these objects, repairing the remote
                self._bad[entry["action_key"]] = error.digests
            return False
        except RemoteUnavailable as error:
            self._went_down(error)
            return False
        say(f"'{name}': downloaded from the remote cache ({stats['bytes'] / 1e6:.1f} MB)")
        return True

    # -- push ------------------------------------------------------------------------------

    def push(self, name: str, entry: dict, out_dir: Path) -> None:
        """Push a stage that ran: its outputs in ``out_dir``, then its entry. A failure leaves the
        stage built locally, says so, and queues the key for the next run."""
        if not self.config.push:
            return
        if entry.get("left_on_remote"):  # ran on a Ray worker, which pushed the objects: the entry goes up
            entry, files = action_entry(entry), {}
        else:
            files = {info["digest"]: out_dir / rel for rel, info in entry["manifest"].items()}
        self._push(name, entry, files)

    def _push(self, name: str, entry: dict, files: dict[str, Path]) -> bool:
        from .remote import RemoteUnavailable

        key = entry["action_key"]
        only_entry = None if files else entry  # a Ray-built output: its objects are on the remote already
        try:
            remote = self._client()
        except RemoteRequired:
            self._queue(key, only_entry)
            raise
        if remote is None:
            self._queue(key, only_entry)  # unreachable this run: the next run pushes it
            return False
        with self._lock:
            replace = self._bad.get(key, ())
        try:
            stats = remote.push(entry, files, replace=replace, signer=self.trust.signer)
        except RemoteUnavailable as error:
            self._queue(key, only_entry)
            where = "its outputs on the remote, its entry queued" if only_entry else "in the local cache"
            say(f"'{name}': push to the remote cache {self.url} failed: {error.reason}; the stage is built and "
                f"{where}, the next run pushes it")
            self._went_down(error, warn=False)
            return False
        with self._lock:
            self._bad.pop(key, None)
        (self._pending_dir() / key).unlink(missing_ok=True)
        say(f"'{name}': pushed to the remote cache ({stats['uploaded']} objects, "
            f"{stats['uploaded_bytes'] / 1e6:.1f} MB; {stats['skipped']} already there)")
        return True

    def _pending_dir(self) -> Path:
        return self.store.root / PENDING

    def _queue(self, key: str, entry: dict | None = None) -> None:
        """Remember a push to finish: the key (its entry and objects are in the local cache), or the
        entry itself when its objects are only on the remote (an output a Ray worker left there)."""
        self._pending_dir().mkdir(parents=True, exist_ok=True)
        marker = self._pending_dir() / key
        if entry is None:
            marker.touch()
        else:
            marker.write_text(json.dumps(entry, sort_keys=True))

    def push_pending(self) -> None:
        """Push the stages whose push an earlier run could not finish: from the local cache, or (an
        entry whose objects a Ray worker left on the remote) the entry alone once the remote holds them."""
        for marker in sorted(self._pending_dir().glob("*")):
            entry = self.store.lookup(marker.name)
            if entry is None:
                from .remote import RemoteUnavailable

                entry = _queued_entry(marker)
                remote = self._client() if entry else None
                try:
                    lacking = remote.lacking(entry["manifest"]) if remote is not None else set()
                except RemoteUnavailable as error:
                    self._went_down(error)
                    return
                if entry is None or lacking:
                    marker.unlink(missing_ok=True)  # nothing left to push from here
                    continue
                if not self._push(entry.get("target", marker.name[:12]), entry, {}):
                    return
                continue
            files = {info["digest"]: self.store.object_path(info["digest"]) for info in entry["manifest"].values()}
            if not all(p.exists() and hash_file(p) == d for d, p in files.items()):
                marker.unlink(missing_ok=True)  # gone from the local cache since: nothing to push
                continue
            if not self._push(entry.get("target", marker.name[:12]), entry, files):
                return


def _queued_entry(marker: Path) -> dict | None:
    """The entry a pending marker holds (see RemoteTier._queue), if it holds a valid one."""
    try:
        entry = json.loads(marker.read_text() or "null")
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("action_key") != marker.name or entry_problem(marker.name, entry):
        return None
    return entry


def remote_tier(project: Project) -> RemoteTier | None:
    """The remote tier of this run (core/run.py), or None without a remote."""
    run = project.run
    with run.lock:
        if run.remote_tier is UNSET:
            config = remote_config(project)
            run.remote_tier = RemoteTier(config, Store(project.cache_dir), trust_config(project)) if config else None
    return run.remote_tier


def check_remote(project: Project) -> None:
    """Before any stage runs: a bad setting, or a required remote that does not answer, is one line."""
    tier = remote_tier(project)
    if tier is not None:
        tier.check()
    else:
        trust_config(project)  # a bad key file is one line even while no remote is set
