"""Rebuild audits (issue #24, item 4): ``python -m modelbuild cache audit`` on real doit runs of the
toy passes (tests/core_project.py) against a real SeaweedFS (tests/s3server.py), real keys. No mock.

An honest builder A pushes the toy chain signed by its key. A hostile builder E then writes, under
A's ``shout`` action key, a self-consistent entry with other bytes, signed by E (test_trust.forge).
A reader that restored the chain audits it: A's entries are reproducible, E's differs, and from
then on this reader never restores it again, even trusting E's key; ``plan`` says so too.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid

import pytest

from core_project import CHAIN, new_core_project, said
from s3server import make_bucket, s3_server  # noqa: F401 (fixture)
from test_trust import aws_env, forge, generate_key, ran, remote_client

pytestmark = pytest.mark.core


@pytest.fixture(scope="module")
def bucket(s3_server, tmp_path_factory):
    """A's chain on the remote, signed by A, and E's poisoned ``shout`` over A's entry."""
    from modelbuild.core.signing import load_signer

    base = tmp_path_factory.mktemp("audit")
    key_a, key_e = generate_key(base / "keys-a"), generate_key(base / "keys-e")
    name = f"audit-{uuid.uuid4().hex[:8]}"
    make_bucket(s3_server, name)
    url = f"s3://{name}/modelbuild"
    env = {**aws_env(s3_server), "MODELBUILD_REMOTE_CACHE": url}
    a = new_core_project(base / "a")
    built = a.doit("shout", env={**env, "MODELBUILD_SIGNING_KEY": str(key_a.private)})
    assert ran(built) == CHAIN and said(built, "pushed to the remote cache") == CHAIN, built.out[-3000:]
    remote = remote_client(s3_server, url, aws_env(s3_server))
    forge(remote, a.stamp("shout"), base / "forged-shout", load_signer(key_e.private, "test"))
    return {"url": url, "env": {**env, "MODELBUILD_REMOTE_PUSH": "0"}, "a": a, "key_a": key_a, "key_e": key_e}


def lines_of(result) -> list[str]:
    """The audit's report lines (and one-line errors), without the stages' own "running on" lines."""
    return [line for line in result.out.splitlines() if line.strip() and not re.match(r"modelbuild: '\S+' running on ", line)]


def test_audit_finds_a_reproducible_and_e_differing_and_the_differing_entry_is_never_served_again(bucket, tmp_path):
    a, env, key_a, key_e = bucket["a"], bucket["env"], bucket["key_a"], bucket["key_e"]
    b = new_core_project(tmp_path / "b")
    pulled = b.doit("shout", env=env)  # the control: unchecked, E's forgery is restored as if built here
    assert said(pulled, "restored from the remote cache") == CHAIN and b.runs() == [], pulled.out[-3000:]
    assert b.files("shout") != a.files("shout")
    before = {p: p.stat().st_mtime_ns for p in b.path("build").rglob("*")}

    audit = b.modelbuild("cache", "audit", env=env)
    assert audit.returncode == 1, audit.out
    keys = {t: a.stamp(t)["action_key"][:12] for t in CHAIN}
    out = lines_of(audit)
    for target in ("words", "upper"):
        assert f"'{target}': reproducible: the remote entry ({bucket['url']}) {keys[target]}… (signed by {key_a.id}) " \
               "matches the rebuild here" in out, audit.out
    assert f"'shout': DIFFERS: the remote entry ({bucket['url']}) {keys['shout']}… (signed by {key_e.id}) is not what " \
           f"its inputs build here: counts.json, total.txt; never served here again (recorded in {b.cache / 'denied'})" in out, audit.out
    assert "'shout': build/shout holds the differing bytes: remove it, and `doit shout` restores the rebuilt ones" in out
    assert len(out) == 4, audit.out
    assert b.runs() == ["words", "upper", "shout"]  # every audited pass really ran
    assert {p: p.stat().st_mtime_ns for p in b.path("build").rglob("*")} == before  # build/ untouched
    assert not list(b.cache.glob("audit~*"))  # the scratch folder is gone

    # the local tier now serves the bytes built here, A's
    shutil.rmtree(b.path("build/shout"))
    b.clear_runs()
    again = b.doit("shout", env=env)
    assert said(again, r"restored from cache") == {"shout"} and b.runs() == [], again.out[-3000:]
    assert b.files("shout") == a.files("shout")

    # the remote's differing entry is never restored again, whichever keys are trusted; plan agrees
    shutil.rmtree(b.path("build/shout"))
    (b.cache / "actions" / f"{a.stamp('shout')['action_key']}.json").unlink()
    trusting = {**env, "MODELBUILD_TRUSTED_KEYS": f"{key_a.public},{key_e.public}"}
    plan = b.modelbuild("plan", "--json", "shout", env=trusting)
    assert plan.returncode == 0, plan.out
    actions = {s["name"]: s["action"] for s in json.loads(plan.out[plan.out.index("{"):])["stages"]}
    assert actions["shout"] == "run", actions
    b.clear_runs()
    rebuilt = b.doit("shout", env=trusting)
    assert re.search(rf"modelbuild: 'shout': remote cache entry {keys['shout']}… differed from a rebuild here "
                     rf"\(cache audit, [0-9T:Z-]+; signer {key_e.id}\): never served; rebuilding", rebuilt.out), rebuilt.out[-3000:]
    assert b.runs() == ["shout"] and b.files("shout") == a.files("shout")


def test_a_sample_audits_that_many_stages_and_a_stage_whose_inputs_are_not_built_is_skipped(bucket, tmp_path):
    env, key_a = bucket["env"], bucket["key_a"]
    c = new_core_project(tmp_path / "c")
    fresh = c.modelbuild("cache", "audit", env=env)  # nothing built here: only words can be keyed
    assert fresh.returncode == 0, fresh.out
    assert lines_of(fresh) == [
        f"'words': reproducible: the remote entry ({bucket['url']}) {bucket['a'].stamp('words')['action_key'][:12]}… "
        f"(signed by {key_a.id}) matches the rebuild here",
        "'upper': skipped: its input source is not built here (doit upper first)",
        "'shout': skipped: its input source is not built here (doit shout first)",
    ], fresh.out
    assert not c.path("build").exists()  # the audit writes nothing there, not even the state folder
    sample = c.modelbuild("cache", "audit", "--sample", "1", "words", "upper", env=env)
    assert sample.returncode == 0 and len(lines_of(sample)) == 1, sample.out
    bad = c.modelbuild("cache", "audit", "--sample", "0", env=env)
    assert bad.returncode == 2 and lines_of(bad) == ["modelbuild: cache audit --sample 0: give 1 or more actions to audit"]
