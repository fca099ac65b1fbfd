"""Stages on a real local Ray cluster (tests/ray_cluster.py: a head node and a node with two
simulated GPUs, on 127.0.0.1) sharing a real S3 cache (SeaweedFS, tests/s3server.py). No mocks.

The pytest process is the Ray driver (``RayExecutor.connect``); each test has its own remote
prefix, so "nothing pushed" is a listing of that prefix.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import obstore
import pytest

pytest.importorskip("ray")

from modelbuild.exec.devices import stage_environment  # noqa: E402
from modelbuild.core.numerics import widest  # noqa: E402
from modelbuild.core.key import versions  # noqa: E402
from modelbuild.exec.ray_exec import RayExecutor, RayStageError, check_versions, fetch_outputs  # noqa: E402
from modelbuild.cache.remote import RemoteStore  # noqa: E402
from ray_cluster import start_cluster  # noqa: E402
from s3server import free_ports, make_bucket, s3_server  # noqa: E402,F401 (fixture)
from test_remote import raw_store, tree, use_server  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "targets" / "data" / "tokenizer_corpus.txt"
BUCKET = "modelbuild-ray"


@pytest.fixture(scope="module")
def cluster(s3_server):
    make_bucket(s3_server, BUCKET)
    started = start_cluster(env={**s3_server.env(), "HF_HUB_OFFLINE": "1"})
    try:
        yield started
    finally:
        import ray

        ray.shutdown()
        started.stop()
        assert not started.our_pids(), "Ray processes of this test cluster survived its teardown"


@pytest.fixture
def remote(s3_server, cluster, monkeypatch) -> RemoteStore:
    use_server(monkeypatch, s3_server)
    return RemoteStore.from_url(f"s3://{BUCKET}/t-{uuid.uuid4().hex[:10]}")


@pytest.fixture
def executor(cluster, remote) -> RayExecutor:
    return RayExecutor.connect(cluster.address, gpu_memory_gb=16)


def gpu_node_id() -> str:
    import ray

    return next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU"))


def probe_plan(target: str, seconds: float = 0) -> dict:
    return {"target": target, "file": "targets/test.toml", "pass": "device-probe",
            "params": {"seconds": seconds, "size": 64}, "input_names": {}, "cpu_numerics": widest()}


def results_pushed(remote: RemoteStore) -> list[str]:
    metas = [m for batch in obstore.list(raw_store(remote.url), prefix="actions/") for m in batch]
    return [m["path"] for m in metas if "ray-result-" in m["path"]]


def probe(remote: RemoteStore, result: dict, tmp_path: Path) -> dict:
    dest = tmp_path / result["action_key"]
    fetch_outputs(result, dest, remote)
    return json.loads((dest / "device.json").read_text())


def pass_process(marker: str, timeout: float = 90) -> int:
    """Pid of the pass process (``python -m modelbuild.exec.worker <scratch>/plan.json``) of a stage."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            try:
                cmd = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"modelbuild.exec.worker" in cmd and marker.encode() in cmd:
                return int(entry.name)
        time.sleep(0.2)
    raise AssertionError(f"no pass process for {marker} within {timeout} s")


def gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
        except OSError:
            return True
        if state == "Z":
            return True
        time.sleep(0.2)
    return False


def test_random_init_on_ray_is_byte_identical_to_a_local_run(executor, remote, tmp_path):
    plan = {"target": "tiny-base", "file": "targets/models.toml", "pass": "random-init", "params": {"seed": 0},
            "input_names": {"corpus": "data/tokenizer_corpus.txt"}, "cpu_numerics": widest()}
    local_out = tmp_path / "local"
    local_out.mkdir()
    local_plan = {**plan, "inputs": {"corpus": str(CORPUS)}, "output_dir": str(local_out), "device": "cpu",
                  "assigned_device": "cpu", "threads": 1, "cache_dir": str(tmp_path / "cache")}
    (tmp_path / "plan.json").write_text(json.dumps(local_plan))
    env = {**os.environ, **stage_environment("cpu", 1, "", widest())}
    subprocess.run([sys.executable, "-m", "modelbuild.exec.worker", str(tmp_path / "plan.json")], env=env, check=True)

    result = executor.run_stage(plan, {"corpus": CORPUS}, remote, "cpu", 1)
    assert result["ran_on"]["executor"] == "ray" and result["ran_on"]["device"] == "cpu"
    assert result["versions"] == versions(("modelbuild",))
    fetched = tmp_path / "fetched"
    fetch_outputs(result, fetched, remote)
    assert tree(fetched) == tree(local_out)  # every file, byte for byte
    assert "model.safetensors" in result["manifest"] and len(results_pushed(remote)) == 1


def test_cuda_stages_land_on_the_gpu_node_and_cpu_stages_spread(executor, remote, tmp_path):
    gpu_node = gpu_node_id()
    runs = [executor.submit(probe_plan("probe-cuda"), {}, remote, "cuda", 1)]
    runs += [executor.submit(probe_plan(f"probe-cpu-{i}", seconds=3), {}, remote, "cpu", 1) for i in range(2)]
    gpu_result, *cpu_results = [run.result(timeout=180) for run in runs]

    assert gpu_result["ran_on"]["node"] == gpu_node and gpu_result["ran_on"]["gpu_ids"] in (["0"], ["1"])
    seen = probe(remote, gpu_result, tmp_path)
    assert seen["environment"]["CUDA_VISIBLE_DEVICES"] == gpu_result["ran_on"]["gpu_ids"][0]
    assert seen["simulated"] is True and seen["assigned_device"] == f"cuda:{gpu_result['ran_on']['gpu_ids'][0]}"
    # Two 1-CPU stages at once on two 1-CPU nodes: one of them runs off the GPU node.
    assert {r["ran_on"]["node"] for r in cpu_results} != {gpu_node}
    for result in cpu_results:
        assert probe(remote, result, tmp_path)["environment"]["CUDA_VISIBLE_DEVICES"] == ""


def test_gpu_memory_shares_let_small_gpu_stages_share_a_gpu(executor, remote, tmp_path):
    # 8 of 16 GB = half a GPU each: three stages on two GPUs run at once, two of them on one GPU.
    runs = [executor.submit(probe_plan(f"probe-half-{i}", seconds=4), {}, remote, "cuda", 1, gpu_memory_gb=8)
            for i in range(3)]
    results = [run.result(timeout=240) for run in runs]
    gpus = [probe(remote, r, tmp_path)["environment"]["CUDA_VISIBLE_DEVICES"] for r in results]
    assert len(set(gpus)) < len(gpus) and set(gpus) <= {"0", "1"}
    latest_start = max(r["ran_on"]["started"] for r in results)
    earliest_end = min(r["ran_on"]["ended"] for r in results)
    assert latest_start < earliest_end, "the three half-GPU stages did not all run at the same time"


def test_cuda_index_is_refused_in_one_line_before_anything_is_pushed(executor, remote):
    with pytest.raises(RayStageError) as caught:
        executor.run_stage(probe_plan("probe-pinned"), {}, remote, "cuda:1", 1)
    assert "cuda:1" in str(caught.value) and 'device = "cuda"' in str(caught.value)
    assert "\n" not in str(caught.value) and remote.info()["actions"] == 0


def test_a_stage_no_node_can_run_is_refused_in_one_line(executor, remote):
    with pytest.raises(RayStageError) as caught:  # 4 threads, and each node declares 1 CPU
        executor.run_stage(probe_plan("probe-wide"), {}, remote, "cpu", 4)
    assert "4 CPU(s)" in str(caught.value) and "\n" not in str(caught.value) and remote.info()["actions"] == 0


@pytest.mark.parametrize("victim", ["pass process", "ray worker"])
def test_a_stage_killed_mid_run_is_a_one_line_error_and_pushes_nothing(executor, remote, victim):
    target = f"probe-killed-{uuid.uuid4().hex[:6]}"
    run = executor.submit(probe_plan(target, seconds=120), {}, remote, "cpu", 1)
    pid = pass_process(f"-{target}-")
    kill = pid if victim == "pass process" else int(Path(f"/proc/{pid}/stat").read_text().split(") ")[1].split()[1])
    os.kill(kill, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(RayStageError) as caught:
        run.result(timeout=120)
    message = str(caught.value)
    assert "\n" not in message and target in message and time.monotonic() - started < 60
    assert ("exit -9" in message) if victim == "pass process" else ("died mid-stage" in message)
    assert gone(pid), "the pass process outlived its Ray worker"
    assert results_pushed(remote) == []


def test_interrupting_the_wait_cancels_the_ray_task(executor, remote):
    target = f"probe-ctrl-c-{uuid.uuid4().hex[:6]}"
    run = executor.submit(probe_plan(target, seconds=120), {}, remote, "cpu", 1)
    pid = pass_process(f"-{target}-")

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    try:
        with pytest.raises(KeyboardInterrupt):
            run.result()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert gone(pid), "the pass process kept running after Ctrl-C"
    with pytest.raises(RayStageError, match="cancelled|died"):
        run.result(timeout=60)
    assert results_pushed(remote) == []


def test_an_unreachable_cluster_is_a_one_line_error_within_seconds(cluster):
    port = free_ports(1)[0]
    started = time.monotonic()
    with pytest.raises(RayStageError) as caught:
        RayExecutor.connect(f"127.0.0.1:{port}")
    assert time.monotonic() - started < 10
    assert f"127.0.0.1:{port}" in str(caught.value) and "\n" not in str(caught.value)


def test_a_worker_with_other_library_versions_is_refused(executor, remote):
    expected = versions(("numpy",))
    wrong = {**expected, "libraries": {**expected["libraries"], "numpy": "0.0.1"}}
    with pytest.raises(RayStageError) as caught:  # the worker refuses before running the pass
        executor.run_stage(probe_plan("probe-versions"), {}, remote, "cpu", 1, expected_versions=wrong)
    assert "numpy" in str(caught.value) and "0.0.1" in str(caught.value) and "\n" not in str(caught.value)
    assert results_pushed(remote) == []
    # and the driver refuses a result that reports other versions than its action key holds
    reported = {**expected, "python": "3.99"}
    with pytest.raises(RayStageError, match=r"python 3\.99 \(driver"):
        check_versions(expected, reported, "target 'x': Ray worker n1")
