"""`python -m modelbuild plan`: before anything runs, per stage what doit will do, why, how long
and how many bytes; it is stage.decide(), the choice build() acts on, so plan and doit agree.

Real doit runs on temporary projects: the tiny recipe is built once for the module (conftest's
``built_tiny``) and each test plans (and where it checks agreement, builds) a private copy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid

from conftest import TINY, copy_project
from s3server import make_bucket, s3_server  # noqa: F401 (fixture)

CHAIN = ["tiny-base", "tiny-travel-adapter", "tiny-travel-cpu-int4", TINY]
LR = ("learning_rate = 3e-3, rank = 4 }", "learning_rate = 4e-3, rank = 4 }")  # the tiny [[use]] of travel.toml


def plan(project, *args, env=None) -> dict[str, str]:
    """stage -> its plan line (without the name), from the plain-text output."""
    result = project.modelbuild("plan", *args, env=env)
    assert result.returncode == 0, result.out[-3000:]
    lines = [line for line in result.out.splitlines() if not line.startswith("modelbuild:")]
    assert lines[-1].startswith("total: "), result.out
    return {**dict(line.split(": ", 1) for line in lines[:-1]), "total": lines[-1]}


def plan_json(project, *args, env=None) -> dict:
    result = project.modelbuild("plan", "--json", *args, env=env)
    assert result.returncode == 0, result.out[-3000:]
    return json.loads(result.out[result.out.index("{"):])


def said(result, what: str) -> set[str]:
    return set(re.findall(rf"modelbuild: '(\S+)': {what}", result.out))


def snapshot(*roots) -> dict:
    """Every file and folder under the roots with its size and mtime: plan must change none."""
    seen = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                path = os.path.join(folder, name)
                st = os.lstat(path)
                seen[path] = (st.st_size, st.st_mtime_ns)
    return seen


def test_everything_fresh_after_a_build_and_plan_writes_nothing(built_tiny, tmp_path):
    p = copy_project(built_tiny, tmp_path / "p")
    before = snapshot(p.root, p.cache)
    lines = plan(p, TINY)
    assert list(lines) == [*CHAIN, "total"]
    assert all(lines[name].startswith("fresh: built in ") for name in CHAIN), lines
    assert lines["total"] == "total: 4 stages (4 fresh)"
    data = plan_json(p, TINY)
    assert [s["action"] for s in data["stages"]] == ["fresh"] * 4 and data["total"]["counts"] == {"fresh": 4}
    assert snapshot(p.root, p.cache) == before  # no stamp, cache file, stat cache or doit db written
    built = p.doit(TINY)  # and doit agrees: nothing runs or restores (a copied project's file_deps are new
    assert "running on" not in built.out and "restored" not in built.out  # to doit: build() reuses them)
    assert built.executed == set(said(built, "output already complete"))


def test_an_edited_param_runs_that_stage_with_its_reason_and_an_estimate_and_its_dependents_follow(built_tiny,
                                                                                                   tmp_path):
    p = copy_project(built_tiny, tmp_path / "p")
    p.edit("targets/travel.toml", *LR)
    lines = plan(p, TINY)
    assert lines["tiny-base"].startswith("fresh")
    adapter = lines["tiny-travel-adapter"]
    assert adapter.startswith("run: param learning_rate: 0.003 -> 0.004 [~"), adapter
    assert "s (median of 1 build of this target)]" in adapter  # the pass was built here before
    for name in ("tiny-travel-cpu-int4", TINY):
        assert lines[name].startswith("run: waits on upstream rebuild of "), lines[name]
    assert re.fullmatch(r"total: 4 stages \(1 fresh, 3 run\); run ~[\d.]+ s serial", lines["total"]), lines["total"]
    data = plan_json(p, TINY)
    recorded = json.loads(p.path("build/tiny-travel-adapter/.modelbuild/stamp.json").read_text())["seconds"]
    assert data["stages"][1]["estimate_s"] == recorded
    assert data["total"]["run_estimate_s"] == round(sum(s["estimate_s"] for s in data["stages"][1:]), 3)


def test_a_deleted_output_with_the_cache_intact_restores_locally_as_doit_then_does(built_tiny, tmp_path):
    p = copy_project(built_tiny, tmp_path / "p")
    shutil.rmtree(p.path("build/tiny-travel-cpu-int4"))
    lines = plan(p, TINY)
    assert re.fullmatch(r"restore locally: never built .*; cached build took [\d.]+ s \[[\d.]+ MB to copy\]",
                        lines["tiny-travel-cpu-int4"]), lines
    assert lines[TINY].startswith("fresh")  # the restored bundle is byte-identical: the smoke stage stays
    assert "1 restore locally" in lines["total"] and "MB to copy from the local cache" in lines["total"]
    size = plan_json(p, TINY)["stages"][2]["bytes"]
    assert size > 0
    built = p.doit(TINY)
    assert "'tiny-travel-cpu-int4': restored from cache" in built.out and "running on" not in built.out
    assert said(built, "restored from cache") == {"tiny-travel-cpu-int4"}
    assert built.executed - {"tiny-travel-cpu-int4"} == said(built, "output already complete")  # reused as planned
    assert size == sum(f.stat().st_size for f in p.path("build/tiny-travel-cpu-int4").rglob("*")
                       if f.is_file() and ".modelbuild" not in f.parts)
    assert plan(p, TINY)["total"] == "total: 4 stages (4 fresh)"


def test_unknown_target_is_one_line(built_tiny, tmp_path):
    result = built_tiny.modelbuild("plan", "tiny-base", "no-such-target")
    assert result.returncode == 2
    assert result.out.strip() == "modelbuild: unknown target 'no-such-target' (see: doit list)"


def test_default_targets_as_doit_builds_them(built_tiny):
    lines = plan(built_tiny)
    assert "smollm2-travel-cpu-int4-smoke" in lines and "smollm2-travel-cpu-int4-eval" in lines
    assert not any(name.startswith("tiny") for name in lines)
    assert lines["smollm2-base"].startswith("run: never built")


def test_the_remote_has_it_restore_remotely_with_bytes_as_doit_then_does(built_tiny, s3_server, tmp_path):  # noqa: F811
    from modelbuild.cache.remote import RemoteStore
    from modelbuild.cache.store import Store

    bucket = f"plan-{uuid.uuid4().hex[:8]}"
    make_bucket(s3_server, bucket)
    url = f"s3://{bucket}/modelbuild"
    env = {**s3_server.env(), "AWS_ENDPOINT_URL": s3_server.endpoint, "AWS_PROFILE": "",
           "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
           "MODELBUILD_REMOTE_CACHE": url}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:  # the team cache holds the tiny chain (pushed from the built project's local cache)
        remote, store = RemoteStore.from_url(url), Store(built_tiny.cache)
        for name in CHAIN:
            key = json.loads(built_tiny.path(f"build/{name}/.modelbuild/stamp.json").read_text())["action_key"]
            entry = json.loads((store.actions / f"{key}.json").read_text())
            remote.push(entry, {i["digest"]: store.object_path(i["digest"]) for i in entry["manifest"].values()})
    finally:
        for name, value in saved.items():
            os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)
    p = copy_project(built_tiny, tmp_path / "p")
    shutil.rmtree(p.path("build"))
    for folder in ("actions", "objects"):
        shutil.rmtree(p.cache / folder)
    lines = plan(p, TINY, env=env)
    for name in CHAIN:
        assert re.fullmatch(r"restore remotely: never built .*\[[\d.]+ MB to download\]", lines[name]), lines
    data = plan_json(p, TINY, env=env)
    assert data["total"]["bytes_remote"] == sum(s["bytes"] for s in data["stages"]) > 0
    built = p.doit(TINY, env=env)
    assert set(re.findall(r"'(\S+)': restored from the remote cache", built.out)) == set(CHAIN), built.out[-3000:]
    assert "running on" not in built.out

    # minimal download: what nothing here needs stays on the remote, as plan says beforehand
    q = copy_project(built_tiny, tmp_path / "q")
    shutil.rmtree(q.path("build"))
    for folder in ("actions", "objects"):
        shutil.rmtree(q.cache / folder)
    toplevel = {**env, "MODELBUILD_DOWNLOAD": "toplevel"}
    lines = plan(q, TINY, env=toplevel)
    assert all(lines[name].startswith("leave on the remote") for name in CHAIN[:-1]), lines
    assert lines[TINY].startswith("restore remotely")
    built = q.doit(TINY, env=toplevel)
    assert set(re.findall(r"'(\S+)': on the remote cache .*left there", built.out)) == set(CHAIN[:-1]), built.out
    assert plan(q, TINY, env=toplevel)["total"] == "total: 4 stages (4 fresh)"
