"""``python -m modelbuild plan [TARGET...]``: before anything runs, what ``doit`` will do with each
stage, why, how long the passes that must run take, and what restores download.

Each stage's choice is ``stage.decide()``, the function ``build()`` acts on, asked here without
locks and without writing anything (no cache file, stamp, stat cache or doit database is
touched: digests are read from the stat cache read-only, cache entries are read, not
"used"; the remote is asked for entries and object presence, nothing is fetched). Stages are
planned in build order, each with the output its upstream stages will have once they are up to
date: a fresh or restored upstream's manifest digest is known, so its dependents' keys are
exact; an upstream that runs makes its dependents "run" ("waits on upstream rebuild": it reruns
unless that output comes out byte-identical, early cutoff).

Estimates: the median of the ``seconds`` recorded for the same target (stamps in build/ and
the local cache's action entries, one per action key; only builds by this executor on this
platform and Python), else the median of the same pass's builds of other targets, unscaled;
else "no estimate". Totals add them up serially (``doit -n N`` runs independent stages at once).
"""

from __future__ import annotations

import fnmatch
import json
import os
import sqlite3
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .. import UserError
from ..core.digest import ALGORITHM, RACY_NS, StatCache, hash_file
from ..core.key import key_of
from ..core.project import Project, Target
from ..core.status import STAMP_DIR, Fresh, Stale, key_differences, read_stamp, status
from ..cache.audit import denial
from ..cache.store import Store, entry_problem

LABELS = {"reuse": "fresh", "restore": "restore locally", "remote": "restore remotely", "run": "run", "fail": "fail"}


class ReadOnlyStatCache(StatCache):
    """The stat cache's digests where they still hold, without ever writing to it."""

    def _db(self):
        db = getattr(self._local, "db", None)
        if db is None:
            try:
                # immutable: no lock, no -shm/-wal file created. A row read while a build writes is
                # still checked against the file's stat identity below; a torn page is an error: hash
                if not self.db_path.is_file():
                    raise sqlite3.OperationalError("no stat cache yet")
                db = sqlite3.connect(f"file:{self.db_path}?mode=ro&immutable=1", uri=True)
                db.execute("SELECT count(*) FROM files").fetchone()
            except sqlite3.Error:
                db = False  # none yet, or unreadable: hash every file
            self._local.db = db
        return db

    def digest(self, path: Path) -> str:
        path = Path(path).resolve()
        st = os.stat(path)
        db = self._db()
        row = None
        if db:
            try:
                row = db.execute("SELECT ino, size, mtime_ns, ctime_ns, hashed_ns, digest FROM files WHERE path = ?",
                                 (str(path),)).fetchone()
            except sqlite3.Error:
                row = None
        if row and tuple(row[:4]) == (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns) \
                and st.st_mtime_ns + RACY_NS < row[4]:
            return row[5]
        return hash_file(path)


@dataclass
class Step:
    name: str
    action: str  # fresh | restore locally | restore remotely | leave on the remote | run | fail | blocked
    reasons: list[str]
    key: str | None = None
    estimate_s: float | None = None
    estimate_from: str | None = None
    bytes: int | None = None
    digest: str | None = field(default=None, repr=False)  # manifest digest its output will have; None: unknown


def requested(project: Project, names: list[str]) -> list[str]:
    """The targets ``doit NAMES`` builds (``doit`` alone: the default targets, as doit_config picks
    them); a group is its members, a name with "*" a glob; an unknown name is one line."""
    from ..tasks import unavailable_device

    if not names:
        wanted = project.default_targets or list(project.targets)
        names = [n for n in wanted if n in project.groups or not unavailable_device(project, project.targets[n])]
    out: list[str] = []
    for name in names:
        matches = fnmatch.filter([*project.targets, *project.groups], name) if "*" in name else [name]
        if not matches or not all(m in project.targets or m in project.groups for m in matches):
            raise UserError(f"unknown target '{name}' (see: doit list)")
        for match in matches:
            members = project.groups.get(match)
            if members is not None:
                members = [m for m in members if not unavailable_device(project, project.targets[m])]
            out.extend(m for m in members or [match] if m not in out)
    return out


class Estimator:
    """Wall-time estimates from the seconds this machine recorded (see the module's doc)."""

    def __init__(self, project: Project, store: Store):
        from ..exec.executor import executor_kind

        records: dict[str, dict] = {}
        files = [*store.actions.glob("*.json"), *project.build_dir.glob(f"*/{STAMP_DIR}/stamp.json")]
        for path in files:
            try:
                entry = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("seconds"), (int, float)):
                continue
            if isinstance(entry.get("components"), dict) \
                    and (entry.get("ran_on") or {}).get("executor", "local") == executor_kind(project):
                records.setdefault(entry.get("action_key"), entry)
        self.records = list(records.values())

    def __call__(self, target: Target, components: dict) -> tuple[float | None, str]:
        """The estimate for ``target`` and how it was made; ``components``: its key components now
        (records of another platform or Python are left out)."""
        here = [e for e in self.records if (e["components"].get("platform"), e["components"].get("python"))
                == (components.get("platform"), components.get("python"))]
        own = [float(e["seconds"]) for e in here if e.get("target") == target.name]
        if own:
            return statistics.median(own), f"median of {len(own)} build{'s' * (len(own) > 1)} of this target"
        other = [float(e["seconds"]) for e in here
                 if e["components"].get("pass") == target.pass_def.name and e.get("target") != target.name]
        if other:
            return statistics.median(other), (f"median of {len(other)} build{'s' * (len(other) > 1)} of pass "
                                              f"{target.pass_def.name} on other targets")
        return None, "no estimate (never built here)"


def _size(manifest: dict) -> int:
    return sum(info.get("size", 0) for info in manifest.values())


def make_plan(project: Project, names: list[str]) -> list[Step]:
    """One Step per stage of the closure of ``names``, in build order (see the module's doc)."""
    planner = Planner(project, names)
    try:
        return planner.steps()
    finally:
        if planner.records:
            planner.records.close()


class Planner:
    """stage.decide() for every stage, with read-only stand-ins for what build() reads and uses."""

    def __init__(self, project: Project, names: list[str]):
        from ..cache.download import mode as download_mode
        from ..engine.stage import forced
        from ..cache.tiers import remote_tier

        self.project = project
        self.wanted = set(requested(project, names))
        self.cache = ReadOnlyStatCache(project.state_dir / f"stat-{ALGORITHM}.sqlite3")  # stage.stat_cache's file
        self.store = Store(project.cache_dir)
        self.tier = remote_tier(project)
        self.force = forced()
        self.estimate = Estimator(project, self.store)
        self.all_here = download_mode(project) == "all"
        self.records = None  # doit's records (explain._doit_records), opened when MODELBUILD_FORCE asks

    def needed(self, target: Target) -> bool:
        """download.needed_here, for the command line ``doit NAMES`` rather than this process's."""
        return self.all_here or bool(target.gates) or target.name in self.wanted

    def local(self, key: str) -> dict | None:
        """Store.lookup, read-only: a bad entry is a miss (build drops it and goes on)."""
        try:
            entry = json.loads((self.store.actions / f"{key}.json").read_text())
        except (OSError, ValueError):
            return None
        return None if entry_problem(key, entry) else entry

    def objects_here(self, entry: dict) -> bool:
        """What Store.materialize needs (it also re-hashes each object, which plan does not)."""
        for info in entry["manifest"].values():
            try:
                if self.store.object_path(info["digest"]).stat().st_size != info["size"]:
                    return False
            except OSError:
                return False
        return True

    def _client(self):
        from ..cache.tiers import RemoteRequired

        try:
            return self.tier.client() if self.tier is not None else None
        except RemoteRequired as error:
            raise UserError(str(error)) from None

    def remote_has(self, manifest: dict) -> bool:
        from ..cache.remote import RemoteError

        client = self._client()
        try:
            return client is not None and not client.lacking(manifest)
        except RemoteError:
            return False

    def remote(self, key: str) -> dict | None:
        """The remote's entry alone (RemoteStore.lookup, nothing fetched), served as
        RemoteTier.restore serves one: self-consistent, every object present."""
        from ..cache.remote import RemoteError

        client = self._client()
        try:
            entry = client.lookup(key) if client is not None else None
        except RemoteError:
            return None
        if entry is None or entry_problem(key, entry) or denial(self.store.root, key, entry) \
                or self.tier.trust.problem(entry) or not self.remote_has(entry["manifest"]):
            return None  # an audited-differing, unsigned or untrusted entry is not served (tiers.RemoteTier.restore)
        return entry

    def doit_recorded(self, name: str) -> str | None:
        """The key doit recorded for the task (what its uptodate check, is_up_to_date, compares)."""
        from .explain import _doit_records

        if self.records is None:
            self.records = _doit_records(self.project) or False
        return self.records.get_values(name).get("action_key") if self.records else None

    def decide(self, target: Target, key: str, state, past: str | None = None):
        from ..engine.stage import decide

        return decide(self.project, target, key, state, lookup=self.local, remote=self.tier,
                      remote_lookup=self.remote, needed=self.needed, past=past)

    def steps(self) -> list[Step]:
        from ..exec.executor import executor_kind

        steps: dict[str, Step] = {}
        order = self.project.closure(sorted(self.wanted, key=list(self.project.targets).index))
        for name in order:
            steps[name] = self.step(self.project.targets[name], steps)
            if steps[name].action == "run" and executor_kind(self.project) != "ray":
                self._inputs_come_down(self.project.targets[name], steps)
        return list(steps.values())

    def step(self, target: Target, steps: dict[str, Step]) -> Step:
        from ..engine.stage import _left_but_needed, _reasons, key_components
        from ..tasks import unavailable_device

        project, name, deps = self.project, target.name, target.deps()
        reason = unavailable_device(project, target)
        if reason:
            return Step(name, "fail", [f"device {target.device}: {reason}"])
        blocked = [d for d in deps if steps[d].action in ("fail", "blocked")]
        if blocked:
            return Step(name, "blocked", [f"upstream {', '.join(blocked)} fails"])
        components = key_components(project, target, self.cache)
        disk = {d: (read_stamp(project.output_dir(d)) or {}).get("manifest_digest") for d in deps}
        unknown = [d for d in deps if steps[d].digest is None]  # they run: their output is not known yet
        changed = [d for d in deps if steps[d].digest != disk[d]]  # restored: known, not in build/ yet
        for key, ref in target.inputs.items():
            if ref.kind == "target":
                components["inputs"][key] = steps[ref.value].digest
        if unknown:
            state = status(project, target, self.cache, as_built=frozenset(changed + unknown))
            own = [] if isinstance(state, Fresh) else list(_reasons(state))
            step = Step(name, "run", own or [f"waits on upstream rebuild of {', '.join(unknown)} "
                                             "(reruns unless its output comes out identical)"])
            step.estimate_s, step.estimate_from = self.estimate(target, components)
            return step
        key = key_of(components)
        stamp = read_stamp(project.output_dir(name))
        recorded = (stamp or {}).get("components", {}).get("inputs", {})
        if not changed or stamp is None or all(recorded.get(k) == components["inputs"][k] for k, ref
                                               in target.inputs.items() if ref.kind == "target" and ref.value in changed):
            # status() is exact here: ``as_built`` takes the restored upstreams as the stamp recorded them
            state = status(project, target, self.cache, as_built=frozenset(changed))
        else:
            state = Stale("key", tuple(key_differences(stamp.get("components") or {}, components, target)), stamp)
        unforced = () if isinstance(state, Fresh) else _reasons(state)
        if self.force and not (isinstance(state, Fresh) and self.doit_recorded(name) == key
                               and not _left_but_needed(project, target, state.stamp, needed=self.needed)):
            state = None  # doit runs it (its uptodate check fails), and build() is forced
        decision = self.decide(target, key, state)
        step = Step(name, "", [*unforced, *decision.reasons] if state is None else list(decision.reasons), key)
        if decision.kind == "download":
            stamp = decision.state.stamp
            entry = self.local(stamp["action_key"])
            if entry is not None and self.objects_here(entry):
                step.action = "restore locally"
            elif self.remote_has(stamp["manifest"]):
                step.action = "restore remotely"
            else:
                decision = self.decide(target, key, state, past="download")
                step.reasons = list(decision.reasons)
            if step.action:
                step.reasons = [f"its files were left on {stamp['left_on_remote']} and are needed here"]
                step.bytes, step.digest = _size(stamp["manifest"]), stamp["manifest_digest"]
                return step
        if decision.kind == "restore" and not self.objects_here(decision.entry):
            decision = self.decide(target, key, state, past="restore")
            step.reasons.append("the local cache lacks some of its objects")
        if decision.kind == "reuse":
            stamp = decision.state.stamp
            origin = stamp.get("origin", "built")
            step.action, step.digest = "fresh", stamp["manifest_digest"]
            step.reasons = [f"built in {stamp.get('seconds')} s" if origin == "built" else origin]
            if stamp.get("left_on_remote"):
                step.reasons.append(f"files left on {stamp['left_on_remote']}")
        elif decision.kind in ("restore", "remote"):
            step.action = "leave on the remote" if decision.kind == "remote" and decision.leave else LABELS[decision.kind]
            step.bytes, step.digest = _size(decision.entry["manifest"]), decision.entry["manifest_digest"]
            step.reasons.append(f"cached build took {decision.entry.get('seconds')} s")
        else:
            step.action = LABELS[decision.kind]
            if decision.kind == "run":
                step.estimate_s, step.estimate_from = self.estimate(target, components)
        return step

    def _inputs_come_down(self, target: Target, steps: dict[str, Step]) -> None:
        """A stage that runs here needs its inputs' files: an upstream left on the remote comes
        down first (stage._inputs_here), from the local cache when it holds the action."""
        for ref in target.inputs.values():
            step = steps.get(ref.value) if ref.kind == "target" else None
            if step is None or step.action not in ("leave on the remote", "fresh"):
                continue
            stamp = read_stamp(self.project.output_dir(step.name)) or {}
            if step.action == "fresh" and not stamp.get("left_on_remote"):
                continue
            entry = self.local(step.key) if step.key else None
            step.action = "restore locally" if entry is not None and self.objects_here(entry) else "restore remotely"
            step.reasons.append(f"its files are needed here by {target.name}, which runs")
            if step.bytes is None:
                step.bytes = _size(stamp.get("manifest") or {})


def totals(steps: list[Step]) -> dict:
    counts: dict[str, int] = {}
    for step in steps:
        counts[step.action] = counts.get(step.action, 0) + 1
    runs = [s for s in steps if s.action == "run"]
    return {
        "stages": len(steps),
        "counts": counts,
        "run_estimate_s": round(sum(s.estimate_s or 0 for s in runs), 3),
        "runs_without_estimate": sum(s.estimate_s is None for s in runs),
        "bytes_local": sum(s.bytes or 0 for s in steps if s.action == "restore locally"),
        "bytes_remote": sum(s.bytes or 0 for s in steps if s.action == "restore remotely"),
    }


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def cost(step: Step) -> str:
    if step.action == "run":
        return f"~{step.estimate_s:.1f} s ({step.estimate_from})" if step.estimate_s is not None else step.estimate_from
    if step.action == "restore locally":
        return f"{_mb(step.bytes or 0)} to copy"
    if step.action == "restore remotely":
        return f"{_mb(step.bytes or 0)} to download"
    if step.action == "leave on the remote":
        return f"{_mb(step.bytes or 0)} left there"
    return ""


def total_line(steps: list[Step]) -> str:
    t = totals(steps)
    parts = [f"{n} {action}" for action, n in t["counts"].items()]
    line = f"total: {t['stages']} stages ({', '.join(parts)})"
    if t["counts"].get("run"):
        line += f"; run ~{t['run_estimate_s']:.1f} s serial"
        if t["runs_without_estimate"]:
            line += f" + {t['runs_without_estimate']} without estimate"
    if t["bytes_local"]:
        line += f"; {_mb(t['bytes_local'])} to copy from the local cache"
    if t["bytes_remote"]:
        line += f"; {_mb(t['bytes_remote'])} to download"
    return line


def render_lines(steps: list[Step]) -> list[str]:
    lines = []
    for step in steps:
        extra = cost(step)
        lines.append(f"{step.name}: {step.action}: {'; '.join(step.reasons)}" + (f" [{extra}]" if extra else ""))
    return lines + [total_line(steps)]


def render_table(steps: list[Step]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="modelbuild plan", caption=total_line(steps))
    for column in ("stage", "action", "why", "time / bytes"):
        table.add_column(column, no_wrap=column in ("stage", "action"))
    styles = {"fresh": "green", "run": "yellow", "fail": "red", "blocked": "red"}
    for step in steps:
        table.add_row(step.name, f"[{styles.get(step.action, 'cyan')}]{step.action}[/]", "; ".join(step.reasons),
                      cost(step))
    Console().print(table)


def as_json(steps: list[Step]) -> str:
    return json.dumps({"stages": [{k: v for k, v in asdict(s).items() if k != "digest"} for s in steps],
                       "total": totals(steps)}, indent=1)
