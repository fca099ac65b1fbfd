"""The CPU code branch is pinned per stage and recorded in the key (modelbuild/core/numerics.py).

MKL chose its AVX2 kernels at run time in 2 of 3 CI runs on this machine and the tiny adapter
trained to other bytes. The caller's environment stands in for that choice here: a stage must
train the same bytes whatever MKL branch the process that started doit would have picked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import new_project

from modelbuild.core.numerics import BRANCHES, widest

ADAPTER = "tiny-travel-adapter"
pytestmark = pytest.mark.skipif(widest() == "native", reason="no MKL branch to pin off x86")


def stamp(project, target):
    return json.loads(project.path(f"build/{target}/.modelbuild/stamp.json").read_text())


def rebuild(project, target, env):
    """``target`` built again from nothing: no output, an empty cache."""
    import shutil

    shutil.rmtree(project.path(f"build/{target}"))
    shutil.rmtree(project.cache)
    return project.doit(target, env=env)


def test_a_stage_trains_the_same_bytes_whatever_mkl_branch_the_caller_would_pick(tmp_path):
    project = new_project(tmp_path / "project")
    project.doit(ADAPTER)
    first = stamp(project, ADAPTER)
    assert first["components"]["cpu_numerics"] == widest()

    foreign = {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "default", "MKL_DYNAMIC": "TRUE"}
    result = rebuild(project, ADAPTER, foreign)
    assert ADAPTER in result.executed
    again = stamp(project, ADAPTER)
    assert again["action_key"] == first["action_key"]
    assert again["manifest"] == first["manifest"]  # adapter weights and the loss curve, byte for byte


def test_the_pass_process_runs_on_the_branch_the_key_records(tmp_path):
    """MKL, torch and oneDNN are told the branch, whatever the caller's environment says."""
    project = new_project(tmp_path / "project")
    for path in project.path("targets").glob("*.toml"):
        path.unlink()
    project.path("targets/probe.toml").write_text('[target.probe]\npass = "device-probe"\nparams = { seconds = 0 }\n')
    for chosen in (None, "compatible"):
        env = {"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
        if chosen:
            env["MODELBUILD_CPU_NUMERICS"] = chosen
        project.doit("probe", env=env)
        branch = stamp(project, "probe")["components"]["cpu_numerics"]
        assert branch == (chosen or widest())
        _, mkl, aten, onednn = BRANCHES[branch]
        seen = json.loads(project.path("build/probe/device.json").read_text())["environment"]
        assert (seen["MKL_CBWR"], seen["ATEN_CPU_CAPABILITY"], seen["ONEDNN_MAX_CPU_ISA"]) == (f"{mkl},STRICT", aten, onednn)


def test_another_branch_is_another_key_and_why_says_so(tmp_path):
    project = new_project(tmp_path / "project")
    project.doit(ADAPTER)
    first = stamp(project, ADAPTER)
    other = "compatible" if widest() != "compatible" else "avx2"
    if other not in BRANCHES or other == widest():
        pytest.skip("this CPU has one branch only")

    shown = project.modelbuild("devices", env={"MODELBUILD_CPU_NUMERICS": other})
    assert f"CPU numerics: {other} (the widest this CPU has: {widest()})" in shown.out, shown.out
    why = project.modelbuild("why", ADAPTER, env={"MODELBUILD_CPU_NUMERICS": other})
    assert f"cpu numerics: {widest()} -> {other}" in why.out, why.out
    built = project.doit(ADAPTER, env={"MODELBUILD_CPU_NUMERICS": other})
    assert {"tiny-base", ADAPTER} <= built.executed
    moved = stamp(project, ADAPTER)
    assert moved["components"]["cpu_numerics"] == other and moved["action_key"] != first["action_key"]
    assert moved["manifest"]["adapter_model.safetensors"] != first["manifest"]["adapter_model.safetensors"]
    # back on this machine's own branch: both builds are cache entries, no pass runs
    project.doit(ADAPTER)
    assert stamp(project, ADAPTER)["origin"] == "restored from cache"
    assert stamp(project, ADAPTER)["manifest"] == first["manifest"]


def test_a_branch_that_cannot_run_here_is_one_line_at_load(tmp_path):
    project = new_project(tmp_path / "project")
    project.path("targets/devices.toml").write_text('[devices]\ncpu_numerics = "avx1024"\n')
    result = project.doit(ADAPTER, check=False)
    assert result.returncode != 0 and not project.path("build").exists()
    assert result.out.strip().splitlines()[-1] == ("modelbuild: targets/devices.toml: devices.cpu_numerics: unknown CPU "
                                                   "numerics branch 'avx1024' (known: avx512, avx2, compatible, native)")
    project.path("targets/devices.toml").write_text('[devices]\ncpu_numerics = "native"\n')
    result = project.doit(ADAPTER, check=False)
    assert result.returncode != 0 and not project.path("build").exists()
    assert result.out.strip().splitlines()[-1] == (
        "modelbuild: targets/devices.toml: devices.cpu_numerics = native: an x86 machine pins a branch "
        "(avx512, avx2, compatible), not 'native'")


def test_a_worker_refuses_a_plan_for_a_branch_its_cpu_lacks(tmp_path):
    """What a Ray node of another CPU does with the driver's plan: refuse before running."""
    out = tmp_path / "out"
    out.mkdir()
    plan = {"target": "probe", "file": "targets/t.toml", "pass": "device-probe", "params": {"seconds": 0, "size": 8},
            "inputs": {}, "input_names": {}, "output_dir": str(out), "device": "cpu", "threads": 1,
            "cache_dir": str(tmp_path / "cache"), "cpu_numerics": "native"}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    proc = subprocess.run([sys.executable, "-m", "modelbuild.exec.worker", str(tmp_path / "plan.json")],
                          capture_output=True, text=True, env={**os.environ, "MODELBUILD_THREADS": "1"})
    assert proc.returncode == 2 and not any(out.iterdir())
    assert proc.stderr.strip() == ("modelbuild: targets/t.toml: target 'probe': CPU numerics native: an x86 machine pins a branch "
                                   "(avx512, avx2, compatible), not 'native'")
