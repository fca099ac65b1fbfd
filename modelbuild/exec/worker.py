"""Runs one pass in its own process: ``python -m modelbuild.exec.worker plan.json``.

The plan is built and launched here, one way for a local device slot (engine/stage.py) and a Ray
node (ray_exec.py): ``target_plan`` says what the target file and the key fix (pass, resolved
params, the inputs as the file names them, the CPU branch), ``placed`` adds where this run of it
happens (absolute input paths, the temporary output folder, the device slot, threads, the
download cache), and ``run_worker`` writes it and starts this module on it. A ``UserError``
raised by a pass (bad data, model not found...) is printed as one line; any other exception is a
bug and keeps its traceback.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from .. import UserError
from ..core import settings
from ..core.numerics import missing
from ..passdef import get_pass


@dataclass
class StageContext:
    """What a pass may know about where it runs, beside its params and inputs."""

    target: str
    device: str  # "cpu" or "cuda": with CUDA_VISIBLE_DEVICES set, the assigned GPU is cuda:0 in here
    assigned_device: str  # the slot the scheduler gave the stage: "cpu" or "cuda:N" (for records)
    threads: int  # CPU threads this stage may use (onnxruntime intra-op, torch via OMP_NUM_THREADS)
    cache_dir: Path  # downloads pinned by sha256 in the pass's params (embedded-import); never outputs
    input_names: dict[str, str]  # each input as the target file names it ("targets/data/x.jsonl", ":base"), for messages


def target_plan(target, numerics: str) -> dict:
    """The part of a worker plan that is the same wherever the stage runs."""
    return {"target": target.name, "file": target.file, "pass": target.pass_def.name, "params": target.params,
            "input_names": {key: str(ref) for key, ref in target.inputs.items()}, "cpu_numerics": numerics}


def placed(plan: dict, inputs: dict[str, str], output_dir: Path, device: str, assigned_device: str, threads: int,
           cache_dir: Path | str) -> dict:
    """``target_plan`` with where this run happens. ``cache_dir`` holds the downloads a pass pins
    by sha256 (embedded-import): the project's cache locally; on a Ray node MODELBUILD_CACHE as
    the node has it, else ~/.cache/modelbuild (ray_exec.py; nodes share no project folder)."""
    return {**plan, "inputs": inputs, "output_dir": str(output_dir), "device": device,
            "assigned_device": assigned_device, "threads": threads, "cache_dir": str(cache_dir)}


def run_worker(plan: dict, work: Path, env: dict, **options) -> subprocess.CompletedProcess:
    """Write ``plan`` to ``work``/plan.json and run its pass in a process of its own, with ``env``
    (the slot's devices, threads and CPU branch); ``options`` go to subprocess.run."""
    plan_file = work / "plan.json"
    plan_file.write_text(json.dumps(plan, indent=1))
    return subprocess.run([sys.executable, "-m", "modelbuild.exec.worker", str(plan_file)], env=env, **options)


def main(plan_file: str) -> int:
    plan = json.loads(Path(plan_file).read_text())
    pass_def = get_pass(plan["pass"])
    if pass_def is None:
        print(f"modelbuild: {plan['file']}: target '{plan['target']}': pass '{plan['pass']}' is not installed", file=sys.stderr)
        return 2
    lacking = missing(plan["cpu_numerics"])
    if lacking:  # the key promises bytes of that branch; another would file other bytes under it
        print(f"modelbuild: {plan['file']}: target '{plan['target']}': CPU numerics {plan['cpu_numerics']}: {lacking}", file=sys.stderr)
        return 2
    inputs = pass_def.group_inputs({key: Path(path) for key, path in plan["inputs"].items()})
    ctx = StageContext(
        target=plan["target"],
        device=plan["device"].split(":")[0],
        assigned_device=plan["assigned_device"],
        threads=int(plan["threads"]),
        cache_dir=Path(plan["cache_dir"]),
        input_names=plan["input_names"],
    )
    try:
        pass_def.run(pass_def.params(**plan["params"]), inputs, Path(plan["output_dir"]), ctx)
    except UserError as error:
        print(f"modelbuild: {plan['file']}: target '{plan['target']}': {error}", file=sys.stderr)
        return 2
    return 0


def quiet_libraries() -> None:
    """Keep library chatter (per-tensor tqdm bars, INFO logs, deprecation notes) out of build logs.

    Passes draw their own rich progress. MODELBUILD_VERBOSE=1 lets everything through.
    """
    if settings.current().verbose:
        return
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.disable(logging.INFO)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_libraries()
    sys.exit(main(sys.argv[1]))
