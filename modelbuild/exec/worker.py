"""Runs one pass in its own process: ``python -m modelbuild.exec.worker plan.json``.

The executor (stage.py) writes the plan: pass name, resolved params, absolute input paths and
the temporary output folder. A ``UserError`` raised by a pass (bad data, model not found...)
is printed as one line; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import logging
import os
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


def main(plan_file: str) -> int:
    plan = json.loads(Path(plan_file).read_text())
    pass_def = get_pass(plan["pass"])
    if pass_def is None:
        print(f"modelbuild: target '{plan['target']}': pass '{plan['pass']}' is not installed", file=sys.stderr)
        return 2
    lacking = missing(plan["cpu_numerics"])
    if lacking:  # the key promises bytes of that branch; another would file other bytes under it
        print(f"modelbuild: target '{plan['target']}': CPU numerics {plan['cpu_numerics']}: {lacking}", file=sys.stderr)
        return 2
    inputs = pass_def.group_inputs({key: Path(path) for key, path in plan["inputs"].items()})
    ctx = StageContext(
        target=plan["target"],
        device=plan["device"].split(":")[0],
        assigned_device=plan.get("assigned_device", plan["device"]),
        threads=int(plan.get("threads") or os.cpu_count() or 1),
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
