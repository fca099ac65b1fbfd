"""doit with MODELBUILD_EXECUTOR=ray: the tiny recipe's stages run as tasks on a real local Ray
cluster (tests/ray_cluster.py, two nodes on 127.0.0.1) through a real S3 cache (SeaweedFS), and
come out byte-identical to a local build, every stamp naming the Ray executor. No mocks."""

from __future__ import annotations

import json
import re
import uuid

import obstore
import pytest

pytest.importorskip("ray")

from conftest import TINY, new_project  # noqa: E402
from modelbuild.core.numerics import BRANCHES  # noqa: E402
from modelbuild.cache.remote import RemoteStore  # noqa: E402
from ray_cluster import start_cluster  # noqa: E402
from s3server import free_ports, make_bucket, s3_server  # noqa: E402,F401 (fixture)
from test_remote import raw_store  # noqa: E402
from test_remote_cache import aws_env, files  # noqa: E402

ALL = {"tiny-base", "tiny-travel-adapter", "tiny-travel-cpu-int4", TINY}
ONE_THREAD = {"MODELBUILD_CPU_THREADS": "1"}  # the test nodes declare one CPU each


@pytest.fixture(scope="module")
def cluster(s3_server):
    started = start_cluster(env={**s3_server.env(), "HF_HUB_OFFLINE": "1"})
    try:
        yield started
    finally:
        started.stop()


def stamp(project, target) -> dict:
    return json.loads(project.path(f"build/{target}/.modelbuild/stamp.json").read_text())


def probe_project(root, name: str, device: str):
    """A project whose only target is a device-probe stage ``name`` on ``device`` (TOML text)."""
    project = new_project(root)
    for path in project.path("targets").glob("*.toml"):
        path.unlink()
    project.path("targets/probe.toml").write_text(f'[target.{name}]\npass = "device-probe"\ndevice = {device}\n'
                                                  'params = { seconds = 0 }\n')
    return project


def ray_env(server, address: str) -> dict:
    bucket = f"ray-exec-{uuid.uuid4().hex[:8]}"
    make_bucket(server, bucket)
    return {**aws_env(server), **ONE_THREAD, "MODELBUILD_REMOTE_CACHE": f"s3://{bucket}/modelbuild",
            "MODELBUILD_EXECUTOR": "ray", "RAY_ADDRESS": address}


def test_the_tiny_recipe_on_ray_is_byte_identical_to_a_local_build(s3_server, cluster, tmp_path, monkeypatch):
    local = new_project(tmp_path / "local")
    local.doit(TINY, env=ONE_THREAD)
    on_ray = new_project(tmp_path / "on-ray")
    env = ray_env(s3_server, cluster.address)
    result = on_ray.doit(TINY, env=env)
    assert result.executed == ALL, result.out[-3000:]
    for target in ALL:
        assert f"modelbuild: '{target}' running on the Ray cluster (cpu)" in result.out
        ran_on = stamp(on_ray, target)["ran_on"]
        assert ran_on["executor"] == "ray" and ran_on["node"], ran_on
        assert stamp(on_ray, target)["manifest"] == stamp(local, target)["manifest"], target
        assert stamp(on_ray, target)["action_key"] == stamp(local, target)["action_key"]  # where it ran is no input
        assert stamp(local, target)["ran_on"]["executor"] == "local"
    # minimal download: the driver holds the files it was asked for; the intermediates stay remote
    assert files(on_ray, TINY) == files(local, TINY)
    for target in ALL - {TINY}:
        assert files(on_ray, target) == {} and stamp(on_ray, target)["left_on_remote"] == env["MODELBUILD_REMOTE_CACHE"]
    assert on_ray.doit(TINY, env=env).executed == set()
    bundle = on_ray.doit("tiny-travel-cpu-int4", env=env)  # asked for: downloaded, nothing runs
    assert "running on" not in bundle.out and files(on_ray, "tiny-travel-cpu-int4") == files(local, "tiny-travel-cpu-int4")

    # a left input the remote has lost: the run rebuilds it on Ray (and pushes it back), then goes on
    for name, value in aws_env(s3_server).items():
        monkeypatch.setenv(name, value)
    for info in stamp(on_ray, "tiny-base")["manifest"].values():
        obstore.delete(raw_store(env["MODELBUILD_REMOTE_CACHE"]), RemoteStore.object_key(info["digest"]))
    on_ray.edit("targets/travel.toml", 'vars = { model = "tiny", steps = 30,', 'vars = { model = "tiny", steps = 29,')
    again = on_ray.doit("tiny-travel-adapter", env=env)
    assert "'tiny-travel-adapter': input base (:tiny-base) cannot be had from the remote cache" in again.out
    assert set(re.findall(r"'(\S+)' running on the Ray cluster", again.out)) == {"tiny-base", "tiny-travel-adapter"}
    assert files(on_ray, "tiny-base") == files(local, "tiny-base")


def test_ray_without_a_remote_cache_or_cluster_is_one_line_before_anything_runs(s3_server, cluster, tmp_path):
    project = new_project(tmp_path / "project")
    env = ray_env(s3_server, cluster.address)
    no_remote = project.doit(TINY, env={**env, "MODELBUILD_REMOTE_CACHE": "off"}, check=False)
    assert no_remote.returncode == 2, no_remote.out
    assert no_remote.out.strip() == ("modelbuild: Ray executor: stages exchange inputs and outputs through the remote "
                                     "cache; set MODELBUILD_REMOTE_CACHE=s3://bucket/prefix (or [cache] remote) as on every node")
    dead = f"127.0.0.1:{free_ports(1)[0]}"
    unreachable = project.doit(TINY, env={**env, "RAY_ADDRESS": dead}, check=False)
    assert unreachable.returncode == 2, unreachable.out
    assert unreachable.out.startswith(f"modelbuild: Ray cluster {dead} unreachable: ")
    assert len(unreachable.out.strip().splitlines()) == 1
    assert not project.path("build/tiny-base").exists()


def test_a_cuda_stage_goes_to_the_gpu_node_though_the_driver_has_no_gpu(s3_server, cluster, tmp_path):
    """With Ray the cluster places stages: a driver without a GPU still builds cuda targets (on
    the node that declares GPUs), and cuda:N, a GPU of one machine, is refused at load."""
    project = probe_project(tmp_path / "project", "on-gpu", '"cuda"')
    env = {**ray_env(s3_server, cluster.address), "MODELBUILD_GPUS": "none"}
    result = project.doit("on-gpu", env=env)
    assert result.executed == {"on-gpu"}, result.out[-2000:]
    ran_on = stamp(project, "on-gpu")["ran_on"]
    seen = json.loads(project.path("build/on-gpu/device.json").read_text())
    assert ran_on["executor"] == "ray" and ran_on["device"].startswith("cuda:") and ran_on["gpu_ids"]
    assert seen["environment"]["CUDA_VISIBLE_DEVICES"] == ",".join(ran_on["gpu_ids"])
    branch = stamp(project, "on-gpu")["components"]["cpu_numerics"]  # pinned on the node as the key says
    assert seen["environment"]["MKL_CBWR"] == f"{BRANCHES[branch][1]},STRICT"
    assert seen["environment"]["ATEN_CPU_CAPABILITY"] == BRANCHES[branch][2]
    project.path("targets/probe.toml").write_text('[target.pinned]\npass = "device-probe"\ndevice = "cuda:1"\n')
    refused = project.doit("pinned", env=env, check=False)
    assert refused.returncode != 0
    assert "target 'pinned': device cuda:1: names a GPU of one machine; on a Ray cluster declare device = \"cuda\"" in refused.out


def test_a_device_preference_list_asks_the_cluster_not_the_driver(s3_server, cluster, tmp_path):
    """device = ["cuda", "cpu"] under the Ray executor: the cluster has a GPU node, so the stage
    is keyed and run as cuda though the driver has no GPU; the same target built locally on this
    GPU-less machine is a cpu action (another key). Each run asks again after loading the
    cached graph, and a list the cluster cannot honour is one line at load."""
    project = probe_project(tmp_path / "project", "pref", '["cuda", "cpu"]')
    env = {**ray_env(s3_server, cluster.address), "MODELBUILD_GPUS": "none"}
    assert project.doit("pref", env=env).executed == {"pref"}
    on_ray = stamp(project, "pref")
    assert on_ray["components"]["device"] == "cuda", on_ray["components"]
    assert on_ray["ran_on"]["executor"] == "ray" and on_ray["ran_on"]["device"].startswith("cuda:")
    assert project.doit("pref", env=env).executed == set()  # the next run asks again and agrees
    local = project.doit("pref", env={**ONE_THREAD, "MODELBUILD_GPUS": "none"})
    assert local.executed == {"pref"}, local.out[-2000:]
    assert stamp(project, "pref")["components"]["device"] == "cpu"
    assert stamp(project, "pref")["action_key"] != on_ray["action_key"]
    project.path("targets/probe.toml").write_text('[target.pref]\npass = "device-probe"\ndevice = ["cuda:0"]\n')
    refused = project.doit("pref", env=env, check=False)
    assert refused.returncode == 2 and len(refused.out.strip().splitlines()) == 1, refused.out
    assert ("targets/probe.toml: target 'pref': device: none of cuda:0 is available (cuda:0 names a GPU of one "
            "machine; on a Ray cluster declare device = \"cuda\")") in refused.out
