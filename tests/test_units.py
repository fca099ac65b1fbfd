"""Fast unit tests of the core's small rules: the stat cache's same-tick guard, cache gc's
least-recently-used and pin rules, and recipe template substitution."""

from __future__ import annotations

import json
import os
import time

import pytest

from modelbuild import UserError
from modelbuild.core import digest
from modelbuild.core.digest import RACY_NS, StatCache, hash_json
from modelbuild.graph.expand import substitute
from modelbuild.cache.store import Store


@pytest.fixture
def hashed(monkeypatch):
    """Counts the files the stat cache really reads (the cache's own function, not a dependency)."""
    calls = []
    real = digest.hash_file

    def counting(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr(digest, "hash_file", counting)
    return calls


def test_stat_cache_trusts_a_digest_only_once_the_file_is_older_than_the_tick(tmp_path, hashed):
    cache = StatCache(tmp_path / "stat.sqlite3")
    old = tmp_path / "old.bin"
    old.write_bytes(b"a" * 100)
    past = time.time_ns() - 10 * RACY_NS
    os.utime(old, ns=(past, past))
    first = cache.digest(old)
    assert cache.digest(old) == first and len(hashed) == 1  # unchanged identity, old mtime: not re-read

    fresh = tmp_path / "fresh.bin"
    fresh.write_bytes(b"b" * 100)  # mtime = now: a same-tick rewrite would keep size and mtime
    cache.digest(fresh)
    cache.digest(fresh)
    assert len(hashed) == 3  # re-read every time until its mtime is safely in the past

    old.write_bytes(b"c" * 100)  # same size; a new mtime and ctime
    os.utime(old, ns=(past, past))  # even with the old mtime restored, ctime tells
    assert cache.digest(old) != first and len(hashed) == 4


def _entry(store: Store, tmp_path, name: str, files: dict[str, bytes]) -> str:
    out = tmp_path / f"out-{name}"
    out.mkdir()
    manifest = {}
    for rel, data in files.items():
        (out / rel).write_bytes(data)
        manifest[rel] = {"size": len(data), "digest": digest.hash_file(out / rel)}
    components = {"target": name}
    key = hash_json(components)
    store.record(out, {"target": name, "action_key": key, "components": components, "manifest": manifest,
                       "manifest_digest": hash_json(manifest), "seconds": 1.0})
    return key


def test_gc_drops_least_recently_used_actions_first_and_never_what_a_release_pins(tmp_path):
    store = Store(tmp_path / "cache")
    keys = {name: _entry(store, tmp_path, name, {"w.bin": name.encode() * 1000}) for name in ("a", "b", "c", "d")}
    now = time.time()
    for age, name in enumerate(("d", "c", "b", "a")):  # a is the least recently used, d the most
        os.utime(store.actions / f"{keys[name]}.json", (now - 100 * age, now - 100 * age))
    pinned_entry = json.loads((store.actions / f"{keys['a']}.json").read_text())
    store.pin("release-a", [info["digest"] for info in pinned_entry["manifest"].values()], [keys["a"]])

    result = store.gc(max_bytes=2500)  # room for the pinned object and one more
    kept = {path.stem for path in store.actions.glob("*.json")}
    assert kept == {keys["a"], keys["d"]}, result  # b and c went, oldest first; a stays: it is pinned
    assert result["dropped_actions"] == 2
    assert store.lookup(keys["a"]) is not None and store.lookup(keys["d"]) is not None
    assert len(store.object_files()) == 2

    store.gc(max_bytes=0)
    assert {path.stem for path in store.actions.glob("*.json")} == {keys["a"]}
    assert len(store.object_files()) == 1


def test_lookup_marks_use_so_gc_keeps_what_was_just_restored(tmp_path):
    store = Store(tmp_path / "cache")
    first, second = (_entry(store, tmp_path, name, {"w.bin": name.encode() * 1000}) for name in ("x", "y"))
    long_ago = time.time() - 10_000
    os.utime(store.actions / f"{first}.json", (long_ago, long_ago))
    os.utime(store.actions / f"{second}.json", (long_ago + 1, long_ago + 1))
    assert store.lookup(first)  # a use: now the most recent
    store.gc(max_bytes=1500)
    assert {path.stem for path in store.actions.glob("*.json")} == {first}


@pytest.mark.parametrize("value, variables, expected", [
    ("{steps}", {"steps": 60}, 60),  # exactly "{var}": the value with its TOML type
    ("{rate}", {"rate": 1e-3}, 1e-3),
    ("{flag}", {"flag": False}, False),
    ("{names}", {"names": ["a", "b"]}, ["a", "b"]),
    ("{model}-travel-{steps}", {"model": "tiny", "steps": 30}, "tiny-travel-30"),  # inside text: its text
    ("{{model}}", {"model": "tiny"}, "{model}"),  # literal braces
    ("a {{b}} {model}", {"model": "tiny"}, "a {b} tiny"),
    ({"k": ["{model}", {"n": "{steps}"}]}, {"model": "m", "steps": 2}, {"k": ["m", {"n": 2}]}),  # nested
    (7, {}, 7),
])
def test_template_substitution(value, variables, expected):
    assert substitute(value, variables, "targets/x.toml: recipe 'r'") == expected


def test_template_substitution_names_an_unknown_variable_and_its_key():
    with pytest.raises(UserError, match=r"^targets/x.toml: recipe 'r': params.steps\[1\]: unknown variable '\{stpes\}' \(vars: model, steps\)$"):
        substitute({"params": {"steps": [1, "{stpes}"]}}, {"model": "m", "steps": 3}, "targets/x.toml: recipe 'r'")


def test_the_targets_a_doit_run_asks_for_are_read_as_doit_reads_its_command_line(tmp_path):
    """download.toplevel: which outputs a minimal-download run must bring here, from the command
    line the run was given (tasks.project_at passes doit's), never from this process's sys.argv."""
    from conftest import new_project

    from modelbuild.cache.download import toplevel
    from modelbuild.core.run import Run
    from modelbuild.graph.loader import load_project as load

    project = load(new_project(tmp_path / "project").root)
    for argv, wanted in (
        (["-n", "2", "tiny-base", "X=1"], {"tiny-base"}),
        (["run", "--process=2", "tiny-base", "tiny-travel-adapter"], {"tiny-base", "tiny-travel-adapter"}),
        (["-f", "dodo.py", "-v", "2", "tiny-travel-cpu-*"], {t for t in project.targets if t.startswith("tiny-travel-cpu-")}),
        (["tiny-variants"], set(project.groups["tiny-variants"])),
        ([], set(project.default_targets)),
        (["list"], set(project.targets)),  # another doit command: everything counts as asked for
        (["tiny-base?"], {"tiny-base?"}),  # only "*" is a pattern to doit
        (["--no-such-option", "x"], set(project.targets)),  # unreadable: everything counts as asked for
        (None, set(project.targets)),  # a command beside doit (release, plan...): every output is wanted here
    ):
        project.run = Run(argv)
        assert toplevel(project) == wanted, argv
