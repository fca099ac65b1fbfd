"""Sharing one cache across CPU generations (issue #24, item 6): real doit runs of the toy passes
(tests/core_project.py) against a real SeaweedFS (tests/s3server.py). No mock.

The CPU numerics branch (core/numerics.py) is part of every action key, and unpinned it is the
widest the CPU has: an AVX-512 machine and an AVX2 one never share an entry. ``init`` writes the
pin; a remote miss whose action the remote holds under another branch, and ``cache info``, say
so in one line with the pin that shares. Two machines are two branches this CPU can run, chosen
with ``MODELBUILD_CPU_NUMERICS`` (the key's only difference between them).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
import uuid

import pytest

from core_project import CHAIN, new_core_project, said
from s3server import make_bucket, s3_server  # noqa: F401 (fixture)
from test_trust import aws_env, ran

pytestmark = pytest.mark.core


def two_branches() -> tuple[str, str]:
    """(wide, narrow): this CPU's widest branch and the next narrower one, both runnable here."""
    from modelbuild.core.numerics import BRANCHES, widest

    names = list(BRANCHES)
    wide = widest()
    if wide not in names or names.index(wide) == len(names) - 1:
        pytest.skip(f"this CPU runs only one pinned branch ({wide})")
    return wide, names[names.index(wide) + 1]


def hint(here: str, others: str, pin: str, what: str = "it") -> str:
    return (f"the remote cache holds {what} built on CPU numerics branch {others}, not this machine's {here}: "
            f"to share one cache, pin [devices] cpu_numerics = \"{pin}\" in the project "
            f"(or MODELBUILD_CPU_NUMERICS={pin} on every machine)")


def test_init_writes_the_cpu_numerics_pin_the_project_then_builds_under(tmp_path):
    from modelbuild.cli.init_project import numerics_pin
    from modelbuild.core.numerics import missing

    folder = tmp_path / "p"
    env = {**os.environ, "MODELBUILD_CACHE": str(tmp_path / "cache")}
    env.pop("MODELBUILD_CPU_NUMERICS", None)
    made = subprocess.run([sys.executable, "-m", "modelbuild", "init", str(folder)], capture_output=True, text=True, env=env)
    assert made.returncode == 0, made.stderr
    pin = tomllib.loads((folder / "targets" / "devices.toml").read_text())["devices"]["cpu_numerics"]
    assert pin == numerics_pin() and missing(pin) is None
    if missing("avx2") is None:
        assert pin == "avx2"  # the branch AVX2 and AVX-512 machines share, whatever this one has
    devices = subprocess.run([sys.executable, "-m", "modelbuild", "devices"], cwd=folder, capture_output=True, text=True, env=env)
    assert devices.returncode == 0 and f"CPU numerics: {pin}" in devices.stdout, devices.stdout + devices.stderr
    listed = subprocess.run([sys.executable, "-m", "doit", "list"], cwd=folder, capture_output=True, text=True, env=env)
    assert listed.returncode == 0 and "tiny-travel-cpu-int4-smoke" in listed.stdout, listed.stderr


@pytest.fixture(scope="module")
def remote(s3_server, tmp_path_factory):
    """Machine W (the wide branch) has built the toy chain and pushed it."""
    wide, narrow = two_branches()
    base = tmp_path_factory.mktemp("numerics")
    name = f"branches-{uuid.uuid4().hex[:8]}"
    make_bucket(s3_server, name)
    env = {**aws_env(s3_server), "MODELBUILD_REMOTE_CACHE": f"s3://{name}/modelbuild"}
    w = new_core_project(base / "w")
    built = w.doit("shout", env={**env, "MODELBUILD_CPU_NUMERICS": wide})
    assert ran(built) == CHAIN and said(built, "pushed to the remote cache") == CHAIN, built.out[-3000:]
    assert w.stamp("words")["components"]["cpu_numerics"] == wide
    return {"env": {**env, "MODELBUILD_REMOTE_PUSH": "0"}, "push_env": env, "wide": wide, "narrow": narrow, "base": base}


def test_the_first_remote_miss_and_cache_info_say_the_remote_holds_another_branch_and_how_to_share(remote, tmp_path):
    wide, narrow, env = remote["wide"], remote["narrow"], remote["env"]
    same = new_core_project(tmp_path / "same")  # the control: the same branch restores, and nothing is said
    result = same.doit("shout", env={**env, "MODELBUILD_CPU_NUMERICS": wide})
    assert said(result, "restored from the remote cache") == CHAIN and "numerics branch" not in result.out, result.out
    info = same.modelbuild("cache", "info", env={**env, "MODELBUILD_CPU_NUMERICS": wide})
    assert info.returncode == 0 and not re.search(r"^numerics ", info.out, re.M), info.out

    n = new_core_project(tmp_path / "n")  # machine N, the narrow branch: nothing of W's is served
    info = n.modelbuild("cache", "info", env={**env, "MODELBUILD_CPU_NUMERICS": narrow})
    assert info.returncode == 0, info.out
    assert f"numerics {hint(narrow, wide, narrow, '1 of the 1 stages of the default targets keyed here')}" \
        in info.out.splitlines(), info.out
    result = n.doit("shout", env={**env, "MODELBUILD_CPU_NUMERICS": narrow})
    assert ran(result) == CHAIN and "restored" not in result.out, result.out[-3000:]
    lines = [line for line in result.out.splitlines() if "numerics branch" in line]
    assert lines == [f"modelbuild: 'words': not on the remote cache; {hint(narrow, wide, narrow)}"], result.out[-3000:]
    info = n.modelbuild("cache", "info", env={**env, "MODELBUILD_CPU_NUMERICS": narrow})  # now every stage keys here
    assert f"numerics {hint(narrow, wide, narrow, '3 of the 3 stages of the default targets keyed here')}" \
        in info.out.splitlines(), info.out


def test_pinning_the_branch_the_hint_names_makes_the_two_machines_share(remote, tmp_path):
    wide, narrow = remote["wide"], remote["narrow"]
    pin = f'\n[devices]\ncpu_numerics = "{narrow}"\n'
    w = new_core_project(tmp_path / "w-pinned")  # machine W with the pin: it can run the narrow branch
    w.append("targets/toy.toml", pin)
    built = w.doit("shout", env=remote["push_env"])
    assert ran(built) == CHAIN and said(built, "pushed to the remote cache") == CHAIN, built.out[-3000:]
    assert w.stamp("shout")["components"]["cpu_numerics"] == narrow
    n = new_core_project(tmp_path / "n-pinned")
    n.append("targets/toy.toml", pin)
    result = n.doit("shout", env=remote["env"])
    assert said(result, "restored from the remote cache") == CHAIN and n.runs() == [], result.out[-3000:]
    assert "numerics branch" not in result.out
    assert not re.search(r"^numerics ", n.modelbuild("cache", "info", env=remote["env"]).out, re.M)
