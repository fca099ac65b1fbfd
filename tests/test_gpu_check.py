"""bench/gpu_check.py end to end on the CPU (`--device cpu --quick`): the same stages, worker and
measurements a GPU run uses, so the script a GPU machine gets is known to run. Its CUDA paths
themselves are untested here (no GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO


def test_gpu_check_runs_end_to_end_on_cpu(tmp_path):
    work = tmp_path / "work"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench/gpu_check.py"), "--device", "cpu", "--quick", "--out", str(tmp_path / "out"),
         "--work", str(work)],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "out/gpu_check.json").read_text())
    assert report["machine"]["device"] == "cpu" and report["quick"] is True

    tiny = report["finetune"]["tiny"]
    assert tiny["steps"] == 4 and tiny["autocast"] is None  # bf16 autocast is for cuda only
    assert tiny["identical"] is True and tiny["differing_files"] == []
    for attempt in (1, 2):  # two real adapters, from two runs of the pass
        training = json.loads((work / f"tiny-adapter-{attempt}/training.json").read_text())
        assert training["device"] == "cpu" and len(training["losses"]) == 4
        assert (work / f"tiny-adapter-{attempt}/adapter_model.safetensors").stat().st_size > 10_000
    assert all(seconds > 0 for seconds in tiny["seconds"])

    speed = report["torch_eval"]["tiny"]
    assert speed["tokens_per_s"] > 0 and speed["ttft_ms"] > 0 and speed["speed_samples"] == 3

    phi = report["phi35_shaped_finetune"]
    assert phi["config"]["vocab_size"] == 32064 and phi["config"]["num_hidden_layers"] == 1
    config = json.loads((work / "phi35-shaped-base/config.json").read_text())
    assert config["hidden_size"] == 384 and config["rope_parameters"]["rope_type"] == "longrope"
    assert phi["batch_size"] == 1 and phi["rank"] == 8  # the phi35 recipe's own finetune settings
    assert phi["autocast"] is None and phi["peak_gpu_memory_gb"] is None
    assert len(phi["step_seconds_each"]) == 3 and all(t > 0 for t in phi["step_seconds_each"])
    assert phi["step_seconds"] == sorted(phi["step_seconds_each"])[1]
    assert json.loads((work / "phi35-adapter/training.json").read_text())["device"] == "cpu"
    assert "tiny: finetune" in result.stdout and "phi35-shaped:" in result.stdout
