"""Per-stage overhead of the Ray executor vs the local one, and a timeline per node.

    .venv/bin/python bench/ray_overhead.py [--repeat 4] [--matrix 4]

Starts its own SeaweedFS (tests/s3server.py) and two-node Ray cluster with two simulated GPUs
(tests/ray_cluster.py), both on 127.0.0.1, and stops them (by pid) at the end.

1. Overhead: the same tiny stages run as a local pass process (what stage.py does: plan.json +
   ``python -m modelbuild.exec.worker``) and through ``RayExecutor.run_stage`` + ``fetch_outputs``
   (inputs pushed, task scheduled, inputs fetched, pass process, outputs hashed and pushed,
   result fetched). Stages: ``device-probe`` with seconds = 0 (nothing but the pass process) and
   ``random-init`` of the tiny Phi3 (a real artifact of ~2 MB). Overhead = median Ray - median local.
   The first Ray task of a cluster also starts a Ray worker process; it is reported apart.
2. Timeline: a small variant matrix (``--matrix`` device-probe stages on cpu and as many on
   cuda with half a GPU each, 1 s of load each) submitted at once; when and where each ran.

Prints a table and writes bench/results/ray_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from modelbuild.exec.devices import stage_environment  # noqa: E402
from modelbuild.core.numerics import widest  # noqa: E402
from ray_cluster import start_cluster  # noqa: E402
from s3server import make_bucket, start_weed, stop_weed  # noqa: E402

CORPUS = REPO / "targets" / "data" / "tokenizer_corpus.txt"
STAGES = {
    "device-probe": ({"target": "probe", "file": "bench", "pass": "device-probe", "params": {"seconds": 0, "size": 64},
                      "input_names": {}, "cpu_numerics": widest()}, {}),
    "random-init": ({"target": "tiny-base", "file": "bench", "pass": "random-init", "params": {"seed": 0},
                     "input_names": {"corpus": "data/tokenizer_corpus.txt"}, "cpu_numerics": widest()}, {"corpus": CORPUS}),
}


def run_local(plan: dict, inputs: dict, work: Path) -> float:
    out = work / uuid.uuid4().hex
    out.mkdir(parents=True)
    full = {**plan, "inputs": {k: str(v) for k, v in inputs.items()}, "output_dir": str(out), "device": "cpu",
            "assigned_device": "cpu", "threads": 1, "cache_dir": str(work / "cache")}
    (out.parent / "plan.json").write_text(json.dumps(full))
    env = {**os.environ, **stage_environment("cpu", 1, "", widest())}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "modelbuild.exec.worker", str(out.parent / "plan.json")], env=env, check=True)
    return time.perf_counter() - started


def run_ray(executor, remote, plan: dict, inputs: dict, work: Path) -> float:
    from modelbuild.exec.ray_exec import fetch_outputs

    started = time.perf_counter()
    result = executor.run_stage(plan, inputs, remote, "cpu", 1)
    fetch_outputs(result, work / uuid.uuid4().hex, remote)
    return time.perf_counter() - started


def overhead(executor, remote, repeat: int, work: Path) -> tuple[list[dict], float]:
    first = run_ray(executor, remote, *STAGES["device-probe"], work)  # starts a Ray worker process
    rows = []
    for name, (plan, inputs) in STAGES.items():
        local, ray_ = [], []
        for _ in range(repeat):  # interleaved: load from other users of the machine hits both alike
            local.append(run_local(plan, inputs, work))
            ray_.append(run_ray(executor, remote, plan, inputs, work))
        rows.append({"stage": name, "repeat": repeat, "local_s": round(statistics.median(local), 3),
                     "ray_s": round(statistics.median(ray_), 3),
                     "overhead_s": round(statistics.median(ray_) - statistics.median(local), 3),
                     "local_all_s": [round(x, 3) for x in local], "ray_all_s": [round(x, 3) for x in ray_]})
    return rows, round(first, 3)


def timeline(executor, remote, matrix: int) -> list[dict]:
    import ray

    names = {n["NodeID"]: ("gpu-node" if n["Resources"].get("GPU") else "head") for n in ray.nodes() if n["Alive"]}
    t0 = time.time()
    runs = []
    for i in range(matrix):
        for device in ("cpu", "cuda"):
            plan = {"target": f"probe-{device}-{i}", "file": "bench", "pass": "device-probe",
                    "params": {"seconds": 1.0, "size": 128}, "input_names": {}, "cpu_numerics": widest()}
            runs.append(executor.submit(plan, {}, remote, device, 1, gpu_memory_gb=8 if device == "cuda" else None))
    rows = []
    for run in runs:
        result = run.result(timeout=600)
        ran = result["ran_on"]
        rows.append({"stage": run.target, "node": names.get(ran["node"], ran["node"][:8]), "device": ran["device"],
                     "start_s": round(ran["started"] - t0, 2), "end_s": round(ran["ended"] - t0, 2)})
    return sorted(rows, key=lambda r: (r["node"], r["start_s"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=4)
    parser.add_argument("--matrix", type=int, default=4)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mb-ray-bench-"))
    server = start_weed(work / "weed")
    cluster = None
    try:
        make_bucket(server, "bench")
        cluster = start_cluster(env=server.env())
        os.environ.update(server.env())
        from modelbuild.exec.ray_exec import RayExecutor
        from modelbuild.cache.remote import RemoteStore

        remote = RemoteStore.from_url(f"s3://bench/ray-{uuid.uuid4().hex[:8]}")
        executor = RayExecutor.connect(cluster.address, gpu_memory_gb=16)
        rows, first = overhead(executor, remote, args.repeat, work)
        lines = timeline(executor, remote, args.matrix)
    finally:
        import ray

        ray.shutdown()
        if cluster:
            cluster.stop()
        stop_weed(server)
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'stage':14} {'local s':>8} {'ray s':>8} {'overhead s':>11}   (median of {args.repeat}; first Ray task {first} s)")
    for row in rows:
        print(f"{row['stage']:14} {row['local_s']:8.3f} {row['ray_s']:8.3f} {row['overhead_s']:11.3f}")
    print("\ntimeline (s from submission)")
    for row in lines:
        bar = " " * int(row["start_s"] * 2) + "#" * max(1, int((row["end_s"] - row["start_s"]) * 2))
        print(f"{row['node']:9} {row['device']:7} {row['stage']:12} {row['start_s']:6.2f} {row['end_s']:6.2f} |{bar}")
    out = REPO / "bench" / "results" / "ray_overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                               "command": "python bench/ray_overhead.py " + " ".join(sys.argv[1:]),
                               "first_ray_task_s": first, "overhead": rows, "timeline": lines}, indent=1) + "\n")
    print(f"\nwrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
