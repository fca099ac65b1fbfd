"""The engine: bring one stage up to date safely.

Whether a stage is up to date is decided in one place, status.py; its action key is computed in
one place, key.py.

Bringing a stage up to date, under a per-action lock shared through the cache: reuse an intact
output already stamped with the key; else restore the action's outputs from the content-addressed
cache (store.py), then from the remote cache when one is configured (tiers.py, which also pushes
what ran; an output nothing here needs may stay there, download.py); else run the pass in its
own process (heavy imports, memory and device state die with it), on a device slot of this
machine or as a Ray task (executor.py), into a temporary folder beside ``build/``. Only a
complete output is stamped (key + manifest) and renamed into place, so a failure or a kill
leaves the previous output, which no longer matches the new key, or nothing.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

from .. import UserError, say
from ..core import settings
from ..exec.devices import Assignment, SlotPool, doit_jobs, machine_from
from ..core.digest import ALGORITHM, StatCache, hash_json, tree_manifest
from ..cache.download import mode as download_mode, needed_here
from ..exec.executor import check_executor, run_on_ray
from ..core.gates import check_gates, gate_failures
from ..core.key import key_components, key_of
from ..core.run import UNSET
from ..core.project import Project, Target, executor_kind, input_path
from ..core.stamp import STAMP_DIR, action_entry, read_stamp, write_stamp
from ..core.status import Fresh, Missing, Stale, status
from ..cache.store import Store
from ..cache.tiers import RemoteRequired, check_remote, remote_tier

class StageError(Exception):
    """A stage failed to build; the message is shown as doit's task failure."""


def stat_cache(project: Project) -> StatCache:
    """The run's StatCache (core/run.py), so its per-thread sqlite connection is reused across the
    uptodate checks of a run instead of reopened for every task."""
    run = project.run
    with run.lock:
        if run.stat_cache is UNSET:
            run.stat_cache = StatCache(project.state_dir / f"stat-{ALGORITHM}.sqlite3")
    return run.stat_cache


def check_state(project: Project) -> None:
    """Before anything runs: the cache folder is a writable folder, and the per-checkout state
    (doit's database, the stat cache) is readable. Each problem is one line naming the file;
    the state files only remember what was already checked, so deleting them is always safe."""
    cache = project.cache_dir
    shown_cache = f"cache folder {cache}" + (" (MODELBUILD_CACHE)" if settings.current().cache else "")
    if cache.exists() and not cache.is_dir():
        raise UserError(f"{shown_cache}: not a folder")
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"{shown_cache}: cannot be created ({error.strerror}); point MODELBUILD_CACHE at a writable folder") from None
    try:
        tempfile.TemporaryFile(dir=cache).close()  # locks and results are written there
    except OSError as error:
        raise UserError(f"{shown_cache}: not writable ({error.strerror}); the cache holds locks and results: "
                        "point MODELBUILD_CACHE at a writable folder") from None
    try:
        project.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"{project.state_dir}: cannot create the build state folder ({error.strerror})") from None
    doit_db = project.state_dir / "doit.sqlite3"
    for path, what in ((doit_db, "doit's database of finished tasks"), (stat_cache(project).db_path, "the stat cache")):
        if not path.exists():
            continue
        try:
            with contextlib.closing(sqlite3.connect(path)) as db:
                db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.DatabaseError as error:
            raise UserError(f"{path}: not a readable sqlite database ({error}); it is {what}: deleting it is safe "
                            "(outputs are re-checked by content)") from None
    check_remote(project)  # a required remote that does not answer stops here; queued pushes go out
    check_executor(project)  # Ray: the remote cache is set and the cluster answers
    download_mode(project)  # MODELBUILD_DOWNLOAD: one line if it is not a mode


def slot_pool(project: Project) -> SlotPool:
    """The device slots of this run, sized by doit's ``-n`` (core/run.py)."""
    run = project.run
    with run.lock:
        if run.slot_pool is UNSET:
            run.slot_pool = SlotPool(machine_from(project.devices, jobs=doit_jobs(run.argv or ())))
    return run.slot_pool


def is_up_to_date(project: Project, target: Target, values: dict) -> bool:
    """doit's uptodate check: status() says Fresh, and doit recorded the same key (so ``doit
    forget`` makes doit re-check the stage, as doit users expect)."""
    state = status(project, target, stat_cache(project))
    return isinstance(state, Fresh) and values.get("action_key") == state.stamp["action_key"] \
        and not _left_but_needed(project, target, state.stamp)


def _left_but_needed(project: Project, target: Target, stamp: dict, here: bool = False, needed=None) -> bool:
    """Up to date with its files on the remote, but this run needs them here (download.py)."""
    return bool(stamp.get("left_on_remote")) and (here or (needed or (lambda t: needed_here(project, t)))(target))


class Decision:
    """What ``build()`` does with a stage, as ``decide()`` chose it: ``kind`` is one of ``EXITS``.

    ``key``: the action key; ``state``: status() (None under MODELBUILD_FORCE); ``entry``: the
    local cache's entry ("restore"), or the remote's when the caller looked it up ("remote");
    ``leave``: what a remote restore or a run gets, whether the files may stay on the remote
    (download.py); ``reasons``: why, in status()'s words."""

    __slots__ = ("kind", "key", "state", "entry", "leave", "reasons")

    def __init__(self, kind: str, key: str, state, entry: dict | None = None, leave: bool = False,
                 reasons: tuple[str, ...] = ()):
        self.kind, self.key, self.state, self.entry, self.leave, self.reasons = kind, key, state, entry, leave, reasons

    def __repr__(self) -> str:
        return f"Decision({self.kind!r}, key={self.key[:12]}, reasons={self.reasons!r})"


# build()'s exits, in the order it tries them: a complete output that fails a gate; an intact
# output (reused, or its files downloaded when they were left on the remote and are needed here);
# the local cache; the remote cache; running the pass.
EXITS = ("fail", "reuse", "download", "restore", "remote", "run")


def forced() -> bool:
    """MODELBUILD_FORCE=1: the pass runs; neither an intact output nor a cache serves it."""
    return settings.current().force


def decide(project: Project, target: Target, key: str, state, *, here: bool = False, lookup=None, remote=None,
           remote_lookup=None, needed=None, past: str | None = None) -> Decision:
    """Which of build()'s exits brings ``target`` up to date: the one choice, made here both for
    ``build()`` (under its locks, then acting on it) and for ``plan`` (read-only, without locks).

    ``state``: status() for ``key``, or None under MODELBUILD_FORCE (then the pass runs).
    ``lookup(key)``: the local cache's entry or None (build: Store.lookup). ``remote``: the remote
    tier or None. ``remote_lookup(key)``: the remote's entry or None, for a caller that must know
    now (plan); without it "remote" means "ask the remote, run the pass on a miss" (build's
    restore asks and fetches in one go). ``needed(target)``: must its files be in build/ at the
    end of this run (download.needed_here). ``past``: the exit that was tried and could not serve
    (a download or a restore that met a missing or corrupt object): the choice goes on after it.
    """
    needed = needed or (lambda t: needed_here(project, t))
    after = EXITS.index(past) + 1 if past else 0
    if state is not None and after <= EXITS.index("download"):
        if isinstance(state, Stale) and state.why == "gates":
            return Decision("fail", key, state, reasons=state.reasons)
        if isinstance(state, Fresh):
            left = _left_but_needed(project, target, state.stamp, here, needed)
            return Decision("download" if left else "reuse", key, state)
    reasons = _reasons(state)
    if state is not None and after <= EXITS.index("restore"):
        entry = lookup(key) if lookup else None
        if entry is not None:
            return Decision("restore", key, state, entry, reasons=reasons)
    leave = remote is not None and not here and not needed(target)
    if state is not None and remote is not None and after <= EXITS.index("remote"):
        entry = remote_lookup(key) if remote_lookup else None
        if entry is not None or remote_lookup is None:
            return Decision("remote", key, state, entry, leave, reasons)
    return Decision("run", key, state, leave=leave, reasons=reasons)


def _reasons(state) -> tuple[str, ...]:
    if state is None:
        return ("MODELBUILD_FORCE=1",)
    if isinstance(state, Missing):
        return (state.reason,)
    if isinstance(state, Stale):
        return state.reasons
    return (f"its files, left on {state.stamp.get('left_on_remote')}, could not be downloaded",)


def build(project: Project, target: Target, here: bool = False) -> dict:
    """Bring the target's output up to date, the cheapest way that is correct.

    Under a lock on the action (shared by every process using the cache) and one on the
    output folder: reuse an intact output already stamped with this key (a run killed after the
    stage finished), else restore the action's outputs from the cache, else run the pass.
    MODELBUILD_FORCE=1 skips both shortcuts: the pass runs (``doit forget T`` + force = rerun T).
    ``here``: the files must end up in build/ even if this doit run did not ask for the target
    (a stage about to run needs them, and the remote could not give them by digest).
    Which exit is decide()'s choice, the same one ``python -m modelbuild plan`` shows; this acts on it.
    """
    force = forced()
    cache = stat_cache(project)
    components = key_components(project, target, cache)
    missing = [k for k, v in components["inputs"].items() if v is None]
    if missing:
        raise StageError(f"{target.named}: upstream output missing for input {', '.join(missing)}")
    key = key_of(components)
    store = Store(project.cache_dir)
    remote = remote_tier(project)
    final = project.output_dir(target.name)
    project.build_dir.mkdir(parents=True, exist_ok=True)
    with store.lock(key, f"'{target.name}'"), store.lock(_target_lock_name(project, target), f"'{target.name}'"):
        for stale in project.build_dir.glob(f".{target.name}~*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed run: we hold the target lock
        decision = decide(project, target, key, None if force else status(project, target, cache), here=here,
                          lookup=store.lookup, remote=remote)
        if decision.kind == "fail":
            shutil.rmtree(final)  # a complete output that fails its gates must not look up to date
            raise StageError(f"{target.named}: {'; '.join(decision.reasons)}")
        if decision.kind == "download":
            if _download_left(project, target, decision.state.stamp, store, remote):
                return {"action_key": key}
            decision = decide(project, target, key, decision.state, here=here, lookup=store.lookup, remote=remote,
                              past="download")
        elif decision.kind == "reuse":
            say(f"'{target.name}': output already complete (another process or an interrupted "
                "run finished it); reusing it")
            return {"action_key": key}
        work = Path(tempfile.mkdtemp(prefix=f".{target.name}~", suffix=".tmp", dir=project.build_dir))  # "~" is in no name
        try:
            out_tmp = work / "out"
            out_tmp.mkdir()
            entry = decision.entry if decision.kind == "restore" else None
            problem = store.materialize(entry, out_tmp) if entry else "not in the cache"
            if problem is None:
                stamp = {**entry, "origin": "restored from cache", "restored_at": _now()}
                say(f"'{target.name}': restored from cache (built in {entry['seconds']} s)")
            else:
                if entry:
                    say(f"'{target.name}': {problem}; rebuilding")
                    shutil.rmtree(out_tmp)
                    out_tmp.mkdir()
                    decision = decide(project, target, key, decision.state, here=here, lookup=store.lookup,
                                      remote=remote, past="restore")
                leave = decision.leave
                entry = _remote_restore(remote, target, key, out_tmp, leave, components) \
                    if decision.kind == "remote" else None
                if entry is not None and leave:  # on the remote, re-hashed there by whoever needs it
                    stamp = {**entry, "origin": "left on the remote cache", "left_on_remote": remote.url,
                             "restored_at": _now()}
                elif entry is not None:  # fetched and re-hashed: the next restore is local
                    store.record(out_tmp, entry)
                    stamp = {**entry, "origin": "restored from the remote cache", "restored_at": _now()}
                else:
                    stamp = _run_pass(project, target, components, key, out_tmp, work, cache, leave)
                    if not stamp.get("left_on_remote"):
                        store.record(out_tmp, stamp)  # gates are checked after: relaxing one needs no rerun
                    if remote is not None:
                        _remote_push(remote, target, stamp, out_tmp)
            if target.gates:
                failed = gate_failures(target, out_tmp)
                if failed:
                    raise StageError(f"{target.named}: quality gate failed: {'; '.join(failed)}")
                stamp["gates"] = check_gates(target, out_tmp)
            write_stamp(out_tmp, stamp)
            _swap_into_place(out_tmp, final, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return {"action_key": key}


def rebuild_elsewhere(project: Project, target: Target, scratch: Path) -> dict:
    """Run ``target``'s pass from its inputs into ``scratch/out`` and return what its stamp would be
    (key, components, manifest): for ``cache audit``, which compares it with a cached entry. No
    cache, tier, lock or file under build/ is written: the stat cache is a fresh one in ``scratch``
    (the inputs are hashed anew) and nothing is recorded or pushed. An upstream output must be in
    build/ (its stamp is part of the key): StageError otherwise."""
    cache = StatCache(scratch / f"stat-{ALGORITHM}.sqlite3")
    components = key_components(project, target, cache)
    missing = [k for k, v in components["inputs"].items() if v is None]
    if missing:
        raise StageError(f"target '{target.name}': upstream output missing for input {', '.join(missing)}")
    out = scratch / "out"
    out.mkdir()
    return _run_pass(project, target, components, key_of(components), out, scratch, cache, leave=False)


def _remote_restore(remote, target: Target, key: str, out_tmp: Path, leave: bool, components: dict) -> dict | None:
    try:
        return remote.restore(target.name, key, out_tmp, download=not leave, components=components)
    except RemoteRequired as error:
        raise StageError(f"{target.named}: {error}") from None


def _download_left(project: Project, target: Target, stamp: dict, store: Store, remote) -> bool:
    """Bring an output left on the remote into build/ (the caller holds the target's lock): from
    the local cache when it has the action, else from the remote by the stamp's digests, every
    file re-hashed. False (said why) when neither can: the caller restores or builds it anew.

    The files move into the existing folder and the stamp is replaced last: the stamp, which is
    all that dependents' keys read, never disappears while other stages of this run look at it."""
    entry = {k: v for k, v in action_entry(stamp).items() if k not in ("origin", "restored_at")}
    final = project.output_dir(target.name)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}~", suffix=".tmp", dir=project.build_dir))
    try:
        out_tmp = work / "out"
        out_tmp.mkdir()
        local = store.lookup(stamp["action_key"])
        if local is None or store.materialize(local, out_tmp) is not None:
            shutil.rmtree(out_tmp)
            out_tmp.mkdir()
            try:
                if remote is None or not remote.download(target.name, entry, out_tmp):
                    return False
            except RemoteRequired as error:
                raise StageError(f"{target.named}: {error}") from None
            store.record(out_tmp, entry)
        downloaded = {**entry, "origin": "downloaded from the remote cache", "restored_at": _now()}
        if target.gates:  # a gate declared since the output was left: checked now, on its files
            failed = gate_failures(target, out_tmp)
            if failed:
                shutil.rmtree(final)
                raise StageError(f"{target.named}: quality gate failed: {'; '.join(failed)}")
            downloaded["gates"] = check_gates(target, out_tmp)
        for rel in entry["manifest"]:
            (final / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(out_tmp / rel, final / rel)
        write_stamp(work, downloaded)
        os.replace(work / STAMP_DIR / "stamp.json", final / STAMP_DIR / "stamp.json")
        return True
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _inputs_here(project: Project, target: Target, on_ray: bool) -> None:
    """A stage is about to run: its upstream outputs left on the remote must be usable. Here, their
    files come down; on Ray, the worker fetches them by digest, so the remote must still hold
    them. One that cannot be had that way (the remote lost or corrupted it, or is off) is brought
    up to date now as a needed target: restored with every object re-hashed, or rebuilt and pushed
    back, so the remote is repaired and this run goes on."""
    store, remote = Store(project.cache_dir), remote_tier(project)
    for name, ref in target.inputs.items():
        upstream = project.targets.get(ref.value) if ref.kind == "target" else None
        if upstream is None or not (read_stamp(project.output_dir(upstream.name)) or {}).get("left_on_remote"):
            continue
        with store.lock(_target_lock_name(project, upstream), f"'{upstream.name}'"):
            stamp = read_stamp(project.output_dir(upstream.name)) or {}
            if not stamp.get("left_on_remote"):
                continue
            if on_ray and _remote_holds(remote, upstream, stamp):
                continue
            if not on_ray and _download_left(project, upstream, stamp, store, remote):
                continue
            shutil.rmtree(project.output_dir(upstream.name), ignore_errors=True)
        say(f"'{target.name}': input {name} ({ref}) cannot be had from the remote cache; "
            f"bringing '{upstream.name}' up to date here")
        build(project, upstream, here=True)


def _remote_holds(remote, target: Target, stamp: dict) -> bool:
    """Does the remote hold every object of a left output (for a Ray worker to fetch)?"""
    from ..cache.remote import RemoteError

    try:
        client = remote.client() if remote is not None else None
    except RemoteRequired as error:
        raise StageError(f"{target.named}: {error}") from None
    try:
        return client is not None and not client.lacking(stamp["manifest"])
    except RemoteError as error:  # unreachable now: the caller brings the output up to date another way
        say(f"'{target.name}': the remote cache cannot say whether it holds the output ({error})")
        return False


def _remote_push(remote, target: Target, stamp: dict, out_tmp: Path) -> None:
    try:
        remote.push(target.name, stamp, out_tmp)
    except RemoteRequired as error:
        raise StageError(f"{target.named}: built and in the local cache, but {error}") from None


def _run_pass(project, target, components, key, out_tmp, work, cache, leave: bool) -> dict:
    pool = slot_pool(project)

    def waiting() -> None:
        say(f"'{target.name}': waiting for a {target.device} slot")

    try:
        if executor_kind(project) == "ray":  # the cluster places it: no local slot
            threads = max(1, pool.machine.cpu_threads // pool.machine.cpu_slots)
            _inputs_here(project, target, on_ray=True)
            seconds, ran_on, left = run_on_ray(project, target, components, out_tmp, threads, download=not leave)
        else:
            left = None
            _inputs_here(project, target, on_ray=False)
            with pool.slot(target.name, target.device, target.gpu_memory_gb, on_wait=waiting) as assignment:
                say(f"'{target.name}' running on {assignment.device} ({assignment.threads} "
                    f"thread{'s' if assignment.threads > 1 else ''})")
                started_at = time.time()
                started = time.perf_counter()
                _run_worker(project, target, out_tmp, work, assignment, pool, components["cpu_numerics"])
                seconds = time.perf_counter() - started
            ran_on = {"executor": "local", "device": assignment.device, "threads": assignment.threads,
                      "waited_s": assignment.waited_s, "started": round(started_at, 3), "ended": round(time.time(), 3)}
    except UserError as error:
        raise StageError(str(error)) from None
    after = key_components(project, target, cache)
    if after["inputs"] != components["inputs"]:
        changed = [k for k, v in components["inputs"].items() if after["inputs"].get(k) != v]
        raise StageError(
            f"{target.named}: input {', '.join(changed)} changed while the stage ran; "
            "nothing recorded, run the build again"
        )
    manifest = left or tree_manifest(out_tmp, cache, exclude=(STAMP_DIR,))
    return {
        "target": target.name,
        "action_key": key,
        "components": components,
        "manifest": manifest,
        "manifest_digest": hash_json(manifest),
        "seconds": round(seconds, 3),
        "ran_on": ran_on,
        "origin": "built",
        "built_at": _now(),
        **({"left_on_remote": remote_tier(project).url} if left else {}),
    }


def _target_lock_name(project: Project, target: Target) -> str:
    """Lock name for one output folder (several projects may share the cache's lock folder)."""
    return "out-" + hash_json([str(project.output_dir(target.name))])[:32]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _swap_into_place(new: Path, final: Path, work: Path) -> None:
    """Replace ``final`` with ``new`` by renames on one filesystem; the old output goes to ``work``."""
    if final.exists():
        os.rename(final, work / "previous")
    os.rename(new, final)


def _run_worker(project: Project, target: Target, out_dir: Path, work: Path, assignment: Assignment,
                pool: SlotPool, numerics: str) -> None:
    from ..exec.worker import placed, run_worker, target_plan  # only when a stage runs: the no-op never needs it

    inputs = {key: str(input_path(project, ref)) for key, ref in target.inputs.items()}
    plan = placed(target_plan(target, numerics), inputs, out_dir, target.device, assignment.device,
                  assignment.threads, project.cache_dir)
    result = run_worker(plan, work, {**os.environ, **assignment.environment(pool.machine, numerics)})
    if result.returncode != 0:
        raise StageError(f"{target.named}: pass '{target.pass_def.name}' failed (exit {result.returncode})")

