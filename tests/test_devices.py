"""Device slots: parallel doit runs never oversubscribe a device, and GPU targets fail clearly
where there is no GPU. Simulated GPUs stand in for real ones (CI has none); the stages are real
device-probe passes in their own processes, and their stamps record when each ran and where."""

from __future__ import annotations

import itertools
import json
import sys
import time

from conftest import new_project, run_cmd

from modelbuild.core.stamp import read_stamp

NO_GPU = {"MODELBUILD_GPUS": "none"}


def probe_project(tmp_path, devices: str, targets: str):
    project = new_project(tmp_path / "project")
    for path in project.path("targets").glob("*.toml"):
        path.unlink()  # only the probes: no need to load the travel recipe here
    project.path("targets/probe.toml").write_text(devices + "\n" + targets)
    return project


def runs(project) -> dict[str, dict]:
    """target -> ran_on record (device, threads, started, ended) plus what the stage process saw."""
    out = {}
    for folder in sorted(project.path("build").iterdir()):
        stamp = read_stamp(folder)
        if stamp and "ran_on" in stamp:
            seen = json.loads((folder / "device.json").read_text())
            out[folder.name] = {**stamp["ran_on"], "seen": seen}
    return out


def peak_concurrency(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals], key=lambda e: (e[0], e[1]))
    peak = current = 0
    for _, change in events:
        current += change
        peak = max(peak, current)
    return peak


def overlaps(a: dict, b: dict) -> bool:
    return a["started"] < b["ended"] and b["started"] < a["ended"]


SIMULATED = """
[devices]
gpus = [0, 1]
simulated = true
cpu_slots = 2
cpu_threads = 4
"""

# Distinct seconds per target: identical actions would be built once and restored (early cutoff).
MIXED_GRAPH = """
[target."any-gpu-{s}"]
pass = "device-probe"
device = "cuda"
params = { seconds = "{s}" }
matrix = { s = [1.0, 1.05, 1.1, 1.15] }

[target.gpu1-pinned]
pass = "device-probe"
device = "cuda:1"
params = { seconds = 1.2 }

[target."cpu-{s}"]
pass = "device-probe"
params = { seconds = "{s}" }
matrix = { s = [1.0, 1.05, 1.1] }
"""


def test_mixed_graph_never_oversubscribes_a_slot_and_uses_them_in_parallel(tmp_path):
    project = probe_project(tmp_path, SIMULATED, MIXED_GRAPH)
    started = time.perf_counter()
    result = project.doit("-n", "4")
    wall = time.perf_counter() - started
    record = runs(project)
    assert len(record) == 8, result.out
    by_slot: dict[str, list[dict]] = {}
    for name, run in record.items():
        by_slot.setdefault(run["device"], []).append(run)
        seen = run["seen"]
        assert seen["assigned_device"] == run["device"]
        if run["device"] == "cpu":
            assert seen["environment"]["CUDA_VISIBLE_DEVICES"] == ""
        else:
            assert seen["environment"]["CUDA_VISIBLE_DEVICES"] == run["device"].split(":")[1]
            assert seen["environment"]["MODELBUILD_SIMULATED_GPUS"] == "1"
        assert seen["threads"] == 2 and seen["environment"]["OMP_NUM_THREADS"] == "2"  # 4 threads / 2 CPU slots
        assert f"'{name}' running on {run['device']}" in result.out
    assert record["gpu1-pinned"]["device"] == "cuda:1"
    assert set(by_slot) == {"cpu", "cuda:0", "cuda:1"}, by_slot.keys()
    for gpu in ("cuda:0", "cuda:1"):
        assert peak_concurrency([(r["started"], r["ended"]) for r in by_slot[gpu]]) == 1, gpu
    assert peak_concurrency([(r["started"], r["ended"]) for r in by_slot["cpu"]]) <= 2
    different_slots_overlapped = any(
        overlaps(a, b) for a, b in itertools.combinations(record.values(), 2) if a["device"] != b["device"]
    )
    assert different_slots_overlapped
    serial = sum(r["ended"] - r["started"] for r in record.values())
    assert wall < serial, (wall, serial)  # parallel for real, not one after another


def test_gpu_memory_budget_lets_small_stages_share_a_gpu(tmp_path):
    devices = "[devices]\ngpus = [0]\ngpu_memory_gb = 10\nsimulated = true\n"
    targets = """
[target."small-{s}"]
pass = "device-probe"
device = "cuda:0"
gpu_memory_gb = 5
params = { seconds = "{s}" }
matrix = { s = [1.0, 1.05, 1.1] }

[target.whole]
pass = "device-probe"
device = "cuda"
params = { seconds = 1.15 }
"""
    project = probe_project(tmp_path, devices, targets)
    project.doit("-n", "4")
    record = runs(project)
    small = [r for name, r in record.items() if name.startswith("small-")]
    assert peak_concurrency([(r["started"], r["ended"]) for r in small]) == 2  # 5 + 5 GB fit in 10, not 15
    assert not any(overlaps(record["whole"], r) for r in small)  # no budget declared: the whole GPU


def test_cpu_slots_follow_doit_jobs_and_split_the_threads(tmp_path):
    devices = "[devices]\ncpu_threads = 2\n"
    targets = '[target."cpu-{s}"]\npass = "device-probe"\nparams = { seconds = "{s}" }\nmatrix = { s = [1.0, 1.05] }\n'
    project = probe_project(tmp_path, devices, targets)
    project.doit("-n", "2")
    parallel = runs(project)
    assert overlaps(*parallel.values())
    assert {r["threads"] for r in parallel.values()} == {1}
    project.doit("forget")
    project.doit("-n", "1", env={"MODELBUILD_FORCE": "1"})
    serial = runs(project)
    assert not overlaps(*serial.values())
    assert {r["threads"] for r in serial.values()} == {2}


def test_gpu_targets_fail_fast_without_a_gpu_and_leave_the_defaults(project):
    """The real travel recipe on this GPU-less machine: the CUDA bundle is refused at once,
    before its (CPU) adapter would spend minutes training; CPU targets stay the default."""
    started = time.perf_counter()
    result = project.doit("smollm2-travel-cuda-int4", env=NO_GPU, check=False)
    assert result.returncode != 0
    assert time.perf_counter() - started < 20
    assert ("targets/travel.toml: target 'smollm2-travel-cuda-int4': device cuda: this machine has no CUDA GPU"
            in result.out), result.out
    assert not project.path("build/smollm2-travel-adapter").exists()
    assert not project.path("build/smollm2-base").exists()
    listing = project.doit("list", env=NO_GPU).out
    assert "smollm2-travel-cuda-int4 " in listing and "not on this machine" in listing
    code = "from modelbuild.tasks import doit_config; print(doit_config('.')['default_tasks'])"
    defaults = run_cmd([sys.executable, "-c", code], project.root, {**project.env(), **NO_GPU}).out.strip()
    assert defaults == "['smollm2-travel-cpu-int4-smoke', 'smollm2-travel-cpu-int4-eval']", defaults


def test_pinned_gpu_missing_from_a_gpu_machine_is_named(tmp_path):
    project = probe_project(tmp_path, "[devices]\ngpus = [0]\nsimulated = true\n",
                            '[target.on-gpu3]\npass = "device-probe"\ndevice = "cuda:3"\n'
                            '[target.on-cpu]\npass = "device-probe"\nparams = { seconds = 0 }\n')
    result = project.doit("on-gpu3", check=False)
    assert result.returncode != 0
    assert "target 'on-gpu3': device cuda:3: no GPU cuda:3 here (have cuda:0)" in result.out
    default = project.doit()  # the default set leaves out what cannot build here
    assert default.executed == {"on-cpu"}, default.out


def test_bad_device_configuration_is_one_line_naming_file_and_key(tmp_path):
    project = probe_project(tmp_path, "[devices]\ncpu_slots = 0\n", '[target.p]\npass = "device-probe"\n')
    result = project.doit(check=False)
    assert result.returncode != 0
    assert "targets/probe.toml: devices.cpu_slots: must be positive" in result.out
    assert "Traceback" not in result.out
    project.path("targets/probe.toml").write_text('[devices]\ngpu = [0]\n[target.p]\npass = "device-probe"\n')
    result = project.doit(check=False)
    assert "targets/probe.toml: devices.gpu: unknown key" in result.out
    project.path("targets/probe.toml").write_text('[target.p]\npass = "device-probe"\ngpu_memory_gb = 4\n')
    result = project.doit(check=False)
    assert "targets/probe.toml: target 'p': gpu_memory_gb: only for cuda targets (device is cpu)" in result.out


def test_device_preference_takes_the_first_device_the_machine_has_and_keys_it(tmp_path):
    """device = ["cuda", "cpu"]: resolved when the targets load, recorded in the key as the device
    actually used, so a GPU build and a CPU build of the same stage are different cached actions."""
    project = probe_project(tmp_path, "", '[target.pref]\npass = "device-probe"\ndevice = ["cuda", "cpu"]\n'
                                          'params = { seconds = 0 }\n')
    project.doit("pref", env=NO_GPU)
    on_cpu = read_stamp(project.path("build/pref"))
    assert on_cpu["components"]["device"] == "cpu" and on_cpu["ran_on"]["device"] == "cpu"
    gpu = {"MODELBUILD_GPUS": "0", "MODELBUILD_SIMULATED_GPUS": "1"}
    assert project.doit("pref", env=gpu).executed == {"pref"}  # another device, another action
    on_gpu = read_stamp(project.path("build/pref"))
    assert on_gpu["components"]["device"] == "cuda" and on_gpu["ran_on"]["device"] == "cuda:0"
    assert on_gpu["action_key"] != on_cpu["action_key"]
    for device, message in [('[]', "device: [] is not cpu, cuda, cuda:N or a list of them"),
                            ('["cuda"]', "device: none of cuda is available (this machine has no CUDA GPU"),
                            ('["tpu", "cpu"]', "device: ['tpu', 'cpu'] is not cpu, cuda, cuda:N")]:
        project.path("targets/probe.toml").write_text(f'[target.pref]\npass = "device-probe"\ndevice = {device}\n')
        result = project.doit("list", env=NO_GPU, check=False)
        assert result.returncode == 2 and f"targets/probe.toml: target 'pref': {message}" in result.out, result.out
