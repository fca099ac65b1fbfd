"""device-probe: what a stage on a given device actually gets, and how fast that device is.

Writes ``device.json``: the slot the scheduler assigned, the GPU visibility and thread limits
the stage process saw, the execution providers onnxruntime offers, and the matrix-multiply
throughput measured for ``seconds`` on the device (numpy on the CPU, torch on a real GPU).
Use it to check a machine's device setup (``doit probe-cuda``) and to exercise the scheduler:
on simulated GPUs it reports the assignment and measures on the CPU, saying so.

The output holds timings and wall-clock times, so it is not reproducible by design.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from modelbuild.core import settings
from modelbuild.passdef import PassDef, param, require

SEEN_VARIABLES = ("CUDA_VISIBLE_DEVICES", "MODELBUILD_DEVICE", "MODELBUILD_THREADS", "MODELBUILD_SIMULATED_GPUS",
                  "OMP_NUM_THREADS", "MKL_NUM_THREADS", "MKL_CBWR", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")


@dataclass(frozen=True)
class Params:
    seconds: float = param(1.0, "how long to run the matrix-multiply load on the device (0 = only report)")
    size: int = param(256, "square matrix size of the load")

    def __post_init__(self):
        require(self.seconds >= 0, "seconds", "0 or more", self.seconds)
        require(self.size >= 1, "size", "at least 1", self.size)


def _matmul_gflops(seconds: float, size: int, device: str) -> dict:
    """Repeated size x size matmuls for about ``seconds``; GFLOP/s achieved."""
    if device == "cuda":
        import torch

        a = torch.rand(size, size, device="cuda")
        b = torch.rand(size, size, device="cuda")
        sync = torch.cuda.synchronize
        name = torch.cuda.get_device_name(0)
    else:
        import numpy as np

        rng = np.random.default_rng(0)
        a = rng.random((size, size), dtype=np.float32)
        b = rng.random((size, size), dtype=np.float32)

        def sync() -> None:
            return None

        name = "cpu (numpy)"
    count = 0
    started = time.perf_counter()
    while True:
        a @ b
        count += 1
        if count % 8 == 0:
            sync()
            if time.perf_counter() - started >= seconds:
                break
    sync()
    elapsed = time.perf_counter() - started
    return {"on": name, "matmuls": count, "seconds": round(elapsed, 3),
            "gflops": round(2 * size**3 * count / elapsed / 1e9, 2)}


def run(params: Params, inputs: dict, out_dir: Path, ctx) -> None:
    import onnxruntime

    simulated = settings.current().simulated_gpus is True  # the parent's, or the stage's "1"
    report = {
        "declared_device": ctx.device,
        "assigned_device": ctx.assigned_device,
        "threads": ctx.threads,
        "simulated": simulated,
        "environment": settings.raw(SEEN_VARIABLES),
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "started": round(time.time(), 3),
    }
    if params.seconds > 0:
        # A simulated GPU is not there: load the CPU instead, and say so.
        load_device = "cuda" if ctx.device == "cuda" and not simulated else "cpu"
        report["load"] = _matmul_gflops(params.seconds, params.size, load_device)
    report["ended"] = round(time.time(), 3)
    (out_dir / "device.json").write_text(json.dumps(report, indent=1) + "\n")


PASS = PassDef(
    name="device-probe",
    version=1,
    doc="report the device slot, GPU visibility and threads a stage gets, and the device's matmul GFLOP/s",
    params=Params,
    inputs={},
    run=run,
    libraries=("numpy", "onnxruntime"),
    devices=("cpu", "cuda"),
)
