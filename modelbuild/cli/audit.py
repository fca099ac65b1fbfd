"""``python -m modelbuild cache audit [--sample N] [TARGET…]``: rebuild audits, in the style of
Nix's ``--check`` (issue #24, item 4).

A signature proves who pushed an entry, not that it holds what its inputs build. modelbuild builds
byte-identically, so this is a check a team can run: each chosen action (the stages ``doit
TARGET…`` builds, or ``--sample N`` of them at random) whose entry is cached, in the remote tier
or the local one, is rebuilt here from its inputs in a scratch folder under the cache (never in
build/: engine/stage.rebuild_elsewhere), and the bytes are compared by digest with each distinct
cached entry. Each is reported as reproducible, or as differing, with the files that differ and
the key that signed it. A differing entry goes on the deny list (cache/audit.py): the remote's
is never served here again, and the local tier's is replaced by the rebuild. Exit 1 when one
differs. An action whose upstream output is not in build/ cannot be keyed: it is skipped, said so.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path

from .. import UserError
from ..cache.audit import DENIED, deny
from ..cache.store import Store, entry_problem
from ..cache.tiers import remote_tier
from ..core.project import Project
from ..core.stamp import STAMP_DIR
from .plan import requested


def closure(project: Project, names: list[str]) -> list[str]:
    """The stages ``doit NAMES`` builds, upstream first."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        for ref in project.targets[name].inputs.values():
            if ref.kind == "target":
                visit(ref.value)
        order.append(name)

    for name in requested(project, names):
        visit(name)
    return order


def signer_of(entry: dict) -> str | None:
    signature = entry.get("signature")
    return signature.get("signer") if isinstance(signature, dict) and isinstance(signature.get("signer"), str) else None


def differences(rebuilt: dict, cached: dict) -> list[str]:
    """The files whose bytes differ, in words: ``name``, ``name (only in the entry)``, ``name (not in the entry)``."""
    out = []
    for rel in sorted(set(rebuilt) | set(cached)):
        if rel not in rebuilt:
            out.append(f"{rel} (only in the entry)")
        elif rel not in cached:
            out.append(f"{rel} (not in the entry)")
        elif rebuilt[rel]["digest"] != cached[rel]["digest"]:
            out.append(rel)
    return out


def cached_entries(project: Project, store: Store, tier, key: str) -> list[tuple[str, dict]]:
    """(where, entry) for each distinct self-consistent entry under ``key``: the remote's, the local's."""
    from ..cache.remote import RemoteError
    from ..cache.tiers import RemoteRequired

    found: list[tuple[str, dict]] = []
    if tier is not None:
        try:
            client = tier.client()  # down: None, said once (tiers.RemoteTier._went_down)
            remote = client.lookup(key) if client is not None else None
        except RemoteRequired as error:
            raise UserError(str(error)) from None
        except RemoteError as error:
            print(f"modelbuild: remote cache {tier.url}: {error}; auditing the local tier only")
            remote = None
        if remote is not None and not entry_problem(key, remote):
            found.append((f"remote entry ({tier.url})", remote))
    local = store.lookup(key)
    if local is not None and all(local["manifest_digest"] != e["manifest_digest"] for _, e in found):
        found.append(("local entry", local))
    return found


def audit(project: Project, names: list[str], sample: int | None) -> int:
    from ..core.digest import ALGORITHM, StatCache
    from ..core.key import key_components, key_of
    from ..engine.stage import StageError, rebuild_elsewhere

    chosen = closure(project, names)
    if sample is not None:
        if sample < 1:
            raise UserError(f"cache audit --sample {sample}: give 1 or more actions to audit")
        picked = set(random.sample(chosen, min(sample, len(chosen))))
        chosen = [name for name in chosen if name in picked]
    store, tier = Store(project.cache_dir), remote_tier(project)
    project.cache_dir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="audit~", dir=project.cache_dir))  # scratch: never build/
    differing = 0
    try:
        keying = StatCache(root / f"stat-{ALGORITHM}.sqlite3")  # not build/'s stat cache: nothing written there
        for name in chosen:
            target = project.targets[name]
            components = key_components(project, target, keying)
            missing = [k for k, v in components["inputs"].items() if v is None]
            if missing:
                print(f"'{name}': skipped: its input {', '.join(missing)} is not built here (doit {name} first)")
                continue
            key = key_of(components)
            entries = cached_entries(project, store, tier, key)
            if not entries:
                print(f"'{name}': not cached ({key[:12]}…): nothing to audit")
                continue
            scratch = root / name
            scratch.mkdir()
            try:
                rebuilt = rebuild_elsewhere(project, target, scratch)
            except StageError as error:
                print(f"'{name}': the rebuild failed: {error}")
                differing += 1
                continue
            found = False
            for where, entry in entries:
                signer = signer_of(entry)
                who = f"signed by {signer}" if signer else "unsigned"
                files = differences(rebuilt["manifest"], entry["manifest"])
                if not files:
                    print(f"'{name}': reproducible: the {where} {key[:12]}… ({who}) matches the rebuild here")
                    continue
                found = True
                deny(project.cache_dir, key, entry, files, signer, None if where == "local entry" else tier.url)
                print(f"'{name}': DIFFERS: the {where} {key[:12]}… ({who}) is not what its inputs build here: "
                      f"{', '.join(files)}; never served here again (recorded in {project.cache_dir / DENIED})")
            if found:
                differing += 1
                store.record(scratch / "out", rebuilt)  # the local tier now serves what was built here
                if _manifest_digest(project.output_dir(name) / STAMP_DIR / "stamp.json") not in (None, rebuilt["manifest_digest"]):
                    print(f"'{name}': build/{name} holds the differing bytes: remove it, and `doit {name}` "
                          "restores the rebuilt ones")
            shutil.rmtree(scratch, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if differing else 0


def _manifest_digest(stamp: Path) -> str | None:
    """The manifest digest a stamp in build/ records, or None when there is none."""
    import json

    try:
        return json.loads(stamp.read_text()).get("manifest_digest")
    except (OSError, ValueError):
        return None
